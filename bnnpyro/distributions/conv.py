"""A Bayesian 1-D or 2-D convolution as a Pyro distribution over its activations."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import lazy_property

from bnnpyro.distributions._validation import (
    check_float_tensors,
    check_layer_values,
    check_prior_shape,
    check_rows,
)
from bnnpyro.distributions.folded_kl import FoldedKLLayer
from bnnpyro.distributions.hidden_layer import ESTIMATORS, random_signs
from bnnpyro.distributions.kl import minibatch_kl_factor, normal_kl_sum

_CONV = {1: F.conv1d, 2: F.conv2d}


def _per_dim(value: int | tuple[int, ...], d: int, name: str, minimum: int) -> tuple[int, ...]:
    """A convolution argument (``stride``, ``padding``, ``dilation``) as ``d`` ints of at least ``minimum``."""
    values = (value,) * d if isinstance(value, int) else tuple(value)
    if len(values) != d or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{name} must be an int of at least {minimum}, or {d} of them, got {value!r}")
    return values


class ConvLayer(FoldedKLLayer):
    r"""
    A convolution (``conv1d`` or ``conv2d``) with a factorised Gaussian over its
    filters (and optionally its bias), represented as a distribution over the
    layer's *activations*, with the conventions of
    :class:`~bnnpyro.distributions.HiddenLayer`.

    Generative process, for filters :math:`W_{oik} \sim \mathcal N(\mu_{oik}, \sigma_{oik}^2)`
    and bias :math:`b_o \sim \mathcal N(m_o, s_o^2)`:

    .. math::

        \text{output} = \phi(W \star x + b).

    A convolution is linear in :math:`W` and every output element
    :math:`(W\star x)_{op} = \sum_{ik} W_{oik}\, x_{i,\,p+k}` is a sum of independent
    Gaussians, so its exact marginal is

    .. math::

        (W \star x + b)_{op} \sim
        \mathcal N\big((\mu \star x)_{op} + m_o,\ ((\sigma\odot\sigma) \star (x\odot x))_{op} + s_o^2\big).

    **Estimators** (``estimator=``), all with these per-element marginals:

    - ``"local_reparameterization"`` (default, Kingma et al., 2015): every output
      element drawn independently from its marginal; two convolutions, no weight sample.
      Exact per element, but the positions of one row are independent here while one filter
      draw correlates them: after a layer that combines positions (pooling, flattening into
      a linear layer) the joint distribution, and so the ELBO, is the usual approximation
      (as in Molchanov et al., 2017), not the weight-space one. Flipout and weight-space
      sampling are exact per row.
    - ``"weight_space"``: one filter (and bias) draw per replica of the network
      (per element of ``sample_shape + batch_shape[:-1]``), shared by all rows of the
      minibatch; the replicas run as one grouped convolution. As for :class:`HiddenLayer`,
      the standard normal noise of the draw is left in ``drawn_weight_noise`` (a pair: filters
      ``replicas x W_mean.shape``, bias ``replicas x C_out`` or ``None``), and setting
      ``weight_noise`` to such a pair makes later draws reuse it (the same networks on other
      inputs).
    - ``"flipout"`` (Wen et al., 2018): one perturbation :math:`\Delta W = \sigma\odot\varepsilon`
      (and one bias draw) per replica, and per row random signs
      :math:`s^{in}_n \in \{\pm1\}^{C_{in}}`, :math:`s^{out}_n \in \{\pm1\}^{C_{out}}`
      (shared over spatial positions):
      :math:`\mu\star x_n + (\Delta W \star (x_n\odot s^{in}_n))\odot s^{out}_n + b`.
      Per-element mean and variance equal weight-space sampling's; the weight part
      of the covariance between two rows is zero in expectation over the signs.

    **Folded KL and minibatch scaling** as in :class:`HiddenLayer`: :meth:`log_prob`
    ignores its argument and returns this row's share ``KL_factor * KL / B``
    (positive) of :math:`\mathrm{KL}(q(W, b)\,\Vert\,p(W, b))`, summed over filters
    and bias; the rightmost batch dimension of ``X`` is the minibatch of ``B`` rows,
    leading ones are replicas (particles, posterior samples) each carrying a full
    share. ``dataset_size=N`` sets ``KL_factor = B / N``, so that inside
    ``pyro.plate("data", N, subsample_size=B)`` the KL is counted once.
    :func:`torch.distributions.kl_divergence` is registered between two
    ``ConvLayer``\ s (the second one's ``W_mean``/``W_scale`` and bias taken as the prior).

    :param torch.Tensor X: ``*batch x C_in x L`` (1-D) or ``*batch x C_in x H x W`` (2-D)
        inputs, at least one batch dimension (the minibatch).
    :param torch.Tensor W_mean: filter means, ``C_out x C_in/groups x k`` (1-D) or
        ``C_out x C_in/groups x kH x kW`` (2-D); its dimension picks the convolution.
    :param torch.Tensor W_scale: positive filter standard deviations, shape of ``W_mean``.
    :param callable non_linearity: applied to the pre-activations (default ReLU).
    :param float KL_factor: multiplier of the KL for the whole minibatch. Default 1.
    :param W_prior_scale: scale of the Normal prior (float, or tensor broadcastable to
        ``W_mean``). Default 1.
    :param stride: as :func:`torch.nn.functional.conv2d`.
    :param padding: as :func:`torch.nn.functional.conv2d` (ints, tuples, ``"same"``, ``"valid"``).
    :param dilation: as :func:`torch.nn.functional.conv2d`.
    :param int groups: as :func:`torch.nn.functional.conv2d`.
    :param torch.Tensor bias_mean: ``C_out`` bias means (give with ``bias_scale``, or neither).
    :param torch.Tensor bias_scale: ``C_out`` positive bias standard deviations.
    :param W_prior_mean: mean of the Normal prior (float or tensor broadcastable to ``W_mean``).
        Default 0. The prior of the bias is the same Normal: with a bias, a tensor prior must
        be constant over the input-channel and kernel dimensions (e.g. ``C_out x 1 x 1 x 1``).
    :param str estimator: ``"local_reparameterization"``, ``"weight_space"`` or ``"flipout"``.
    :param int dataset_size: ``N``; if given, ``KL_factor`` is set to ``B / N``.

    The batch shape is ``X.shape[:-(d+1)]``, the event shape the output shape
    ``C_out x L_out`` (1-D) or ``C_out x H_out x W_out`` (2-D).

    References: Kingma, D. P., Salimans, T., Welling, M. (2015). Variational dropout and
    the local reparameterization trick. NeurIPS.
    Wen, Y., Vicol, P., Ba, J., Tran, D., Grosse, R. (2018). Flipout: efficient
    pseudo-independent weight perturbations on mini-batches. ICLR.
    """

    arg_constraints = {
        "X": constraints.real,
        "W_mean": constraints.real,
        "W_scale": constraints.positive,
    }

    def __init__(
        self,
        X: Tensor,
        W_mean: Tensor,
        W_scale: Tensor,
        non_linearity: Callable[[Tensor], Tensor] = F.relu,
        KL_factor: float | Tensor = 1.0,
        W_prior_scale: float | Tensor = 1.0,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        *,
        bias_mean: Tensor | None = None,
        bias_scale: Tensor | None = None,
        W_prior_mean: float | Tensor = 0.0,
        estimator: str = "local_reparameterization",
        dataset_size: int | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if (bias_mean is None) != (bias_scale is None):
            raise ValueError("give both bias_mean and bias_scale, or neither")
        bias = {} if bias_mean is None else {"bias_mean": bias_mean, "bias_scale": bias_scale}
        check_float_tensors(X=X, W_mean=W_mean, W_scale=W_scale, **bias)
        if W_mean.dim() not in (3, 4):
            raise ValueError(
                "W_mean must be 3-D (C_out x C_in/groups x k, conv1d) or 4-D "
                f"(C_out x C_in/groups x kH x kW, conv2d), got shape {tuple(W_mean.shape)}"
            )
        if W_scale.shape != W_mean.shape:
            raise ValueError(
                f"W_scale must have the shape of W_mean {tuple(W_mean.shape)}, got {tuple(W_scale.shape)}"
            )
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        C_out = W_mean.size(0)
        if C_out % groups:
            raise ValueError(f"W_mean.size(0) (C_out = {C_out}) must be divisible by groups = {groups}")
        d = W_mean.dim() - 2
        C_in = W_mean.size(1) * groups
        if X.dim() < d + 2 or X.size(-(d + 1)) != C_in:
            layout = "B x C_in x L" if d == 1 else "B x C_in x H x W"
            raise ValueError(
                f"X must have shape (..., {layout}) with C_in = W_mean.size(1) * groups = {C_in} "
                f"and at least one batch dimension, got shape {tuple(X.shape)}"
            )
        if bias_mean is not None:
            for name, value in (("bias_mean", bias_mean), ("bias_scale", bias_scale)):
                if value.shape != (C_out,):
                    raise ValueError(f"{name} must have shape (C_out,) = ({C_out},), got {tuple(value.shape)}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not callable(non_linearity):
            raise TypeError(f"non_linearity must be callable, got {type(non_linearity).__name__}")
        check_prior_shape("W_prior_mean", W_prior_mean, W_mean.shape, "W_mean")
        check_prior_shape("W_prior_scale", W_prior_scale, W_mean.shape, "W_mean")
        rows = X.size(-(d + 2))
        check_rows("X", X, rows)
        KL_factor = minibatch_kl_factor(rows, KL_factor, dataset_size)

        self.X = X
        self._X_distinct = X
        self.W_mean = W_mean
        self.W_scale = W_scale
        self.bias_mean = bias_mean
        self.bias_scale = bias_scale
        self.non_linearity = non_linearity
        self.KL_factor = KL_factor
        self.W_prior_mean = W_prior_mean
        self.W_prior_scale = W_prior_scale
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.estimator = estimator
        self.conv_dim = d
        self._kl_per_row = KL_factor / rows
        self.weight_noise: tuple[Tensor, Tensor | None] | None = None
        self.drawn_weight_noise: tuple[Tensor, Tensor | None] | None = None
        if bias_mean is not None:
            self._bias_prior_mean = self._bias_prior(W_prior_mean, "W_prior_mean")
            self._bias_prior_scale = self._bias_prior(W_prior_scale, "W_prior_scale")

        validate = Distribution._validate_args if validate_args is None else validate_args
        if validate:
            self._check_values()
        super().__init__(X.shape[: -(d + 1)], self._output_shape(), validate_args=False)
        self._validate_args = validate

    def _bias_prior(self, p: float | Tensor, name: str) -> float | Tensor:
        """The bias's share of a weight prior: the scalar itself, or its output-channel column."""
        if not torch.is_tensor(p) or p.numel() == 1:
            return p
        full_dim = self.W_mean.dim()
        if p.dim() <= full_dim:
            t = p.reshape((1,) * (full_dim - p.dim()) + p.shape)
            if all(s == 1 for s in t.shape[1:]) and t.size(0) in (1, self.W_mean.size(0)):
                return t.reshape(-1)
        raise ValueError(
            f"with a bias, a tensor {name} must be constant over the input-channel and kernel "
            f"dimensions (shape C_out x 1 x ... x 1) to serve as the bias prior, got shape {tuple(p.shape)}"
        )

    def _output_shape(self) -> torch.Size:
        """``C_out x spatial_out``: per spatial dim ``floor((L + 2p - dilation (k - 1) - 1) / stride) + 1``
        (``padding="same"``: ``L``), torch's rule, in plain ints (so also under ``torch.jit.trace``)."""
        d = self.conv_dim
        spatial = [int(s) for s in self.X.shape[-d:]]
        kernel = [int(s) for s in self.W_mean.shape[-d:]]
        stride, dilation = _per_dim(self.stride, d, "stride", 1), _per_dim(self.dilation, d, "dilation", 1)
        if self.padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' needs stride 1, got stride={self.stride}")
            out = spatial
        else:
            padding = (0,) * d if self.padding == "valid" else _per_dim(self.padding, d, "padding", 0)
            out = [(L + 2 * p - dl * (k - 1) - 1) // s + 1
                   for L, k, s, p, dl in zip(spatial, kernel, stride, padding, dilation)]
        if min(out) < 1:
            raise ValueError(
                f"X of spatial shape {tuple(spatial)} does not fit the filters "
                f"{tuple(self.W_mean.shape)} with stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}: the output would be {tuple(out)}"
            )
        return torch.Size((int(self.W_mean.shape[0]), *out))

    def _check_values(self) -> None:
        finite, positive = {"X": self.X, "W_mean": self.W_mean}, {"W_scale": self.W_scale}
        if self.bias_mean is not None:
            finite["bias_mean"], positive["bias_scale"] = self.bias_mean, self.bias_scale
        check_layer_values(finite, positive, "W", self.W_prior_mean, self.W_prior_scale, self.KL_factor)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape, _instance=None) -> "ConvLayer":
        new = self._get_checked_instance(ConvLayer, _instance)
        batch_shape = torch.Size(batch_shape)
        d = self.conv_dim
        new.X = self.X.expand(batch_shape + self.X.shape[-(d + 1):])
        # moments are computed on the distinct rows and broadcast to the new batch shape
        new._X_distinct = self._X_distinct
        attrs = (
            "W_mean", "W_scale", "bias_mean", "bias_scale", "non_linearity", "KL_factor",
            "W_prior_mean", "W_prior_scale", "stride", "padding", "dilation", "groups",
            "estimator", "conv_dim", "_kl_per_row", "weight_noise",
        )
        new.drawn_weight_noise = None
        if self.bias_mean is not None:
            attrs += ("_bias_prior_mean", "_bias_prior_scale")
        return self._finish_expand(new, batch_shape, attrs)

    @lazy_property
    def KL(self) -> Tensor:
        """Scalar KL of the filter (and bias) distribution from the prior, summed over all elements."""
        kl = normal_kl_sum(self.W_mean, self.W_scale, self.W_prior_mean, self.W_prior_scale)
        if self.bias_mean is not None:
            kl = kl + normal_kl_sum(self.bias_mean, self.bias_scale, self._bias_prior_mean, self._bias_prior_scale)
        return kl

    def _conv(self, X: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        """The convolution over the trailing ``C_in x spatial`` dims of ``X``, any leading dims."""
        d = self.conv_dim
        lead = X.shape[: -(d + 1)]
        out = _CONV[d](X.reshape((-1,) + X.shape[-(d + 1):]), W, b,
                       self.stride, self.padding, self.dilation, self.groups)
        return out.reshape(lead + out.shape[1:])

    def _replica_conv(self, X: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        """
        ``X``: ``lead x B x C_in x spatial``, ``W``: ``lead x`` filter shape, ``b``: ``lead x C_out``
        or None: replica ``r`` of ``lead`` convolved with its own filters, as one convolution with
        ``groups * R`` groups over the ``R`` replicas stacked along the channel dimension.
        """
        d = self.conv_dim
        lead = W.shape[: -(d + 2)]
        R = math.prod(lead)
        if R == 1:
            b = None if b is None else b.reshape(-1)
            return self._conv(X, W.reshape(W.shape[-(d + 2):]), b)
        B, C_in = X.shape[-(d + 2)], X.shape[-(d + 1)]
        Xr = X.reshape((R, B, C_in) + X.shape[-d:]).transpose(0, 1).reshape((B, R * C_in) + X.shape[-d:])
        Wr = W.reshape((-1,) + W.shape[-(d + 1):])
        br = None if b is None else b.reshape(-1)
        out = _CONV[d](Xr, Wr, br, self.stride, self.padding, self.dilation, self.groups * R)
        out = out.reshape((B, R) + self.event_shape).transpose(0, 1)
        return out.reshape(lead + (B,) + self.event_shape)

    def pre_activation_moments(self) -> tuple[Tensor, Tensor]:
        """
        Per-element mean ``conv(X, W_mean) + bias_mean`` and variance
        ``conv(X**2, W_scale**2) + bias_scale**2`` of the pre-activations, broadcastable to
        ``batch_shape + event_shape`` (computed on the rows of the original ``X`` after :meth:`expand`).
        """
        X = self._X_distinct
        b_mean = self.bias_mean
        b_var = None if self.bias_scale is None else self.bias_scale**2
        return self._conv(X, self.W_mean, b_mean), self._conv(X * X, self.W_scale**2, b_var)

    def _draw_noise(self, lead: torch.Size) -> tuple[Tensor, Tensor | None]:
        """Standard normal noise of one filter (and bias) draw per replica, ``lead x W`` (and
        ``lead x C_out``): ``weight_noise`` if it has these shapes (weight-space sampling only),
        else fresh; left in ``drawn_weight_noise``."""
        noise = self.weight_noise if self.estimator == "weight_space" else None
        b = self.bias_mean
        if noise is None or noise[0].shape != lead + self.W_mean.shape or (noise[1] is None) != (b is None):
            W = self.W_mean
            noise = (torch.randn(lead + W.shape, dtype=W.dtype, device=W.device),
                     None if b is None else torch.randn(lead + b.shape, dtype=b.dtype, device=b.device))
        self.drawn_weight_noise = noise
        return noise

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        sample_shape = torch.Size(sample_shape)
        d = self.conv_dim
        if self.estimator == "local_reparameterization":
            mean, var = self.pre_activation_moments()
            std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
            eps = torch.randn(sample_shape + self.batch_shape + self.event_shape, dtype=mean.dtype, device=mean.device)
            pre = torch.addcmul(mean, eps, std)
        else:
            # one filter (and bias) draw per replica of the network: all but the minibatch dim
            lead = sample_shape + self.batch_shape[:-1]
            X = self.X.expand(sample_shape + self.X.shape)
            eps, eps_b = self._draw_noise(lead)
            b = None if eps_b is None else torch.addcmul(self.bias_mean, eps_b, self.bias_scale)
            if self.estimator == "weight_space":
                pre = self._replica_conv(X, torch.addcmul(self.W_mean, eps, self.W_scale), b)
            else:  # flipout
                C_in, C_out = X.size(-(d + 1)), self.event_shape[0]
                ones = (1,) * d
                s_in = random_signs(X.shape[: -(d + 1)] + (C_in,) + ones, X)
                s_out = random_signs(X.shape[: -(d + 1)] + (C_out,) + ones, X)
                perturbation = self._replica_conv(X * s_in, self.W_scale * eps, None)
                pre = torch.addcmul(self._conv(self._X_distinct, self.W_mean, None), perturbation, s_out)
                if b is not None:
                    pre = pre + b.reshape(lead + (1, C_out) + ones)
        return self.non_linearity(pre)


@register_kl(ConvLayer, ConvLayer)
def _kl_convlayer_convlayer(q: ConvLayer, p: ConvLayer) -> Tensor:
    """
    Share per minibatch row of ``KL(q(W, b) || p(W, b))`` (``p``'s filter and bias
    distributions as the prior), scaled by ``q``'s ``KL_factor`` exactly as :meth:`ConvLayer.log_prob`.
    """
    if q.W_mean.shape != p.W_mean.shape:
        raise ValueError(
            f"cannot compare ConvLayers of filter shapes {tuple(q.W_mean.shape)} and {tuple(p.W_mean.shape)}"
        )
    if (q.bias_mean is None) != (p.bias_mean is None):
        raise ValueError("cannot compare a ConvLayer with a bias to one without")
    kl = normal_kl_sum(q.W_mean, q.W_scale, p.W_mean, p.W_scale)
    if q.bias_mean is not None:
        kl = kl + normal_kl_sum(q.bias_mean, q.bias_scale, p.bias_mean, p.bias_scale)
    return q._folded_kl(kl)
