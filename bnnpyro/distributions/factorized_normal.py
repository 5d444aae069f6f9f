"""Independent Normals over a whole weight tensor, as one event, with summed closed forms."""

from __future__ import annotations

import math

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import Tensor
from torch.distributions import Independent, Normal, constraints
from torch.distributions.kl import register_kl
from torch.utils.weak import WeakIdKeyDictionary

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# the draws of every FactorizedNormal (by identity, while they live): real wherever their loc and
# scale are, so another FactorizedNormal (the prior at the model's site) need not re-check them
_DRAWS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _sum_event(t: Tensor, event_dim: int) -> Tensor:
    return t.sum(tuple(range(-event_dim, 0))) if event_dim else t


def _is_zero(t: Tensor) -> bool:
    """Whether the one-element ``t`` is a constant 0 (then ``x - t`` is skipped: one pass fewer)."""
    return not t.requires_grad and bool(t == 0)


class _SquaredNorm(torch.autograd.Function):
    """``(t * t).sum()`` as one dot product, backward ``2 g t``: one pass each way, no temporaries
    (``vector_norm(t).square()`` takes three passes back, autograd's ``(t * t).sum()`` a temporary)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        ctx.save_for_backward(t)
        flat = t.reshape(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (t,) = ctx.saved_tensors
        return t * (2.0 * grad)


def _sum_squares(t: Tensor, event_dim: int) -> Tensor:
    """``(t * t)`` summed over the rightmost ``event_dim`` dims, without a ``t``-sized temporary."""
    if event_dim == 0:
        return t * t
    if event_dim == t.dim():
        return _SquaredNorm.apply(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(-event_dim, 0))).square()


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
        shape = torch.broadcast_shapes(self.loc.shape, self.scale.shape)
        event_shape = shape if event_shape is None else torch.Size(event_shape)
        k = len(event_shape)
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
        if self.scale.numel() == 1:
            return self.scale.reshape(()).log() * self.event_shape.numel()
        log_scale = self.scale.log()
        k = self.event_dim
        return _sum_event(log_scale.expand(log_scale.shape[: max(log_scale.dim() - k, 0)] + self.event_shape), k)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        value = torch.addcmul(self.loc, self.scale, eps)
        self._noise = (value, eps)
        _DRAWS[value] = True
        return value

    def log_prob(self, value: Tensor) -> Tensor:
        own_sample = self._noise is not None and value is self._noise[0]
        if self._validate_args and value not in _DRAWS:
            self._validate_sample(value)
        k = self.event_dim
        if own_sample:
            squares = _sum_squares(self._noise[1], k)
            log_p = -0.5 * squares - self._sum_log_scale()
        elif self._num_scalar:
            loc = self.loc.reshape(())
            squares = _sum_squares(value if _is_zero(loc) else value - loc, k)
            log_p = -0.5 * squares / self.scale.reshape(()).pow(2) - self._sum_log_scale()
        else:
            z = (value - self.loc) / self.scale
            log_p = -0.5 * _sum_squares(z, k) - self._sum_log_scale()
        log_p = log_p - self.event_shape.numel() * _HALF_LOG_2PI
        return log_p.expand(torch.broadcast_shapes(value.shape[: value.dim() - k], self.batch_shape))

    def entropy(self) -> Tensor:
        n = self.event_shape.numel()
        return (self._sum_log_scale() + n * (0.5 + _HALF_LOG_2PI)).expand(self.batch_shape)


def _base_normal(d: Independent) -> Normal | None:
    """The ``Normal`` under ``Normal(...).to_event(k)`` (any nesting of ``Independent``), else None."""
    base = d.base_dist
    while isinstance(base, Independent):
        base = base.base_dist
    return base if isinstance(base, Normal) else None


def _scalar_if_broadcast(t: Tensor) -> Tensor:
    """A tensor expanded from one element (all strides 0) back to that element, a 0-d view."""
    if t.numel() > 1 and all(stride == 0 for stride in t.stride()):
        return t.as_strided((), ())
    return t


def _kl_sum(q_loc: Tensor, q_scale: Tensor, p_loc: Tensor, p_scale: Tensor, event_shape: torch.Size,
            batch_shape: torch.Size, q_sum_log_scale: Tensor | None = None) -> Tensor:
    r"""``sum_i KL(N(q_i) || N(p_i))`` over ``event_shape``, ``batch_shape``-shaped; ``q_sum_log_scale``:
    ``sum_i log q_scale_i`` if already known."""
    k = len(event_shape)
    n = event_shape.numel()
    full = batch_shape + event_shape
    p_loc, p_scale = _scalar_if_broadcast(p_loc), _scalar_if_broadcast(p_scale)
    if p_loc.numel() == 1 and p_scale.numel() == 1:
        p_loc, p_scale = p_loc.reshape(()), p_scale.reshape(())
        q_loc, q_scale = q_loc.expand(full), q_scale.expand(full)
        diff = q_loc if _is_zero(p_loc) else q_loc - p_loc
        squares = _sum_squares(q_scale, k) + _sum_squares(diff, k)
        if q_sum_log_scale is None:
            q_sum_log_scale = _sum_event(q_scale.log(), k)
        kl = 0.5 * squares / p_scale.pow(2) - q_sum_log_scale + n * (p_scale.log() - 0.5)
    else:
        var_ratio = (q_scale / p_scale).pow(2)
        t1 = ((q_loc - p_loc) / p_scale).pow(2)
        kl = _sum_event((0.5 * (var_ratio + t1 - 1.0 - var_ratio.log())).expand(full), k)
    return kl.expand(batch_shape)


@register_kl(FactorizedNormal, FactorizedNormal)
def _kl_factorized_factorized(q: FactorizedNormal, p: FactorizedNormal) -> Tensor:
    if q.event_shape != p.event_shape:
        raise NotImplementedError
    return _kl_sum(q.loc, q.scale, p.loc, p.scale, q.event_shape,
                   torch.broadcast_shapes(q.batch_shape, p.batch_shape), q._sum_log_scale())


@register_kl(Independent, FactorizedNormal)
def _kl_independent_normal_factorized(q: Independent, p: FactorizedNormal) -> Tensor:
    base = _base_normal(q)
    if base is None or q.event_shape != p.event_shape:
        raise NotImplementedError
    return _kl_sum(base.loc, base.scale, p.loc, p.scale, q.event_shape,
                   torch.broadcast_shapes(q.batch_shape, p.batch_shape))


@register_kl(FactorizedNormal, Independent)
def _kl_factorized_independent_normal(q: FactorizedNormal, p: Independent) -> Tensor:
    base = _base_normal(p)
    if base is None or q.event_shape != p.event_shape:
        raise NotImplementedError
    return _kl_sum(q.loc, q.scale, base.loc, base.scale, q.event_shape,
                   torch.broadcast_shapes(q.batch_shape, p.batch_shape), q._sum_log_scale())
