"""A Bayesian fully connected layer as a Pyro distribution over its activations."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import lazy_property
from torch.utils.weak import WeakIdKeyDictionary

from bnnpyro.distributions._shapes import broadcast_shapes
from bnnpyro.distributions._validation import (
    check_float_tensors,
    check_layer_values,
    check_prior_shape,
    check_rows,
)
from bnnpyro.distributions.folded_kl import FoldedKLLayer
from bnnpyro.distributions.kl import minibatch_kl_factor, normal_kl_sum


ESTIMATORS = ("local_reparameterization", "weight_space", "flipout")
# non-linearities applied in place to fresh pre-activations when autograd is off
_RELU = (F.relu, torch.relu)
# from this width on, a matmul writes into the first H columns of the H + 1 wide output as fast as
# into a contiguous one; below it, a zero weight column is cheaper (measured on CPU)
_MIN_STRIDED_OUTPUT_WIDTH = 128
# below this output (or input) width a batched matmul is faster transposed on CPU (see _replica_matmul)
_MAX_NARROW_OUTPUT = 16
# the outputs of every HiddenLayer draw (by identity, while they live): a later layer taking one
# as its X need not check it for NaN again
_ACTIVATIONS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def random_signs(shape: Sequence[int], like: Tensor) -> Tensor:
    """
    Independent Rademacher signs (``+1`` or ``-1`` with probability 1/2) of ``like``'s dtype and
    device, ``shape``. Each sign is one bit of a uniform 32-bit random integer (i.i.d. fair bits):
    one draw from the generator per 32 signs. On CPU, where the generator is sequential, one draw
    per sign cost a flipout step of a 784-400-400-10 network at batch 128 1.0 ms of signs (0.32 ms
    as bits); ``bernoulli_`` per sign, 3.2 ms for eight ``20 x 650`` to ``20 x 2600`` sign
    matrices (0.33 ms as bits).
    """
    n = math.prod(shape)
    # the full int32 range: every bit fair (an int64 draw below 2**32 relies on a 64-bit range)
    words = torch.randint(-(2**31), 2**31, (-(-n // 32), 1), dtype=torch.int32, device=like.device)
    bits = (words >> torch.arange(32, dtype=torch.int32, device=like.device)) & 1
    return bits.view(-1)[:n].view(tuple(shape)).to(like.dtype).mul_(2).sub_(1)


def _replica_matmul(X: Tensor, A: Tensor, storage: Callable[[torch.Size], Tensor] | None = None) -> Tensor:
    """
    ``X @ A`` for ``... x B x D`` inputs and a stack of weight draws ``... x D x H``. When ``H`` or
    ``D`` is below 16 it is computed on CPU as ``(A^T @ X^T)^T``: the same batched GEMMs with the
    ``B`` rows as their long dimension, 2x (``H`` = 10) to 6x (``H`` = 1) faster there (measured
    at ``100 x 655`` rows; with ``D`` = 14 the whole predictive pass of a 13-50-1 network ~10%
    faster, its next layer reading the transposed output contiguously). Wide layers keep
    ``X @ A`` (transposed, 400 x 400 was 8% slower). The result may be a transposed view.
    ``storage(shape)``, if given, supplies the tensor the product is written to (no autograd).
    """
    transposed = min(A.size(-1), A.size(-2)) < _MAX_NARROW_OUTPUT and X.dim() >= 3 and X.device.type == "cpu"
    if transposed:
        X, A = A.transpose(-1, -2), X.transpose(-1, -2)
    if storage is None:
        out = X @ A
    else:
        out = storage(broadcast_shapes(X.shape[:-2], A.shape[:-2]) + (X.size(-2), A.size(-1)))
        torch.matmul(X, A, out=out)
    return out.transpose(-1, -2) if transposed else out


class _PreActivationStd(torch.autograd.Function):
    r"""
    ``std = sqrt(max((X * X) @ (A_scale * A_scale), tiny))`` with a hand-written backward:
    for ``g_var = g / (2 std)``, ``dA_scale = 2 A_scale * ((X*X)^T @ g_var)`` and
    ``dX = 2 X * (g_var @ (A_scale*A_scale)^T)``. Two matmuls and one elementwise pass over
    ``D x H`` instead of autograd's ``pow`` backward (three passes); memory ``batch x D`` and
    ``D x H``, never ``B x D x H``. The clamp at the smallest normal float keeps the gradient of
    an all-zero input row finite (it is then exactly zero).
    """

    @staticmethod
    def forward(ctx, X: Tensor, A_scale: Tensor) -> Tensor:
        X2 = X * X
        A_var = A_scale * A_scale
        std = (X2 @ A_var).clamp_min_(torch.finfo(X.dtype).tiny).sqrt_()
        ctx.save_for_backward(X, X2, A_scale, A_var, std)
        return std

    @staticmethod
    def backward(ctx, grad: Tensor):
        X, X2, A_scale, A_var, std = ctx.saved_tensors
        grad_var = grad / (2.0 * std)
        grad_X = grad_A_scale = None
        if ctx.needs_input_grad[0]:
            grad_X = (grad_var @ A_var.t()).mul_(X).mul_(2.0)
        if ctx.needs_input_grad[1]:
            g2 = 2.0 * grad_var.reshape(-1, grad_var.size(-1))
            grad_A_scale = (X2.reshape(-1, X2.size(-1)).t() @ g2).mul_(A_scale)
        return grad_X, grad_A_scale


class _LocalReparameterizationSample(torch.autograd.Function):
    r"""
    One local-reparameterization draw ``X @ A_mean + eps * sqrt((X*X) @ (A_scale*A_scale))`` as a
    single autograd node: the forward keeps only ``r = eps / std`` (``... x H``) beside the inputs,
    and the backward, with ``u = g * r`` (twice the gradient of the variance),

    .. math:: \partial A_\mu = X^\top g,\quad
              \partial A_\sigma = A_\sigma \odot (X^{\odot 2})^\top u,\quad
              \partial X = g A_\mu^\top + X \odot (u\, (A_\sigma^{\odot 2})^\top),

    four matmuls and two passes over the pre-activations (against five for ``addcmul`` over
    :class:`_PreActivationStd`). ``eps`` must have the shape of ``X @ A_mean``.
    """

    @staticmethod
    def forward(ctx, X: Tensor, A_mean: Tensor, A_scale: Tensor, eps: Tensor) -> Tensor:
        X2 = X * X
        A_var = A_scale * A_scale
        std = (X2 @ A_var).clamp_min_(torch.finfo(X.dtype).tiny).sqrt_()
        out = torch.addcmul(X @ A_mean, eps, std)
        ctx.save_for_backward(X, X2, A_mean, A_scale, A_var, eps.div(std))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        X, X2, A_mean, A_scale, A_var, r = ctx.saved_tensors
        u = grad * r
        grad_X = grad_A_mean = grad_A_scale = None
        if ctx.needs_input_grad[0]:
            grad_X = torch.addcmul(grad @ A_mean.t(), X, u @ A_var.t())
        g2, u2 = grad.reshape(-1, grad.size(-1)), u.reshape(-1, u.size(-1))
        if ctx.needs_input_grad[1]:
            grad_A_mean = X.reshape(-1, X.size(-1)).t() @ g2
        if ctx.needs_input_grad[2]:
            grad_A_scale = (X2.reshape(-1, X2.size(-1)).t() @ u2).mul_(A_scale)
        return grad_X, grad_A_mean, grad_A_scale, None


class HiddenLayer(FoldedKLLayer):
    r"""
    A fully connected layer with a factorised Gaussian over its weights,
    represented as a distribution over the layer's *activations*.

    Generative process, for a weight matrix :math:`A \in \mathbb R^{D\times H}`
    and an input row :math:`x \in \mathbb R^D`:

    .. math::

        A_{dh} \sim \mathcal N(\mu_{dh}, \sigma_{dh}^2), \qquad
        \text{output} = \phi(x^\top A)\ \ [\,\Vert\ 1\,].

    With the *local reparameterization trick* (Kingma, Salimans & Welling,
    2015) the weights are never sampled; the pre-activations are, independently
    for every row, from their exact marginal

    .. math::

        x^\top A \sim \mathcal N\big(x^\top \mu,\ (x\odot x)^\top (\sigma\odot\sigma)\big),

    which costs two ``B x D @ D x H`` matmuls and ``O(B x H)`` memory.

    **Estimators** (``estimator=``), all with these same per-row marginals:

    - ``"local_reparameterization"`` (the default): pre-activations drawn
      independently for every row and output from the marginal above.
    - ``"weight_space"``: one weight draw :math:`A = \mu + \sigma\odot\varepsilon` per
      replica of the network (leading batch and sample dimensions), shared by all
      rows of the minibatch, so rows are correlated through the shared weights.
    - ``"flipout"`` (Wen et al., 2018): one perturbation
      :math:`\Delta A = \sigma\odot\varepsilon` per replica, decorrelated across
      rows by random signs :math:`s^{in}_n \in \{\pm1\}^D`,
      :math:`s^{out}_n \in \{\pm1\}^H` drawn per row:
      :math:`x_n^\top \mu + ((x_n \odot s^{in}_n)^\top \Delta A) \odot s^{out}_n`.
      Its per-row mean and variance equal weight-space sampling's; the covariance
      between two rows is zero in expectation over the signs.

    **The folded KL.** The weights are not sample sites, so the KL of the weight
    posterior from its prior is carried by :meth:`log_prob`, which ignores its
    argument and returns this layer's share of
    :math:`\mathrm{KL}(\mathcal N(\mu,\sigma^2)\,\Vert\,\mathcal N(\mu_0,\sigma_0^2))`
    (``A_prior_mean``, ``A_prior_scale``), with a **positive** sign. In the
    customary pattern the model site holds the prior layer (``A_mean = A_prior_mean``,
    ``A_scale = A_prior_scale``: its KL is zero) and the guide site the
    variational layer, so ``Trace_ELBO``'s ``log p - log q`` is ``-KL`` and SVI
    minimises the KL. :func:`torch.distributions.kl_divergence` is registered
    between two layers (the second one's ``A_mean``/``A_scale`` taken as the prior),
    so ``TraceMeanField_ELBO`` uses the closed form.

    **Minibatch scaling.** The rightmost batch dimension of ``X`` is the
    minibatch (``B`` rows); each row carries ``KL_factor / B`` of the KL, so the
    whole minibatch carries ``KL_factor * KL``. Inside
    ``pyro.plate("data", N, subsample_size=B)`` (scale ``N/B``) the convention
    ``KL_factor = B/N`` of :mod:`pyro.contrib.bnn` (or simply
    ``dataset_size=N``) counts the KL exactly once:
    ``-ELBO = (N/B) * NLL(batch) + KL``. Leading batch dimensions (vectorised
    particles, posterior samples) are independent replicas of the network and
    each carries a full share.

    :param torch.Tensor X: ``batch_shape x D`` inputs (``B x D`` for a minibatch).
    :param torch.Tensor A_mean: ``D x H`` weight means.
    :param torch.Tensor A_scale: ``D x H`` positive weight standard deviations.
    :param callable non_linearity: applied to the pre-activations (default ReLU).
    :param float KL_factor: multiplier of the KL for the whole minibatch,
        prototypically ``B / N``. Default 1.
    :param A_prior_scale: scale of the Normal prior over the weights
        (float, or a tensor broadcastable to ``D x H``). Default 1.
    :param bool include_hidden_bias: append a column of ones to the output,
        so that the next layer's last weight row acts as a bias. Default True.
    :param bool weight_space_sampling: sample the weights themselves (one
        ``D x H`` draw shared by all rows of a minibatch) instead of the
        pre-activations. Same marginals per row, higher-variance gradients.
        Equivalent to ``estimator="weight_space"``.
    :param A_prior_mean: mean of the weight prior (float or tensor
        broadcastable to ``D x H``). Default 0.
    :param int dataset_size: ``N``; if given, ``KL_factor`` is set to ``B / N``.
    :param str estimator: ``"local_reparameterization"``, ``"weight_space"`` or
        ``"flipout"``; ``None`` (default) follows ``weight_space_sampling``.

    The event shape is ``(H + 1,)`` with ``include_hidden_bias`` else ``(H,)``;
    the batch shape is ``X.shape[:-1]``.

    With weight-space sampling, :meth:`rsample` leaves the standard normal noise
    :math:`\varepsilon` of its weight draw (``replicas x D x H``) in the attribute
    ``drawn_weight_noise``; setting ``weight_noise`` to such a tensor makes later draws reuse it
    (the same networks on other inputs: common random numbers) instead of drawing afresh.
    Likewise a draw made without autograd writes its output into a new tensor left in
    ``drawn_output_storage``, or into ``output_buffer`` if that is set and has room for it (a
    contiguous tensor with at least as many elements, of the same dtype and device: its memory is
    then overwritten and it is handed back as ``drawn_output_storage``). This is for a caller that
    no longer needs the previous output, such as :func:`~bnnpyro.predict.sample_predictive` going
    from one chunk of rows to the next: a fresh tensor of tens of MB costs its page faults on
    every call on CPU.

    References: Kingma, D. P., Salimans, T., Welling, M. (2015). Variational
    dropout and the local reparameterization trick. NeurIPS.
    Wen, Y., Vicol, P., Ba, J., Tran, D., Grosse, R. (2018). Flipout: efficient
    pseudo-independent weight perturbations on mini-batches. ICLR.
    """

    arg_constraints = {
        "X": constraints.real,
        "A_mean": constraints.real,
        "A_scale": constraints.positive,
    }
    support = constraints.independent(constraints.real, 1)

    def __init__(
        self,
        X: Tensor,
        A_mean: Tensor,
        A_scale: Tensor,
        non_linearity: Callable[[Tensor], Tensor] = F.relu,
        KL_factor: float | Tensor = 1.0,
        A_prior_scale: float | Tensor = 1.0,
        include_hidden_bias: bool = True,
        weight_space_sampling: bool = False,
        *,
        A_prior_mean: float | Tensor = 0.0,
        dataset_size: int | None = None,
        estimator: str | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if estimator is None:
            estimator = "weight_space" if weight_space_sampling else "local_reparameterization"
        elif estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        elif weight_space_sampling and estimator != "weight_space":
            raise ValueError(
                f"weight_space_sampling=True contradicts estimator={estimator!r}; give only estimator"
            )
        check_float_tensors(X=X, A_mean=A_mean, A_scale=A_scale)
        if A_mean.dim() != 2:
            raise ValueError(f"A_mean must be 2-D (D x H), got shape {tuple(A_mean.shape)}")
        if A_scale.dim() != 2:
            raise ValueError(f"A_scale must be 2-D (D x H), got shape {tuple(A_scale.shape)}")
        if A_scale.shape != A_mean.shape:
            raise ValueError(
                f"A_scale must have the shape of A_mean {tuple(A_mean.shape)}, got {tuple(A_scale.shape)}"
            )
        if X.dim() < 1 or X.size(-1) != A_mean.size(0):
            raise ValueError(
                f"X must have shape (..., D) with D = A_mean.size(0) = {A_mean.size(0)}, "
                f"got shape {tuple(X.shape)}"
            )
        if not callable(non_linearity):
            raise TypeError(f"non_linearity must be callable, got {type(non_linearity).__name__}")
        check_prior_shape("A_prior_mean", A_prior_mean, A_mean.shape, "A_mean")
        check_prior_shape("A_prior_scale", A_prior_scale, A_mean.shape, "A_mean")
        rows = X.size(-2) if X.dim() >= 2 else 1
        check_rows("X", X, rows)
        KL_factor = minibatch_kl_factor(rows, KL_factor, dataset_size)

        self.X = X
        self._X_distinct = X
        self.A_mean = A_mean
        self.A_scale = A_scale
        self.non_linearity = non_linearity
        self.KL_factor = KL_factor
        self.A_prior_mean = A_prior_mean
        self.A_prior_scale = A_prior_scale
        self.include_hidden_bias = include_hidden_bias
        self.estimator = estimator
        self.weight_space_sampling = estimator == "weight_space"
        self.dim_X = A_mean.size(0)
        self.dim_H = A_mean.size(1)
        self.weight_noise: Tensor | None = None
        self.drawn_weight_noise: Tensor | None = None
        self.output_buffer: Tensor | None = None
        self.drawn_output_storage: Tensor | None = None
        # share of the KL carried by each row of the minibatch
        self._kl_per_row = KL_factor / rows

        validate = Distribution._validate_args if validate_args is None else validate_args
        if validate:
            self._check_values()
        event_shape = torch.Size([self.dim_H + int(include_hidden_bias)])
        # the arguments are checked above: skip torch's second pass over them
        super().__init__(X.shape[:-1], event_shape, validate_args=False)
        self._validate_args = validate

    def _check_values(self) -> None:
        # An X drawn by another HiddenLayer (a hidden layer's output) is not checked again: it is
        # finite wherever that layer's arguments are, and under a plate of S posterior samples it
        # is S x B x H.
        finite = {"A_mean": self.A_mean} if self.X in _ACTIVATIONS else {"X": self.X, "A_mean": self.A_mean}
        check_layer_values(finite, {"A_scale": self.A_scale}, "A", self.A_prior_mean, self.A_prior_scale,
                           self.KL_factor)

    def expand(self, batch_shape, _instance=None) -> "HiddenLayer":
        new = self._get_checked_instance(HiddenLayer, _instance)
        batch_shape = torch.Size(batch_shape)
        new.X = self.X.expand(batch_shape + self.X.shape[-1:])
        # moments are computed once on the distinct rows and broadcast to the new batch shape
        new._X_distinct = self._X_distinct
        attrs = (
            "A_mean",
            "A_scale",
            "non_linearity",
            "KL_factor",
            "A_prior_mean",
            "A_prior_scale",
            "include_hidden_bias",
            "weight_space_sampling",
            "estimator",
            "dim_X",
            "dim_H",
            "_kl_per_row",
            "weight_noise",
            "output_buffer",
        )
        new.drawn_weight_noise = new.drawn_output_storage = None
        return self._finish_expand(new, batch_shape, attrs)

    @lazy_property
    def KL(self) -> Tensor:
        """Scalar KL of the weight distribution from the prior, summed over all ``D x H`` weights."""
        if self.A_mean is self.A_prior_mean and self.A_scale is self.A_prior_scale:
            # a prior layer (the model site): zero, without a D x H pass
            return self.A_mean.new_zeros(())
        return normal_kl_sum(self.A_mean, self.A_scale, self.A_prior_mean, self.A_prior_scale)

    def pre_activation_moments(self) -> tuple[Tensor, Tensor]:
        """
        Mean ``X @ A_mean`` and variance ``X**2 @ A_scale**2`` of the pre-activations,
        broadcastable to ``batch_shape x H``. After :meth:`expand` (e.g. under a ``pyro.plate``
        over particles or posterior samples) they are computed once on the rows of the original
        ``X``, not once per replica.
        """
        mean, std = self._pre_activation_mean_std()
        return mean, std**2

    def _pre_activation_mean_std(self) -> tuple[Tensor, Tensor]:
        X = self._X_distinct
        return X @ self.A_mean, _PreActivationStd.apply(X, self.A_scale)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        sample_shape = torch.Size(sample_shape)
        shape = sample_shape + self.batch_shape + (self.dim_H,)
        # Without autograd (prediction: S x B x H activations) the bias column is not concatenated
        # to the output, a copy of all of it: the pre-activations are written into the first H
        # columns of the ... x (H + 1) output, the non-linearity applied there, the last column set
        # to 1 (see _activate_in_place).
        in_place = self.include_hidden_bias and not torch.is_grad_enabled() and len(self.batch_shape) > 0
        if self.estimator == "weight_space":
            # one weight matrix per replica of the network (all but the minibatch dim)
            lead = sample_shape + self.batch_shape[:-1]
            X = self.X if self.batch_shape else self.X.unsqueeze(-2)
            eps = self.weight_noise
            if eps is None or eps.shape != lead + self.A_mean.shape:
                eps = torch.randn(lead + self.A_mean.shape, dtype=X.dtype, device=X.device)
            self.drawn_weight_noise = eps
            A = torch.addcmul(self.A_mean, eps, self.A_scale)
            if in_place and self.dim_H < _MIN_STRIDED_OUTPUT_WIDTH:
                # a narrow layer: the weights get a zero column, the matmul writes H + 1 columns
                # (a matmul into a strided output is slow at this width)
                return self._activate_in_place(_replica_matmul(X, F.pad(A, (0, 1)), self._output_storage))
            if in_place:
                out = self._output_storage(shape[:-1] + (self.dim_H + 1,))
                torch.matmul(X, A, out=out[..., :-1])
                return self._activate_in_place(out)
            pre = _replica_matmul(X, A)
            if not self.batch_shape:
                pre = pre.squeeze(-2)
        elif self.estimator == "flipout":
            pre = self._flipout_pre_activations(sample_shape)
        elif not sample_shape and self._X_distinct.shape == self.X.shape:
            # the training case, one draw for the rows of X: one fused autograd node
            eps = torch.randn(shape, dtype=self.X.dtype, device=self.X.device)
            pre = _LocalReparameterizationSample.apply(self.X, self.A_mean, self.A_scale, eps)
        else:
            mean, std = self._pre_activation_mean_std()
            eps = torch.randn(shape, dtype=mean.dtype, device=mean.device)
            if in_place:
                out = self._output_storage(shape[:-1] + (self.dim_H + 1,))
                torch.addcmul(mean, eps, std, out=out[..., :-1])
                return self._activate_in_place(out)
            pre = torch.addcmul(mean, eps, std)
        out = self.non_linearity(pre)
        if self.include_hidden_bias:
            out = torch.cat([out, out.new_ones(out.shape[:-1] + (1,))], dim=-1)
        _ACTIVATIONS[out] = True
        return out

    def _output_storage(self, shape: torch.Size) -> Tensor:
        """An uninitialised tensor of ``shape`` for a draw without autograd: the first elements of
        ``output_buffer`` if it has room (then overwritten), else a new one; the whole buffer (or
        the new tensor) is left in ``drawn_output_storage``."""
        buffer = self.output_buffer
        fits = (buffer is not None and buffer.numel() >= shape.numel() and buffer.is_contiguous()
                and buffer.dtype == self.A_mean.dtype and buffer.device == self.A_mean.device)
        if not fits:
            buffer = self.A_mean.new_empty(shape)
        self.drawn_output_storage = buffer
        return buffer.view(-1)[: shape.numel()].view(shape)

    def _activate_in_place(self, out: Tensor) -> Tensor:
        """``out``: ``... x (H + 1)``, pre-activations in the first ``H`` columns. Applies the
        non-linearity to them (ReLU in place) and sets the last column to 1 (no autograd)."""
        pre = out[..., :-1]
        if self.non_linearity in _RELU:
            pre.relu_()
        else:
            pre.copy_(self.non_linearity(pre))
        out[..., -1] = 1.0
        _ACTIVATIONS[out] = True
        return out

    def _flipout_pre_activations(self, sample_shape: torch.Size) -> Tensor:
        """``X @ A_mean + ((X * s_in) @ dA) * s_out``: one ``dA`` per replica, signs per row."""
        X = self.X.expand(sample_shape + self.X.shape)
        lead = sample_shape + self.batch_shape[:-1]
        dA = self.A_scale * torch.randn(lead + self.A_mean.shape, dtype=X.dtype, device=X.device)
        s_in = random_signs(X.shape, X)
        s_out = random_signs(X.shape[:-1] + (self.dim_H,), X)
        Xs = X * s_in
        if not self.batch_shape:
            perturbation = (Xs.unsqueeze(-2) @ dA).squeeze(-2)
        else:
            perturbation = Xs @ dA
        return torch.addcmul(self._X_distinct @ self.A_mean, perturbation, s_out)


@register_kl(HiddenLayer, HiddenLayer)
def _kl_hiddenlayer_hiddenlayer(q: HiddenLayer, p: HiddenLayer) -> Tensor:
    """
    Share per minibatch row of ``KL(N(q.A_mean, q.A_scale) || N(p.A_mean, p.A_scale))``,
    scaled by ``q``'s ``KL_factor`` exactly as :meth:`HiddenLayer.log_prob`.
    """
    if q.A_mean.shape != p.A_mean.shape:
        raise ValueError(
            f"cannot compare HiddenLayers of weight shapes {tuple(q.A_mean.shape)} and {tuple(p.A_mean.shape)}"
        )
    if _broadcast_of(p.A_mean, q.A_prior_mean) and _broadcast_of(p.A_scale, q.A_prior_scale):
        kl = q.KL  # p is q's own prior: reuse the KL already computed for log_prob
    else:
        kl = normal_kl_sum(q.A_mean, q.A_scale, p.A_mean, p.A_scale)
    return q._folded_kl(kl)


def _broadcast_of(t: Tensor, source: Tensor | float) -> bool:
    """Whether ``t`` is ``source`` itself, or ``source`` (one element) expanded: equal values."""
    if t is source:
        return True
    return (
        torch.is_tensor(source)
        and source.numel() == 1
        and t.data_ptr() == source.data_ptr()
        and all(stride == 0 for stride in t.stride())
    )
