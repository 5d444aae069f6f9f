"""Argument checks shared by the layer distributions."""

from __future__ import annotations

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


def check_value_shape(d: Distribution, value: Tensor) -> None:
    """
    The shape part of ``Distribution._validate_sample``: ``value`` is a tensor whose rightmost
    dims are ``d.event_shape`` and whose leading dims broadcast with ``d.batch_shape``. The layers'
    ``log_prob`` is their folded KL and ignores ``value``'s entries, so there is no support check
    (which would be a pass over every pre-activation of the minibatch).
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
