r"""
A Bayesian ``nn.Linear`` for Pyro's autoguides, whose forward accepts batched weight draws.

The weight and bias are :class:`~pyro.nn.PyroSample` sites, so any autoguide
(``AutoNormal``, ``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal``, ...) can fit a
posterior over them. Under an outer ``pyro.plate`` over posterior draws (e.g.
``pyro.infer.Predictive(..., parallel=True)`` or ``vectorize_particles=True``) the sites gain
leading sample dimensions; the forward broadcasts over them with one batched matmul instead
of failing like ``F.linear`` in ``PyroModule[nn.Linear]``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule, PyroSample
from torch import Tensor

from bnnpyro._checks import prior_scale_or_fan_in
from bnnpyro.distributions.factorized_normal import FactorizedNormal
from bnnpyro.distributions.priors import Prior, ScaleMixtureNormal

_PRIOR_FIELDS = {"normal": ("mean", "scale"), "scale_mixture": ("pi", "sigma1", "sigma2")}


def _resolve_prior(prior: Optional[Prior], prior_scale: float | str, in_features: int) -> Prior:
    r"""
    The prior of a layer with ``in_features`` inputs: ``prior`` if given, else
    :math:`\mathcal N(0, s^2)` with ``s = prior_scale``, or ``s = 1/\sqrt{\text{in\_features}}``
    for ``prior_scale="fan_in"`` (the layer-wise scale rule).

    Raises:
        ValueError: both ``prior`` and a ``prior_scale`` other than 1.0 are given; ``prior``
            is not a :class:`~bnnpyro.distributions.priors.Prior`; ``prior_scale`` is neither a
            positive number nor ``"fan_in"``.
    """
    if prior is not None:
        if not isinstance(prior, Prior):
            raise ValueError(f"prior must be a bnnpyro Prior or None, got {prior!r}")
        if prior_scale != 1.0:
            raise ValueError(f"give either prior or prior_scale, not both (got prior_scale={prior_scale!r})")
        return prior
    if prior_scale_or_fan_in(prior_scale) == "fan_in":
        return Prior("normal", 0.0, 1.0 / math.sqrt(in_features))
    return Prior("normal", 0.0, float(prior_scale))


class BayesianLinear(PyroModule):
    r"""
    ``nn.Linear(in_features, out_features, bias)`` with random weight and bias:
    :math:`y = x W^\top + b`, with sample sites ``<name>.weight`` (``out x in``, nn.Linear's
    layout) and ``<name>.bias`` (``out``), each with an i.i.d. prior over the whole tensor
    (one event of 2 resp. 1 dims). The prior is ``prior`` if given, else
    :math:`\mathcal N(0, \text{prior\_scale}^2)`; ``prior_scale="fan_in"`` gives
    :math:`\mathcal N(0, 1/\text{in\_features})`. ``Prior("scale_mixture", ...)`` is the
    scale-mixture prior of Blundell et al. (2015).

    The prior's parameters are made from its Python numbers on the module's device and in its dtype
    (tracked by an empty buffer, so ``.to(device/dtype)`` moves them), once per device and dtype:
    each draw builds its distribution without allocating new tensors, and a float64 module has the
    exact values whether it was built in float64 or cast.

    **Batched weights.** ``forward`` computes ``matmul(x, W^T) + b.unsqueeze(-2)`` with torch's
    broadcasting: for ``x`` of shape ``*X x B x in`` and a weight of shape ``*S x out x in``
    (``*S`` leading sample dimensions, e.g. ``S`` for stacked draws, or ``S x 1`` under an
    outer ``pyro.plate`` at dim -2 when the layer is called outside a data plate at dim -1),
    bias ``*S x out``, the output is ``broadcast(*S, *X) x B x out``: draw ``s`` maps every row
    of ``x`` with ``W[s]``. Without sample dimensions this is exactly ``nn.Linear``.

    :param in_features: input width ``D``.
    :param out_features: output width ``H``.
    :param bias: whether the layer has a random bias.
    :param prior: the i.i.d. weight prior; ``None`` for a zero-mean Normal of ``prior_scale``.
    :param prior_scale: scale of the default Normal prior, or ``"fan_in"``.

    Reference: Blundell, C., Cornebise, J., Kavukcuoglu, K., Wierstra, D. (2015). Weight
    uncertainty in neural networks. ICML.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        prior: Optional[Prior] = None,
        prior_scale: float | str = 1.0,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.prior = _resolve_prior(prior, prior_scale, in_features)
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        # an empty buffer: .to() moves it, and the prior's tensors follow it (_prior_params)
        self.register_buffer("_prior_anchor", torch.empty(0, device=device, dtype=dtype), persistent=False)
        self._prior_params_key: Optional[tuple[torch.device, torch.dtype, Prior]] = None
        self._prior_params_cache: list[Tensor] = []
        self.has_bias = bool(bias)
        # partials, not methods: PyroSample renames named callables, which breaks pickling
        self.weight = PyroSample(partial(BayesianLinear.prior_distribution, shape=(out_features, in_features)))
        self.bias = PyroSample(partial(BayesianLinear.prior_distribution, shape=(out_features,))) if bias else None

    def _prior_params(self) -> list[Tensor]:
        """The prior's parameters as 0-d tensors on the module's device and in its dtype, made from
        the prior's Python numbers (so a float64 module has the exact values however it became
        float64: built so, or cast), once per device and dtype."""
        key = (self._prior_anchor.device, self._prior_anchor.dtype, self.prior)  # .prior may be reassigned
        if key != self._prior_params_key:
            self._prior_params_cache = [torch.tensor(getattr(self.prior, field), device=key[0], dtype=key[1])
                                        for field in _PRIOR_FIELDS[self.prior.kind]]
            self._prior_params_key = key
        return self._prior_params_cache

    def prior_distribution(self, shape: torch.Size | tuple[int, ...]) -> TorchDistribution:
        """The prior over a tensor of ``shape``, as one event, on the module's device and dtype."""
        params = self._prior_params()
        shape = torch.Size(shape)
        # the values were validated by Prior; skipping validation avoids a device sync per draw
        if self.prior.kind == "normal":
            # Pyro computes every model site's log density, even where TraceMeanField_ELBO then uses
            # the KL: as one event over the tensor it is a norm (one pass, no out x in temporaries)
            return FactorizedNormal(*params, shape, validate_args=False)
        return ScaleMixtureNormal(*params, validate_args=False).expand(shape).to_event(len(shape))

    def forward(self, x: Tensor) -> Tensor:
        """
        ``*X x B x in`` -> ``broadcast(*S, *X) x B x out`` (``*S``: the weights' sample dims).
        A single draw (``out x in`` weight) is applied with ``F.linear``, which also takes ``x``
        of shape ``in`` as ``nn.Linear`` does, and which the estimator handlers of
        :mod:`bnnpyro.nn.estimators` intercept; batched draws use one batched ``matmul``.

        Raises:
            ValueError: the last dim of ``x`` is not ``in_features``, or ``x`` has fewer than 2
                dims with batched weights.
        """
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be (... x) B x {self.in_features}, got shape {tuple(x.shape)}")
        weight = self.weight
        bias = self.bias if self.has_bias else None
        if weight.dim() == 2 and (bias is None or bias.dim() == 1):
            return F.linear(x, weight, bias)
        if x.dim() < 2:
            raise ValueError(f"x must be (... x) B x {self.in_features} with batched weights, "
                             f"got shape {tuple(x.shape)}")
        out = torch.matmul(x, weight.transpose(-1, -2))
        return out + bias.unsqueeze(-2) if bias is not None else out

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"
        return s if self.prior is None else s + f", prior={self.prior}"  # None: see to_bayesian
