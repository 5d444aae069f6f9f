"""Weight priors: the scale mixture of Blundell et al. (2015), an i.i.d. prior specification, and
per-parameter prior modules (Normal with any mean and scale, optionally a learned scale; scale mixture)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from pyro.distributions import Normal
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule, PyroParam
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from bnnpyro.distributions.factorized_normal import FactorizedNormal


class ScaleMixtureNormal(TorchDistribution):
    r"""
    Zero-mean scale mixture of two Normals (Blundell et al., 2015, eq. 7):

    .. math::

        p(w) = \pi\,\mathcal N(w; 0, \sigma_1^2) + (1 - \pi)\,\mathcal N(w; 0, \sigma_2^2).

    There is no closed-form KL from a Normal to this prior; ``TraceMeanField_ELBO``
    falls back to the Monte Carlo estimate ``log q(w) - log p(w)``.

    :param pi: mixture weight of the first component, in ``(0, 1)``.
    :param sigma1: scale of the first (wide) component.
    :param sigma2: scale of the second (narrow) component.

    Reference: Blundell, C., Cornebise, J., Kavukcuoglu, K., Wierstra, D. (2015).
    Weight uncertainty in neural networks. ICML.
    """

    arg_constraints = {
        "pi": constraints.unit_interval,
        "sigma1": constraints.positive,
        "sigma2": constraints.positive,
    }
    support = constraints.real
    has_rsample = False

    def __init__(self, pi, sigma1, sigma2, validate_args=None) -> None:
        self.pi, self.sigma1, self.sigma2 = broadcast_all(pi, sigma1, sigma2)
        super().__init__(self.pi.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> "ScaleMixtureNormal":
        new = self._get_checked_instance(ScaleMixtureNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.pi = self.pi.expand(batch_shape)
        new.sigma1 = self.sigma1.expand(batch_shape)
        new.sigma2 = self.sigma2.expand(batch_shape)
        super(ScaleMixtureNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        return torch.zeros_like(self.pi)

    @property
    def variance(self) -> Tensor:
        return self.pi * self.sigma1**2 + (1 - self.pi) * self.sigma2**2

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            first = torch.rand(shape, dtype=self.pi.dtype, device=self.pi.device) < self.pi
            scale = torch.where(first, self.sigma1, self.sigma2)
            return scale * torch.randn(shape, dtype=self.pi.dtype, device=self.pi.device)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        lp1 = Normal(0.0, self.sigma1).log_prob(value) + torch.log(self.pi)
        lp2 = Normal(0.0, self.sigma2).log_prob(value) + torch.log1p(-self.pi)
        return torch.logaddexp(lp1, lp2)


@dataclass(frozen=True)
class Prior:
    r"""
    Specification of an i.i.d. weight prior, turned into a distribution by :meth:`__call__`.

    ``kind="normal"``: :math:`\mathcal N(\text{mean}, \text{scale}^2)`.
    ``kind="scale_mixture"``: :class:`ScaleMixtureNormal` ``(pi, sigma1, sigma2)``;
    the defaults are those of Fortunato et al. (2017): ``pi=0.25``,
    ``sigma1=exp(-1)``, ``sigma2=exp(-7)``.
    """

    kind: str = "normal"
    mean: float = 0.0
    scale: float = 1.0
    pi: float = 0.25
    sigma1: float = math.exp(-1)
    sigma2: float = math.exp(-7)

    def __post_init__(self) -> None:
        if self.kind not in ("normal", "scale_mixture"):
            raise ValueError(f"Prior kind must be 'normal' or 'scale_mixture', got {self.kind!r}")
        # the layers build their prior distributions from these fields without validating them again
        for name in ("mean", "scale", "pi", "sigma1", "sigma2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise ValueError(f"Prior {name} must be a finite number, got {value!r}")
        if self.scale <= 0 or self.sigma1 <= 0 or self.sigma2 <= 0:
            raise ValueError("prior scales must be positive")
        if not 0 < self.pi < 1:
            raise ValueError(f"pi must be in (0, 1), got {self.pi}")

    @property
    def has_closed_form_kl(self) -> bool:
        return self.kind == "normal"

    def __repr__(self) -> str:
        """The fields of its ``kind`` only (a scale mixture ignores ``mean`` and ``scale``)."""
        names = ("mean", "scale") if self.kind == "normal" else ("pi", "sigma1", "sigma2")
        return f"Prior(kind={self.kind!r}, " + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"

    def __call__(self, shape, device=None, dtype=None) -> TorchDistribution:
        """The prior over a weight tensor of ``shape``, as one event of ``len(shape)`` dims, in
        ``dtype`` (default: torch's default dtype, as ``torch.tensor`` of a float)."""
        shape = torch.Size(shape)
        dtype = torch.get_default_dtype() if dtype is None else dtype

        def t(v):
            return torch.tensor(v, device=device, dtype=dtype)
        if self.kind == "normal":
            return FactorizedNormal(t(self.mean), t(self.scale), shape)
        base = ScaleMixtureNormal(t(self.pi), t(self.sigma1), t(self.sigma2))
        return base.expand(shape).to_event(len(shape))


class ParameterPrior(PyroModule):
    r"""
    The prior over one parameter tensor of a fixed ``shape``, as a module: calling it returns the
    distribution (one event of ``len(shape)`` dims) used as that parameter's
    :class:`~pyro.nn.PyroSample` prior. Being a module, its tensors move with ``.to()`` and are
    saved in ``state_dict``, and it may hold learnable :class:`~pyro.nn.PyroParam` s (which SVI
    then fits by maximising the ELBO: empirical Bayes).
    """

    def __init__(self, shape: torch.Size | tuple[int, ...]) -> None:
        super().__init__()
        self.shape = torch.Size(shape)

    def forward(self) -> TorchDistribution:
        raise NotImplementedError


def _prior_tensor(name: str, value: float | Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """``value`` as a detached floating-point tensor (copied) that broadcasts to ``shape``: a
    floating-point tensor keeps its dtype, numbers and integer tensors take ``dtype``."""
    keep = isinstance(value, Tensor) and value.is_floating_point()
    value = torch.as_tensor(value, dtype=value.dtype if keep else dtype).detach().clone()
    try:
        if torch.broadcast_shapes(value.shape, shape) != shape:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to {tuple(shape)}") from None
    return value


class NormalPrior(ParameterPrior):
    r"""
    :math:`w \sim \mathcal N(\text{loc}, \text{scale}^2)` elementwise over a tensor of ``shape``.
    ``loc`` and ``scale`` are numbers (one value for the whole tensor, e.g. per layer) or tensors
    broadcastable to ``shape`` (e.g. one value per element); both are stored as buffers.

    With ``learn_scale=True``, ``scale`` is instead a positive :class:`~pyro.nn.PyroParam`
    initialised at the given value: SVI learns it by maximising the ELBO, through the analytic KL
    (``TraceMeanField_ELBO`` with a guide that has Normal sites, e.g.
    :class:`~bnnpyro.infer.AnalyticAutoNormal`) or through :math:`\log p(w)`. With ``loc`` the
    weights of a trained network this is the empirical-Bayes prior of MOPED (Krishnan et al.,
    2020): centred on the deterministic solution, its width fitted to the data.

    :param shape: the parameter's shape.
    :param loc: prior mean, number or tensor broadcastable to ``shape``.
    :param scale: prior standard deviation (initial value if learned), positive.
    :param learn_scale: learn ``scale`` as a :class:`~pyro.nn.PyroParam`.

    Raises:
        ValueError: ``loc`` or ``scale`` does not broadcast to ``shape``; ``loc`` not finite;
            ``scale`` not positive and finite.

    Reference: Krishnan, R., Subedar, M., Tickoo, O. (2020). Specifying weight priors in Bayesian
    deep neural networks with empirical Bayes. AAAI.
    """

    def __init__(
        self,
        shape: torch.Size | tuple[int, ...],
        loc: float | Tensor = 0.0,
        scale: float | Tensor = 1.0,
        learn_scale: bool = False,
    ) -> None:
        super().__init__(shape)
        loc = _prior_tensor("loc", loc, self.shape, torch.get_default_dtype())
        scale = _prior_tensor("scale", scale, self.shape, loc.dtype)
        if not torch.isfinite(loc).all():
            raise ValueError("loc contains NaN or infinite values")
        if not ((scale > 0) & torch.isfinite(scale)).all():
            raise ValueError("scale must be positive and finite")
        self.learn_scale = bool(learn_scale)
        self.register_buffer("loc", loc)
        if self.learn_scale:
            self.scale = PyroParam(scale, constraints.positive)
        else:
            self.register_buffer("scale", scale)

    def forward(self) -> TorchDistribution:
        # loc and scale were validated at construction (scale learned under a positive constraint)
        return FactorizedNormal(self.loc, self.scale, self.shape, validate_args=False)

    def extra_repr(self) -> str:
        def show(t: Tensor) -> str:
            return f"{t.item():.4g}" if t.numel() == 1 else f"tensor of shape {tuple(t.shape)}"
        scale = self.scale.detach()
        return (f"shape={tuple(self.shape)}, loc={show(self.loc)}, scale={show(scale)}"
                + (", learn_scale=True" if self.learn_scale else ""))


class ScaleMixturePrior(ParameterPrior):
    r"""
    :class:`ScaleMixtureNormal` ``(pi, sigma1, sigma2)`` elementwise over a tensor of ``shape``
    (the scale-mixture prior of Blundell et al., 2015), its parameters 0-d buffers.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], pi: float, sigma1: float, sigma2: float) -> None:
        super().__init__(shape)
        Prior("scale_mixture", pi=pi, sigma1=sigma1, sigma2=sigma2)  # validates
        for name, value in (("pi", pi), ("sigma1", sigma1), ("sigma2", sigma2)):
            self.register_buffer(name, torch.tensor(float(value)))

    def forward(self) -> TorchDistribution:
        base = ScaleMixtureNormal(self.pi, self.sigma1, self.sigma2, validate_args=False)
        return base.expand(self.shape).to_event(len(self.shape))

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, pi={self.pi.item():.4g}, sigma1={self.sigma1.item():.4g}, "
                f"sigma2={self.sigma2.item():.4g}")


def parameter_prior(prior: Prior, shape: torch.Size | tuple[int, ...]) -> ParameterPrior:
    """The :class:`ParameterPrior` over a tensor of ``shape`` with the i.i.d. prior ``prior``."""
    if not isinstance(prior, Prior):
        raise TypeError(f"prior must be a bnnpyro Prior, got {type(prior).__name__}")
    if prior.kind == "normal":
        return NormalPrior(shape, prior.mean, prior.scale)
    return ScaleMixturePrior(shape, prior.pi, prior.sigma1, prior.sigma2)
