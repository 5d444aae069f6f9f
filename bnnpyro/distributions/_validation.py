"""Argument checks shared by the layer distributions."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution

from bnnpyro.distributions._shapes import broadcast_shapes


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
