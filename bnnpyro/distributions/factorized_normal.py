"""Independent Normals over a whole weight tensor, as one event, with summed closed forms."""

from __future__ import annotations

import math

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import Tensor
from torch.distributions import Independent, Normal, constraints
from torch.distributions.kl import register_kl
from torch.utils.weak import WeakIdKeyDictionary

from bnnpyro.distributions._shapes import broadcast_shapes
from bnnpyro.distributions._validation import check_value_shape
from bnnpyro.distributions.kl import accumulation_dtype, constant_value, normal_kl_sum, sum_event, sum_squares

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# the draws of every FactorizedNormal (by identity, while they live): real wherever their loc and
# scale are, so another FactorizedNormal (the prior at the model's site) checks only their shape
_DRAWS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class FactorizedNormal(TorchDistribution):
    r"""
    Independent :math:`\mathcal N(\mu_i, \sigma_i^2)` over every element of a tensor, as **one
    event**: the distribution of ``Normal(loc, scale).to_event(len(event_shape))``, written for
    the weight sites of a Bayesian network, where ``event_shape`` is a whole weight tensor
    (millions of entries for an embedding or a 10,000-way output layer).

    The same densities, computed as sums over the event instead of elementwise tensors:

    - :meth:`log_prob` of the distribution's own last :meth:`rsample`
      :math:`w = \mu + \sigma \odot \varepsilon` is
      :math:`-\tfrac12 \lVert\varepsilon\rVert^2 - \sum_i \log\sigma_i - \tfrac n2 \log 2\pi`
      (a norm of the stored noise; its gradient in :math:`\mu, \sigma` is the total derivative of
      the usual formula through :math:`w`, which is :math:`-\partial \sum_i\log\sigma_i`);
    - with a scalar ``loc`` and ``scale`` (an i.i.d. prior) the log density of any value is
      :math:`-\lVert w - \mu\rVert^2 / (2\sigma^2) - n \log\sigma - \tfrac n2 \log 2\pi`;
    - :func:`torch.distributions.kl_divergence` to a ``FactorizedNormal`` (or to
      ``Normal(...).to_event(k)`` of the same event shape) with a scalar prior is
      :func:`~bnnpyro.distributions.normal_kl_sum`'s three sums.

    ``Trace_ELBO``-style estimators get the same values and gradients as with
    ``Normal(loc, scale).to_event(k)``; ``TraceMeanField_ELBO`` finds the closed-form KL. Pyro
    computes the log density of every site it traces, even where the ELBO then uses the KL: for a
    ``V x E`` table the elementwise ``Normal.log_prob`` (model and guide) and ``Normal``-``Normal``
    KL make some 30 passes over the table per step, these forms about 8.

    :param loc: mean, a number or a tensor broadcastable to ``batch_shape + event_shape``.
    :param scale: positive standard deviation, likewise.
    :param event_shape: the shape of one draw (the weight tensor's shape); by default the
        broadcast shape of ``loc`` and ``scale`` (no batch dimensions).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(
        self,
        loc: Tensor | float,
        scale: Tensor | float,
        event_shape: torch.Size | tuple[int, ...] | None = None,
        validate_args: bool | None = None,
    ) -> None:
        like = loc if torch.is_tensor(loc) else scale if torch.is_tensor(scale) else None
        kwargs = {} if like is None else {"dtype": like.dtype, "device": like.device}
        self.loc = torch.as_tensor(loc, **kwargs)
        self.scale = torch.as_tensor(scale, **kwargs)
        shape = broadcast_shapes(self.loc.shape, self.scale.shape)
        event_shape = shape if event_shape is None else torch.Size(event_shape)
        k = len(event_shape)
        if shape[len(shape) - k:] == event_shape:
            full = shape  # loc and scale have the event's shape (the usual case)
        else:
            try:
                full = torch.broadcast_shapes(shape, event_shape)
            except RuntimeError:
                full = None
        if full is None or full[len(full) - k:] != event_shape:
            raise ValueError(
                f"loc {tuple(self.loc.shape)} and scale {tuple(self.scale.shape)} do not broadcast to "
                f"event_shape {tuple(event_shape)}"
            )
        self._noise: tuple[Tensor, Tensor] | None = None
        self._log_scale_sum: Tensor | None = None
        super().__init__(full[: len(full) - k], event_shape, validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def mean(self) -> Tensor:
        return self.loc.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> Tensor:
        return self.scale.pow(2).expand(self.batch_shape + self.event_shape)

    def expand(self, batch_shape, _instance=None) -> "FactorizedNormal":
        new = self._get_checked_instance(FactorizedNormal, _instance)
        new.loc, new.scale, new._noise, new._log_scale_sum = self.loc, self.scale, None, self._log_scale_sum
        super(FactorizedNormal, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def _num_scalar(self) -> bool:
        return self.loc.numel() == 1 and self.scale.numel() == 1

    def _sum_log_scale(self) -> Tensor:
        """``sum_i log sigma_i`` over the event, ``batch_shape``-broadcastable (computed once: the
        log density and the KL both need it)."""
        cached = self._log_scale_sum
        if cached is None or cached.requires_grad != (torch.is_grad_enabled() and self.scale.requires_grad):
            cached = self._log_scale_sum = self._compute_sum_log_scale()  # first use, or other grad mode
        return cached

    def _compute_sum_log_scale(self) -> Tensor:
        """In :func:`~bnnpyro.distributions.kl.accumulation_dtype` (float64): the KL's terms cancel."""
        acc = accumulation_dtype(self.scale)
        if self.scale.numel() == 1:
            return self.scale.reshape(()).log().to(acc) * self.event_shape.numel()
        log_scale = self.scale.log()
        k = self.event_dim
        return sum_event(log_scale.expand(log_scale.shape[: max(log_scale.dim() - k, 0)] + self.event_shape), k, acc)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        value = torch.addcmul(self.loc, self.scale, eps)
        self._noise = (value, eps)
        _DRAWS[value] = True
        return value

    def log_prob(self, value: Tensor) -> Tensor:
        own_sample = self._noise is not None and value is self._noise[0]
        if self._validate_args:
            if value in _DRAWS:  # real already: the shape only
                check_value_shape(self, value)
            else:
                self._validate_sample(value)
        k = self.event_dim
        if own_sample:
            squares = sum_squares(self._noise[1], k)
            log_p = -0.5 * squares - self._sum_log_scale()
        elif self._num_scalar:
            # a fixed prior's loc and scale as Python numbers (None if learned or on an accelerator)
            loc, scale = constant_value(self.loc), constant_value(self.scale)
            centred = value if loc == 0 else value - (self.loc.reshape(()) if loc is None else loc)
            scale = self.scale.reshape(()) if scale is None else scale
            log_p = sum_squares(centred, k) * (-0.5 / scale**2) - self._sum_log_scale()
        else:
            z = (value - self.loc) / self.scale
            log_p = -0.5 * sum_squares(z, k) - self._sum_log_scale()
        log_p = (log_p - self.event_shape.numel() * _HALF_LOG_2PI).to(self.loc.dtype)
        return log_p.expand(broadcast_shapes(value.shape[: value.dim() - k], self.batch_shape))

    def entropy(self) -> Tensor:
        n = self.event_shape.numel()
        return (self._sum_log_scale() + n * (0.5 + _HALF_LOG_2PI)).to(self.loc.dtype).expand(self.batch_shape)


def _normal_params(d: TorchDistribution) -> tuple[Tensor, Tensor] | None:
    """``(loc, scale)`` of a :class:`FactorizedNormal` or of ``Normal(...).to_event(k)``, else None."""
    if isinstance(d, FactorizedNormal):
        return d.loc, d.scale
    base = d.base_dist
    while isinstance(base, Independent):
        base = base.base_dist
    return (base.loc, base.scale) if isinstance(base, Normal) else None


def _kl_event_normals(q: TorchDistribution, p: TorchDistribution) -> Tensor:
    r"""``sum_i KL(N(q_i) || N(p_i))`` over the event, ``batch_shape``-shaped, for any pair of
    :class:`FactorizedNormal` and ``Normal(...).to_event(k)`` with one event shape."""
    q_params, p_params = _normal_params(q), _normal_params(p)
    if q_params is None or p_params is None or q.event_shape != p.event_shape:
        raise NotImplementedError
    batch_shape = broadcast_shapes(q.batch_shape, p.batch_shape)
    full = batch_shape + q.event_shape
    sum_log_q_scale = q._sum_log_scale() if isinstance(q, FactorizedNormal) else None
    kl = normal_kl_sum(q_params[0].expand(full), q_params[1].expand(full), *p_params,
                       event_dim=len(q.event_shape), sum_log_q_scale=sum_log_q_scale)
    return kl.expand(batch_shape)


register_kl(FactorizedNormal, FactorizedNormal)(_kl_event_normals)
register_kl(Independent, FactorizedNormal)(_kl_event_normals)
register_kl(FactorizedNormal, Independent)(_kl_event_normals)
