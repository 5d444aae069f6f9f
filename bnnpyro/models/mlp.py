"""Bayesian MLPs with hand-written local-reparameterization guides: regressor and classifier."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnnpyro._checks import (check_class_labels, check_finite, check_float_batch, one_of, positive_int, positive_ints,
                             positive_number, prior_scale_or_fan_in)
from bnnpyro.distributions import HiddenLayer, normal_kl_sum
from bnnpyro.distributions.hidden_layer import ESTIMATORS
from bnnpyro.models._config import ConfigRepr
from bnnpyro.nn.activations import identity, inverse_softplus, resolve_non_linearity
from bnnpyro.nn.param_names import NewParamNameOnCopy, new_param_prefix


class _HiddenLayerMLP(ConfigRepr, NewParamNameOnCopy, nn.Module):
    r"""
    Shared plumbing of the catalogue MLPs: ``in_features -> hidden... -> out_width``, every
    layer a :class:`~bnnpyro.distributions.HiddenLayer` (local reparameterization).

    *Model*: each layer's site holds the prior layer ``HiddenLayer(X, m0, s0)`` with
    ``A ~ N(m0, s0^2)`` i.i.d. (``m0 = 0``; ``s0 = prior_scale``, or ``1/sqrt(fan_in)`` with
    ``prior_scale="fan_in"``); the likelihood is observed inside
    ``pyro.plate("data", dataset_size, subsample=arange(B))``.
    *Guide*: the same sites hold ``HiddenLayer(X, mu, softplus(rho), dataset_size=N)``, whose
    folded KL the plate scales back to exactly one KL per step, so that

    .. math:: -\mathrm{ELBO} = \frac{N}{B}\sum_{n\in\text{batch}} \mathbb E_q[-\log p(y_n\mid x_n, A)]
              + \mathrm{KL}(q(A)\,\Vert\,p(A)).

    Each layer's weight matrix is ``(D + 1) x H``: its last row is the bias, multiplied by the
    column of ones appended to the layer's input. Parameters are registered with Pyro's param
    store under a name unique to the instance, so several models can train in one process.
    """

    def __init__(
        self,
        in_features: int,
        out_width: int,
        hidden: Sequence[int],
        dataset_size: int,
        prior_scale: float | str,
        non_linearity: str | Callable[[Tensor], Tensor],
        init_scale: float,
        estimator: str = "local_reparameterization",
    ) -> None:
        super().__init__()
        positive_int("in_features", in_features)
        positive_int("dataset_size", dataset_size)
        hidden = positive_ints("hidden", hidden)
        self._non_linearity = resolve_non_linearity(non_linearity)
        prior_scale_or_fan_in(prior_scale)
        positive_number("init_scale", init_scale)
        one_of("estimator", estimator, ESTIMATORS)
        self.estimator = estimator

        self.in_features = in_features
        self.hidden = hidden
        self.dataset_size = dataset_size
        self.sizes = (in_features, *hidden, out_width)
        self.A_mean = nn.ParameterList()
        self.A_rho = nn.ParameterList()
        for layer, (d, h) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            bound = 1.0 / math.sqrt(d)
            mean = torch.empty(d + 1, h).uniform_(-bound, bound)
            mean[-1].zero_()
            self.A_mean.append(nn.Parameter(mean))
            self.A_rho.append(nn.Parameter(torch.full((d + 1, h), inverse_softplus(init_scale))))
            scale = 1.0 / math.sqrt(d) if prior_scale == "fan_in" else float(prior_scale)
            self.register_buffer(f"prior_mean_{layer}", torch.zeros(()))
            self.register_buffer(f"prior_scale_{layer}", torch.tensor(scale))
        self._pyro_name = new_param_prefix(type(self).__name__)

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def output_site(self) -> str:
        """Name of the sample site holding the network output ``f`` (``B x out_width``)."""
        return f"layer{self.num_layers - 1}"

    def _layer_kwargs(self, layer: int) -> dict:
        last = layer == self.num_layers - 1
        return {
            "non_linearity": identity if last else self._non_linearity,
            "include_hidden_bias": not last,
        }

    def _prior(self, layer: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"prior_mean_{layer}"), getattr(self, f"prior_scale_{layer}")

    def _plate(self, x: Tensor) -> pyro.plate:
        return pyro.plate("data", self.dataset_size, subsample=torch.arange(x.size(0), device=x.device))

    def _check_x(self, x: Tensor, training: bool) -> None:
        shape_ok = torch.is_tensor(x) and x.dim() == 2 and x.size(-1) == self.in_features
        check_float_batch(x, self.A_mean[0], shape_ok, f"B x {self.in_features}", self.dataset_size, training)

    def _check_y(self, x: Tensor, y: Tensor) -> None:
        raise NotImplementedError

    def likelihood(self, f: Tensor) -> dist.Distribution:
        """The observation distribution given the network output ``f`` (``... x B x out_width``)."""
        raise NotImplementedError

    def model(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Pyro model: prior layers, then ``y ~ likelihood(f)``. ``x``: ``B x in_features``."""
        self._check_x(x, training=y is not None)
        if y is not None:
            self._check_y(x, y)
        # the parameters are registered with Pyro once per step, by the guide (SVI optimizes the
        # parameters of both traces; the model uses the module's tensors directly)
        X = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
        with self._plate(x):
            for layer in range(self.num_layers):
                mean, scale = self._prior(layer)
                shape = self.A_mean[layer].shape
                m0, s0 = mean.expand(shape), scale.expand(shape)
                X = pyro.sample(
                    f"layer{layer}",
                    # the prior layer is not re-validated every step: its parameters are the prior's
                    # buffers, checked at construction, and X the checked x or a guide layer's draw
                    HiddenLayer(X, m0, s0, A_prior_mean=m0, A_prior_scale=s0, validate_args=False,
                                **self._layer_kwargs(layer)),
                )
            pyro.sample("y", self.likelihood(X), obs=y)
        return X

    def guide(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Pyro guide: mean-field Normal over every weight, sampled by local reparameterization."""
        self._check_x(x, training=y is not None)
        pyro.module(self._pyro_name, self)
        X = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
        with self._plate(x):
            for layer in range(self.num_layers):
                mean, scale = self._prior(layer)
                X = pyro.sample(
                    f"layer{layer}",
                    HiddenLayer(
                        X,
                        self.A_mean[layer],
                        F.softplus(self.A_rho[layer]),
                        A_prior_mean=mean,
                        A_prior_scale=scale,
                        dataset_size=self.dataset_size,
                        estimator=self.estimator,
                        **self._layer_kwargs(layer),
                    ),
                )
        return X

    def kl(self) -> Tensor:
        """Closed-form ``KL(q || p)`` summed over all weights (a scalar)."""
        return sum(
            normal_kl_sum(self.A_mean[layer], F.softplus(self.A_rho[layer]), *self._prior(layer))
            for layer in range(self.num_layers)
        )


class BayesianMLPRegressor(_HiddenLayerMLP):
    r"""
    Bayesian MLP regressor with a hand-written local-reparameterization guide.

    ``y_n ~ Normal(f(x_n), sigma)``, with ``sigma`` a learned homoscedastic noise scale
    (``noise="learned"``, point-estimated, initialised at ``noise_scale``), a fixed one
    (``noise="fixed"``) or an input-dependent one (``noise="heteroscedastic"``: the network has
    ``2 * out_features`` outputs, ``sigma = softplus(f[..., out:]) + min_noise``).

    :param int in_features: ``D``.
    :param int out_features: output dimension; ``y`` is ``B`` when 1, else ``B x out_features``.
    :param hidden: hidden layer widths, default ``(50,)``.
    :param int dataset_size: ``N``, the number of training points (drives minibatch scaling).
    :param prior_scale: std of the i.i.d. Normal weight prior, or ``"fan_in"`` for
        ``1/sqrt(fan_in)`` per layer.
    :param non_linearity: ``"relu"`` (default), ``"tanh"``, ... or a callable.
    :param float init_scale: initial posterior std of every weight.
    :param str estimator: how the guide's layers sample: ``"local_reparameterization"``
        (default), ``"flipout"`` or ``"weight_space"`` (see :class:`~bnnpyro.distributions.HiddenLayer`).

    Use ``SVI(m.model, m.guide, optim, TraceMeanField_ELBO())`` and step on minibatches.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        hidden: Sequence[int] = (50,),
        dataset_size: int = 1,
        prior_scale: float | str = 1.0,
        non_linearity: str | Callable[[Tensor], Tensor] = "relu",
        noise: str = "learned",
        noise_scale: float = 1.0,
        min_noise: float = 1e-3,
        init_scale: float = 1e-2,
        estimator: str = "local_reparameterization",
    ) -> None:
        if noise not in ("learned", "fixed", "heteroscedastic"):
            raise ValueError(f"noise must be 'learned', 'fixed' or 'heteroscedastic', got {noise!r}")
        positive_int("out_features", out_features)
        positive_number("noise_scale", noise_scale)
        if isinstance(min_noise, bool) or not isinstance(min_noise, (int, float)) or not min_noise >= 0:
            raise ValueError(f"min_noise must be a non-negative float, got {min_noise!r}")
        width = 2 * out_features if noise == "heteroscedastic" else out_features
        super().__init__(in_features, width, hidden, dataset_size, prior_scale, non_linearity, init_scale, estimator)
        self.out_features = out_features
        self.noise = noise
        self.min_noise = min_noise
        if noise == "learned":
            self.noise_rho = nn.Parameter(torch.tensor(inverse_softplus(noise_scale)))
        else:
            self.register_buffer("noise_scale", torch.tensor(float(noise_scale)))
        self.config = {
            "in_features": in_features,
            "out_features": out_features,
            "hidden": list(self.hidden),
            "dataset_size": dataset_size,
            "prior_scale": prior_scale,
            "non_linearity": non_linearity if isinstance(non_linearity, str) else None,
            "noise": noise,
            "noise_scale": noise_scale,
            "min_noise": min_noise,
            "init_scale": init_scale,
            "estimator": estimator,
        }

    def mean_and_scale(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """Predictive mean and noise std given network outputs ``f`` (``... x B x width``)."""
        out = self.out_features
        if self.noise == "heteroscedastic":
            mean, scale = f[..., :out], F.softplus(f[..., out:]) + self.min_noise
        else:
            mean = f
            scale = F.softplus(self.noise_rho) if self.noise == "learned" else self.noise_scale
            scale = scale.expand(mean.shape)
        if out == 1:
            mean, scale = mean.squeeze(-1), scale.squeeze(-1)
        return mean, scale

    def likelihood(self, f: Tensor) -> dist.Distribution:
        mean, scale = self.mean_and_scale(f)
        d = dist.Normal(mean, scale)
        return d if self.out_features == 1 else d.to_event(1)

    def _check_y(self, x: Tensor, y: Tensor) -> None:
        if not torch.is_tensor(y) or not y.is_floating_point():
            raise TypeError(f"y must be a floating-point tensor, got {getattr(y, 'dtype', type(y).__name__)}")
        expected = (x.size(0),) if self.out_features == 1 else (x.size(0), self.out_features)
        if tuple(y.shape) != expected:
            raise ValueError(f"y must have shape {expected} for x of shape {tuple(x.shape)}, got {tuple(y.shape)}")
        check_finite("y", y)


class BayesianMLPClassifier(_HiddenLayerMLP):
    r"""
    Bayesian MLP classifier with a hand-written local-reparameterization guide:
    ``y_n ~ Categorical(logits=f(x_n))``.

    :param int in_features: ``D``.
    :param int num_classes: ``C``; ``y`` holds int64 labels in ``[0, C)``.
    :param hidden: hidden layer widths, default ``(50,)``.
    :param int dataset_size: ``N``, the number of training points.
    :param prior_scale: std of the i.i.d. Normal weight prior, or ``"fan_in"``.
    :param non_linearity: ``"relu"`` (default), ``"tanh"``, ... or a callable.
    :param float init_scale: initial posterior std of every weight.
    :param str estimator: ``"local_reparameterization"`` (default), ``"flipout"`` or ``"weight_space"``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (50,),
        dataset_size: int = 1,
        prior_scale: float | str = 1.0,
        non_linearity: str | Callable[[Tensor], Tensor] = "relu",
        init_scale: float = 1e-2,
        estimator: str = "local_reparameterization",
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        super().__init__(in_features, num_classes, hidden, dataset_size, prior_scale, non_linearity, init_scale,
                         estimator)
        self.num_classes = num_classes
        self.config = {
            "in_features": in_features,
            "num_classes": num_classes,
            "hidden": list(self.hidden),
            "dataset_size": dataset_size,
            "prior_scale": prior_scale,
            "non_linearity": non_linearity if isinstance(non_linearity, str) else None,
            "init_scale": init_scale,
            "estimator": estimator,
        }

    def likelihood(self, f: Tensor) -> dist.Distribution:
        return dist.Categorical(logits=f)

    def _check_y(self, x: Tensor, y: Tensor) -> None:
        check_class_labels(x, y, self.num_classes)
