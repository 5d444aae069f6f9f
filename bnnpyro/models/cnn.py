r"""
A LeNet-style Bayesian convolutional classifier with a hand-written guide of distribution layers.

``B x C x H x W`` images pass through ``len(channels)`` blocks of a
:class:`~bnnpyro.distributions.ConvLayer` (``kernel_size``, zero padding that keeps the size, ReLU)
and a 2x2 max-pool, are flattened and pass through fully connected
:class:`~bnnpyro.distributions.HiddenLayer` s (ReLU) to ``num_classes`` logits:
``y_n ~ Categorical(logits=f(x_n))`` (LeCun et al., 1998, with Bayesian layers).

*Model*: each layer's site (``conv0``, ``conv1``, ..., ``layer0``, ``layer1``, ...) holds the
prior layer, :math:`\mathcal N(0, s_0^2)` i.i.d. weights (``s0 = prior_scale``, or
``1/sqrt(fan_in)`` per layer with ``prior_scale="fan_in"``); the labels are observed inside
``pyro.plate("data", dataset_size, subsample=arange(B))``. *Guide*: the same sites hold the
variational layers, mean-field Normal weights ``N(mu, softplus(rho)^2)`` with the KL folded in
with ``dataset_size=N``, so that ``SVI(m.model, m.guide, optim, TraceMeanField_ELBO())``
minimises the full-data objective

.. math:: -\mathrm{ELBO} = \frac{N}{B}\sum_{n\in\text{batch}} \mathbb E_q[-\log p(y_n\mid x_n, W)]
          + \mathrm{KL}(q(W)\,\Vert\,p(W))

with the KL counted once per step. Each layer samples with ``estimator``: local
reparameterization by default (for the convolutions the customary approximation, as it samples
positions independently, see :class:`~bnnpyro.distributions.ConvLayer`), or ``"flipout"`` and
``"weight_space"``, which are exact.

Reference: LeCun, Y., Bottou, L., Bengio, Y., Haffner, P. (1998). Gradient-based learning applied
to document recognition. Proc. IEEE.
"""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnpyro._checks import (check_class_labels, check_float_batch, one_of, positive_int, positive_ints,
                             positive_number, prior_scale_or_fan_in)
from bnnpyro.distributions import ConvLayer, HiddenLayer, normal_kl_sum
from bnnpyro.distributions.hidden_layer import ESTIMATORS
from bnnpyro.models._config import ConfigRepr
from bnnpyro.nn.activations import identity, inverse_softplus
from bnnpyro.nn.param_names import NewParamNameOnCopy, new_param_prefix

__all__ = ["BayesianCNNClassifier"]


def _max_pool(h: Tensor) -> Tensor:
    """2x2 max-pool over the last two dims of ``... x C x H x W`` (any leading dims)."""
    lead = h.shape[:-3]
    out = F.max_pool2d(h.reshape((-1,) + h.shape[-3:]), 2)
    return out.reshape(lead + out.shape[1:])


# per model, the (conv draw, pooled draw) pairs of its guide's last training pass, by identity: the
# model's pass, which under replay gets the same draws (the same tensors), takes their pooled values
# from here instead of pooling again (10% of a training step); any other draw is pooled as usual
_GUIDE_POOLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _append_ones(h: Tensor) -> Tensor:
    return torch.cat([h, h.new_ones(h.shape[:-1] + (1,))], dim=-1)


class BayesianCNNClassifier(ConfigRepr, NewParamNameOnCopy, nn.Module):
    r"""
    Bayesian LeNet-style classifier: ``[ConvLayer(k x k, same padding) -> ReLU -> maxpool 2x2] x
    len(channels) -> flatten -> [HiddenLayer -> ReLU] x len(hidden) -> HiddenLayer -> logits``.

    :param int num_classes: ``C >= 2``; ``y`` holds int64 labels in ``[0, C)``.
    :param int dataset_size: ``N``, the number of training images (drives minibatch scaling).
    :param int in_channels: image channels.
    :param image_size: ``(H, W)`` or one int; each block halves it (floor).
    :param channels: output channels of the convolution blocks.
    :param int kernel_size: odd filter size.
    :param hidden: widths of the fully connected hidden layers.
    :param prior_scale: std of the i.i.d. Normal weight prior, or ``"fan_in"``.
    :param float init_scale: initial posterior std of every weight.
    :param str estimator: ``"local_reparameterization"`` (default), ``"flipout"`` or
        ``"weight_space"``, used by every layer of the guide.

    ``x``: ``B x in_channels x H x W`` float images. Use ``SVI(m.model, m.guide, optim,
    TraceMeanField_ELBO())`` and :func:`bnnpyro.sample_predictive` for predictions.
    """

    def __init__(
        self,
        num_classes: int = 10,
        dataset_size: int = 1,
        in_channels: int = 1,
        image_size: int | Sequence[int] = 28,
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 3,
        hidden: Sequence[int] = (128,),
        prior_scale: float | str = 1.0,
        init_scale: float = 1e-2,
        estimator: str = "local_reparameterization",
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        positive_int("dataset_size", dataset_size)
        positive_int("in_channels", in_channels)
        if positive_int("kernel_size", kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2:
            raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
        for s in size:
            positive_int("image_size", s)
        channels, hidden = positive_ints("channels", channels), positive_ints("hidden", hidden)
        if not channels:
            raise ValueError("channels must name at least one convolution block")
        if min(size) < 2 ** len(channels):
            raise ValueError(f"image_size {size} is too small for {len(channels)} 2x2 pooling steps")
        prior_scale_or_fan_in(prior_scale)
        positive_number("init_scale", init_scale)
        one_of("estimator", estimator, ESTIMATORS)

        self.num_classes = num_classes
        self.dataset_size = dataset_size
        self.in_channels = in_channels
        self.image_size = size
        self.estimator = estimator
        rho = inverse_softplus(init_scale)
        self.conv_mean, self.conv_rho = nn.ParameterList(), nn.ParameterList()
        self.conv_bias_mean, self.conv_bias_rho = nn.ParameterList(), nn.ParameterList()
        priors = []
        c_in = in_channels
        for c_out in channels:
            fan_in = c_in * kernel_size**2
            bound = 1.0 / math.sqrt(fan_in)
            self.conv_mean.append(nn.Parameter(torch.empty(c_out, c_in, kernel_size, kernel_size).uniform_(-bound, bound)))
            self.conv_rho.append(nn.Parameter(torch.full((c_out, c_in, kernel_size, kernel_size), rho)))
            self.conv_bias_mean.append(nn.Parameter(torch.zeros(c_out)))
            self.conv_bias_rho.append(nn.Parameter(torch.full((c_out,), rho)))
            priors.append(fan_in)
            c_in = c_out
        h, w = size
        for _ in channels:
            h, w = h // 2, w // 2
        self.sizes = (c_in * h * w, *hidden, num_classes)
        self.fc_mean, self.fc_rho = nn.ParameterList(), nn.ParameterList()
        for d, width in zip(self.sizes[:-1], self.sizes[1:]):
            bound = 1.0 / math.sqrt(d)
            mean = torch.empty(d + 1, width).uniform_(-bound, bound)
            mean[-1].zero_()
            self.fc_mean.append(nn.Parameter(mean))
            self.fc_rho.append(nn.Parameter(torch.full((d + 1, width), rho)))
            priors.append(d)
        for i, fan_in in enumerate(priors):
            scale = 1.0 / math.sqrt(fan_in) if prior_scale == "fan_in" else float(prior_scale)
            self.register_buffer(f"prior_scale_{i}", torch.tensor(scale))
        self.register_buffer("prior_mean", torch.zeros(()))
        self.kernel_size = kernel_size
        self.config = {
            "num_classes": num_classes, "dataset_size": dataset_size, "in_channels": in_channels,
            "image_size": list(size), "channels": list(channels), "kernel_size": kernel_size,
            "hidden": list(hidden), "prior_scale": prior_scale, "init_scale": init_scale,
            "estimator": estimator,
        }
        self._pyro_name = new_param_prefix(type(self).__name__)

    @property
    def num_conv(self) -> int:
        return len(self.conv_mean)

    @property
    def num_fc(self) -> int:
        return len(self.fc_mean)

    @property
    def output_site(self) -> str:
        """Name of the sample site holding the ``B x num_classes`` logits."""
        return f"layer{self.num_fc - 1}"

    def _prior_scale(self, i: int) -> Tensor:
        return getattr(self, f"prior_scale_{i}")

    # -- checks ------------------------------------------------------------------------------

    def _check_x(self, x: Tensor, training: bool) -> None:
        expected = (self.in_channels, *self.image_size)
        shape_ok = torch.is_tensor(x) and x.dim() == 4 and tuple(x.shape[1:]) == expected
        check_float_batch(x, self.conv_mean[0], shape_ok, f"B x {' x '.join(map(str, expected))} images",
                          self.dataset_size, training, unit="images")

    def _check_y(self, x: Tensor, y: Tensor) -> None:
        check_class_labels(x, y, self.num_classes)

    # -- layers ------------------------------------------------------------------------------

    def _conv_layer(self, i: int, X: Tensor, variational: bool) -> ConvLayer:
        # prior layers (the model's) are not re-validated every step: their parameters are the prior's
        # buffers, checked at construction, and X is the checked input or a guide layer's draw
        padding = self.kernel_size // 2
        m0, s0 = self.prior_mean, self._prior_scale(i)
        if variational:
            return ConvLayer(X, self.conv_mean[i], F.softplus(self.conv_rho[i]), padding=padding,
                             bias_mean=self.conv_bias_mean[i], bias_scale=F.softplus(self.conv_bias_rho[i]),
                             W_prior_mean=m0, W_prior_scale=s0, estimator=self.estimator,
                             dataset_size=self.dataset_size)
        shape, bias_shape = self.conv_mean[i].shape, self.conv_bias_mean[i].shape
        return ConvLayer(X, m0.expand(shape), s0.expand(shape), padding=padding,
                         bias_mean=m0.expand(bias_shape), bias_scale=s0.expand(bias_shape),
                         W_prior_mean=m0, W_prior_scale=s0, validate_args=False)

    def _fc_layer(self, j: int, X: Tensor, variational: bool) -> HiddenLayer:
        last = j == self.num_fc - 1
        kwargs = {"non_linearity": identity if last else F.relu, "include_hidden_bias": not last}
        m0, s0 = self.prior_mean, self._prior_scale(self.num_conv + j)
        if variational:
            return HiddenLayer(X, self.fc_mean[j], F.softplus(self.fc_rho[j]), A_prior_mean=m0, A_prior_scale=s0,
                               dataset_size=self.dataset_size, estimator=self.estimator, **kwargs)
        shape = self.fc_mean[j].shape
        m0, s0 = m0.expand(shape), s0.expand(shape)
        return HiddenLayer(X, m0, s0, A_prior_mean=m0, A_prior_scale=s0, validate_args=False, **kwargs)

    def _network(self, x: Tensor, variational: bool) -> Tensor:
        """Sample every layer's site, prior (model) or variational (guide) layers; ``B x C`` logits."""
        h = x
        pooled = _GUIDE_POOLED.setdefault(self, [])
        if variational:
            pooled.clear()  # a new guide pass
        for i in range(self.num_conv):
            draw = pyro.sample(f"conv{i}", self._conv_layer(i, h, variational))
            h = self._pool(draw, pooled, variational)
        X = _append_ones(h.flatten(-3))
        for j in range(self.num_fc):
            X = pyro.sample(f"layer{j}", self._fc_layer(j, X, variational))
        return X

    @staticmethod
    def _pool(draw: Tensor, pooled: list[tuple[Tensor, Tensor]], variational: bool) -> Tensor:
        """``_max_pool(draw)``: recorded by the guide's pass, reused (once) by the model's pass when
        ``draw`` is the very tensor the guide drew (replayed), computed otherwise."""
        if variational:
            out = _max_pool(draw)
            if torch.is_grad_enabled():  # training; a prediction's S x B pooled draws are not kept
                pooled.append((draw, out))
            return out
        for k, (guide_draw, out) in enumerate(pooled):
            if guide_draw is draw:
                del pooled[k]
                return out
        return _max_pool(draw)

    def _plate(self, x: Tensor) -> pyro.plate:
        return pyro.plate("data", self.dataset_size, subsample=torch.arange(x.size(0), device=x.device))

    def model(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Pyro model: prior layers, then ``y ~ Categorical(logits=f)``; returns the logits ``f``."""
        self._check_x(x, training=y is not None)
        if y is not None:
            self._check_y(x, y)
        with self._plate(x):
            f = self._network(x, variational=False)
            pyro.sample("y", dist.Categorical(logits=f), obs=y)
        return f

    def guide(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Pyro guide: mean-field Normal over every filter and weight, sampled with ``estimator``."""
        self._check_x(x, training=y is not None)
        pyro.module(self._pyro_name, self)
        with self._plate(x):
            return self._network(x, variational=True)

    def kl(self) -> Tensor:
        """Closed-form ``KL(q || p)`` summed over all filters, biases and weights (a scalar)."""
        kl = self.prior_mean.new_zeros(())
        for i in range(self.num_conv):
            s0 = self._prior_scale(i)
            kl = kl + normal_kl_sum(self.conv_mean[i], F.softplus(self.conv_rho[i]), self.prior_mean, s0)
            kl = kl + normal_kl_sum(self.conv_bias_mean[i], F.softplus(self.conv_bias_rho[i]), self.prior_mean, s0)
        for j in range(self.num_fc):
            s0 = self._prior_scale(self.num_conv + j)
            kl = kl + normal_kl_sum(self.fc_mean[j], F.softplus(self.fc_rho[j]), self.prior_mean, s0)
        return kl
