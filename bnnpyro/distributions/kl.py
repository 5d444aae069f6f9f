"""Closed-form KL divergences between factorised Gaussian weight distributions."""

from __future__ import annotations

import math
from numbers import Number

import torch
from torch import Tensor


def normal_kl(
    q_mean: Tensor,
    q_scale: Tensor,
    p_mean: Tensor | float = 0.0,
    p_scale: Tensor | float = 1.0,
) -> Tensor:
    r"""
    Elementwise :math:`\mathrm{KL}(\mathcal N(\mu_q, \sigma_q^2) \,\|\, \mathcal N(\mu_p, \sigma_p^2))`.

    .. math::

        \mathrm{KL} = \log\frac{\sigma_p}{\sigma_q}
        + \frac{\sigma_q^2 + (\mu_q - \mu_p)^2}{2\sigma_p^2} - \frac12

    All arguments broadcast against each other; the result has the broadcast shape. The log term
    is :math:`\log(\sigma_q/\sigma_p)`, not half the log of the squared ratio, which underflows
    to 0 (an infinite KL) once :math:`\sigma_q/\sigma_p` is below about ``1e-23`` in float32.
    """
    ratio = q_scale / p_scale
    t1 = ((q_mean - p_mean) / p_scale) ** 2
    return 0.5 * (ratio * ratio + t1 - 1.0) - torch.log(ratio)


def accumulation_dtype(t: Tensor) -> torch.dtype:
    """The dtype the summed closed forms accumulate in: float64 for floating ``t`` (where the
    device has it). In float32 the sums of a large layer's ``n log sigma`` and ``sum sigma^2`` terms
    (about ``1e7`` for 2 million weights) cancel to a KL of a few nats with errors of hundreds."""
    return t.dtype if t.device.type == "mps" or t.dtype == torch.float64 else torch.float64


class _SquaredNorm(torch.autograd.Function):
    """``(t * t).sum()`` as one dot product in ``dtype``, backward ``2 g t``: one pass each way
    (``vector_norm(t).square()`` takes three passes back, autograd's ``(t * t).sum()`` a temporary)."""

    @staticmethod
    def forward(ctx, t: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(t)
        flat = t.reshape(-1).to(dtype)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (t,) = ctx.saved_tensors
        return t * (2.0 * grad).to(t.dtype), None


def sum_squares(t: Tensor, event_dim: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``t * t`` summed over the rightmost ``event_dim`` dims (all by default), accumulated in
    ``dtype`` (default ``t``'s; the result has it), without a ``t``-sized temporary of ``t``'s dtype."""
    dtype = t.dtype if dtype is None else dtype
    k = t.dim() if event_dim is None else event_dim
    if k == 0:
        t = t.to(dtype)
        return t * t
    if k == t.dim():
        if not (t.requires_grad and torch.is_grad_enabled()):
            flat = t.reshape(-1).to(dtype)
            return torch.dot(flat, flat)
        return _SquaredNorm.apply(t, dtype)
    return torch.linalg.vector_norm(t, dim=tuple(range(-k, 0)), dtype=dtype).square()


def sum_event(t: Tensor, event_dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` summed over its rightmost ``event_dim`` dims, accumulated in ``dtype`` (default ``t``'s)."""
    if not event_dim:
        return t if dtype is None else t.to(dtype)
    return t.sum(tuple(range(-event_dim, 0)), dtype=dtype)


def _scalar_if_broadcast(t: Tensor | float) -> Tensor | float:
    """A tensor expanded from one element (all strides 0) back to that element, a 0-d view."""
    if torch.is_tensor(t) and t.numel() > 1 and all(stride == 0 for stride in t.stride()):
        return t.as_strided((), ())
    return t


def _is_scalar(t: Tensor | float) -> bool:
    return not torch.is_tensor(t) or t.numel() == 1


def constant_value(t: Tensor | float) -> float | None:
    """The value of a number, or of a one-element CPU tensor that needs no gradient (a fixed prior
    parameter); ``None`` otherwise (learned, or on an accelerator, where reading it would cost a
    device synchronisation)."""
    if isinstance(t, Number):
        return float(t)
    if t.device.type == "cpu" and not t.requires_grad:
        return t.item()
    return None


def normal_kl_sum(
    q_mean: Tensor,
    q_scale: Tensor,
    p_mean: Tensor | float = 0.0,
    p_scale: Tensor | float = 1.0,
    *,
    event_dim: int | None = None,
    sum_log_q_scale: Tensor | None = None,
) -> Tensor:
    r"""
    :func:`normal_kl` summed over the rightmost ``event_dim`` dims of the broadcast shape (all by
    default). With a scalar prior (``p_mean``, ``p_scale`` floats, one-element tensors, or tensors
    expanded from one element) it uses the summed closed form

    .. math::

        \sum_i \mathrm{KL}_i = \frac{\sum_i \sigma_{q,i}^2 + \sum_i (\mu_{q,i} - \mu_p)^2}{2\sigma_p^2}
        - \sum_i \log\sigma_{q,i} + n \log\sigma_p - \frac n2,

    three reductions over the weights (two dot products and a log-sum) instead of ten elementwise
    passes, accumulated and combined in float64 (:func:`accumulation_dtype`) and returned in
    ``q_scale``'s dtype. ``sum_log_q_scale``: :math:`\sum_i \log\sigma_{q,i}` if the caller has it
    already (best in float64).
    """
    p_mean, p_scale = _scalar_if_broadcast(p_mean), _scalar_if_broadcast(p_scale)
    if not (_is_scalar(p_mean) and _is_scalar(p_scale)):
        kl = normal_kl(q_mean, q_scale, p_mean, p_scale)
        return sum_event(kl, kl.dim() if event_dim is None else event_dim)
    if q_mean.shape != q_scale.shape:
        q_mean, q_scale = torch.broadcast_tensors(q_mean, q_scale)
    k = q_mean.dim() if event_dim is None else event_dim
    n = q_mean.shape[q_mean.dim() - k:].numel()
    acc = accumulation_dtype(q_scale)
    if sum_log_q_scale is None:
        sum_log_q_scale = sum_event(q_scale.log(), k, acc)
    sum_log_q_scale = sum_log_q_scale.to(acc)
    constant_mean, constant_scale = constant_value(p_mean), constant_value(p_scale)
    if constant_mean is not None and constant_scale is not None:
        # a fixed prior: its terms are Python floats, no tensor ops on one-element tensors
        diff = q_mean if constant_mean == 0 else q_mean - constant_mean
        squares = sum_squares(q_scale, k, acc) + sum_squares(diff, k, acc)
        kl = squares * (0.5 / constant_scale**2) - sum_log_q_scale + n * (math.log(constant_scale) - 0.5)
        return kl.to(q_scale.dtype)
    p_scale = torch.as_tensor(p_scale, dtype=q_scale.dtype, device=q_scale.device).reshape(())
    p_mean = torch.as_tensor(p_mean, dtype=q_mean.dtype, device=q_mean.device).reshape(())
    squares = sum_squares(q_scale, k, acc) + sum_squares(q_mean - p_mean, k, acc)
    p_scale = p_scale.to(acc)
    kl = 0.5 * squares / p_scale.pow(2) - sum_log_q_scale + n * (p_scale.log() - 0.5)
    return kl.to(q_scale.dtype)


def minibatch_kl_factor(
    rows: int, KL_factor: float | Tensor = 1.0, dataset_size: int | None = None
) -> float | Tensor:
    r"""
    The multiplier of a layer's KL for a minibatch of ``rows`` rows: ``KL_factor`` as given, or
    ``rows / dataset_size`` when ``dataset_size = N`` is given, so that inside
    ``pyro.plate("data", N, subsample_size=rows)`` (scale ``N / rows``) the KL is counted once.

    Raises:
        ValueError: ``dataset_size`` is not a positive int, or both it and a ``KL_factor`` other
            than 1 are given.
    """
    if dataset_size is None:
        return KL_factor
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
    if not (isinstance(KL_factor, Number) and KL_factor == 1.0):
        raise ValueError("give either KL_factor or dataset_size, not both")
    return rows / dataset_size
