"""Argument checks shared by the layer distributions."""

from __future__ import annotations

import math
from numbers import Number

import torch
from torch import Tensor
from torch.distributions import Distribution

from bnnpyro.distributions._shapes import broadcast_shapes


def check_float_tensors(**tensors: object) -> None:
    """
    Every argument is a floating-point tensor, and all have the dtype and device of the first
    (a matmul of mixed dtypes or devices fails later with a message naming none of them).
    Raises ``TypeError`` (not a tensor, not floating point, another dtype) or ``ValueError``
    (another device) naming the argument.
    """
    first: tuple[str, Tensor] | None = None
    for name, value in tensors.items():
        if not torch.is_tensor(value):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if first is None:
            first = name, value
        elif value.dtype != first[1].dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but {first[0]} has {first[1].dtype}: give them one dtype")
        elif value.device != first[1].device:
            raise ValueError(f"{name} is on {value.device} but {first[0]} is on {first[1].device}: "
                             "put them on one device")


def check_rows(name: str, t: Tensor, rows: int) -> None:
    """A layer's minibatch (``rows`` of ``t``) is not empty: each row carries ``1 / rows`` of the KL."""
    if rows < 1:
        raise ValueError(
            f"{name} has no rows (shape {tuple(t.shape)}): each row of the minibatch carries a share of "
            "the layer's KL, so it needs at least one"
        )


def check_prior_shape(name: str, value: object, shape: torch.Size, weights: str) -> None:
    """
    A tensor prior parameter ``value`` broadcasts to ``shape``, that of the weights it is the prior
    of (named ``weights``): the KL is taken elementwise over them, and a prior of another shape
    fails there, later, with a message naming neither. Raises ``ValueError`` naming ``name``.
    """
    if not torch.is_tensor(value) or value.dim() == 0 or value.shape == shape:
        return  # the common cases, without torch.broadcast_shapes's 25 us of Python
    try:
        fits = torch.broadcast_shapes(value.shape, shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} must be a number or a tensor broadcastable to {weights} {tuple(shape)}, "
            f"got shape {tuple(value.shape)}"
        )


def valid_kl_factor(KL_factor: object) -> bool:
    """Whether ``KL_factor``, if a number, is finite and non-negative (a tensor is not read: that
    would cost a device synchronisation)."""
    return not isinstance(KL_factor, Number) or (math.isfinite(KL_factor) and KL_factor >= 0)


def prior_total(prior_mean: Tensor, prior_scale: Tensor) -> Tensor:
    """A 0-d tensor that is finite if ``prior_mean`` and ``prior_scale`` are: NaN and infinities
    propagate into it (an overflow of large finite values only sends the caller to its elementwise
    checks). One op for the usual 0-d priors."""
    total = prior_mean + prior_scale
    return total if total.dim() == 0 else total.sum()


def check_prior_values(prefix: str, prior_mean: Tensor, prior_scale: Tensor, KL_factor: object) -> None:
    """
    The prior ``{prefix}_prior_mean`` is finite, ``{prefix}_prior_scale`` finite and strictly
    positive, and ``KL_factor`` (if a number) finite and non-negative: a NaN or infinity in any
    of them makes the folded KL NaN or infinite. Raises ``ValueError`` naming the argument.
    """
    if not torch.isfinite(prior_mean).all():
        raise ValueError(f"{prefix}_prior_mean contains NaN or infinite values")
    if not (prior_scale > 0).all() or not torch.isfinite(prior_scale).all():
        raise ValueError(f"{prefix}_prior_scale must be strictly positive and finite")
    if not valid_kl_factor(KL_factor):
        raise ValueError(f"KL_factor must be a finite non-negative number, got {KL_factor}")


def check_layer_values(
    finite: dict[str, Tensor], positive: dict[str, Tensor], prefix: str, prior_mean: object,
    prior_scale: object, KL_factor: object,
) -> None:
    """
    A layer distribution's arguments: every tensor in ``finite`` (inputs, means) finite, every one
    in ``positive`` (scales) finite and strictly positive, and the prior and ``KL_factor`` as in
    :func:`check_prior_values`. The usual, valid case costs one fused check: NaN and infinities
    propagate into a single sum, then each scale's minimum is read. Only if that fails are the
    tensors checked one by one, and the first bad one named (``ValueError``).
    """
    prior_mean, prior_scale = torch.as_tensor(prior_mean), torch.as_tensor(prior_scale)
    total = prior_total(prior_mean, prior_scale)
    for t in (*finite.values(), *positive.values()):
        total = total + t.sum()
    if (bool(torch.isfinite(total)) and all(bool(t.min() > 0) for t in positive.values())
            and bool((prior_scale > 0).all()) and valid_kl_factor(KL_factor)):
        return
    for name, t in finite.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    for name, t in positive.items():
        if not (t > 0).all() or not torch.isfinite(t).all():
            raise ValueError(f"{name} must be finite and strictly positive")
    check_prior_values(prefix, prior_mean, prior_scale, KL_factor)


def check_value_shape(d: Distribution, value: Tensor) -> None:
    """
    The shape part of ``Distribution._validate_sample``: ``value`` is a tensor whose rightmost
    dims are ``d.event_shape`` and whose leading dims broadcast with ``d.batch_shape``, without the
    support check (a pass over every entry): the layers' ``log_prob`` is their folded KL and ignores
    ``value``'s entries, and a :class:`~bnnpyro.distributions.FactorizedNormal` draw is real already.
    """
    if not torch.is_tensor(value):
        raise ValueError("The value argument to log_prob must be a Tensor")
    k = len(d.event_shape)
    if value.dim() < k or value.shape[value.dim() - k:] != d.event_shape:
        raise ValueError(
            f"The right-most size of value must match event_shape: {tuple(value.shape)} vs {tuple(d.event_shape)}."
        )
    try:
        broadcast_shapes(value.shape[: value.dim() - k], d.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"Value is not broadcastable with batch_shape+event_shape: {tuple(value.shape)} vs "
            f"{tuple(d.batch_shape + d.event_shape)}."
        ) from None
