"""Weight priors: the scale mixture of Blundell et al. (2015) and a prior specification."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.distributions import Normal
from pyro.distributions.torch_distribution import TorchDistribution
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all


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
        if self.scale <= 0 or self.sigma1 <= 0 or self.sigma2 <= 0:
            raise ValueError("prior scales must be positive")
        if not 0 < self.pi < 1:
            raise ValueError(f"pi must be in (0, 1), got {self.pi}")

    @property
    def has_closed_form_kl(self) -> bool:
        return self.kind == "normal"

    def __call__(self, shape, device=None, dtype=torch.float32) -> TorchDistribution:
        """The prior over a weight tensor of ``shape``, as one event of ``len(shape)`` dims."""
        shape = torch.Size(shape)
        def t(v):
            return torch.tensor(v, device=device, dtype=dtype)
        if self.kind == "normal":
            base = Normal(t(self.mean), t(self.scale))
        else:
            base = ScaleMixtureNormal(t(self.pi), t(self.sigma1), t(self.sigma2))
        return base.expand(shape).to_event(len(shape))
