"""Non-linearities by name, so that model configurations stay serializable."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

NON_LINEARITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "gelu": F.gelu,
    "softplus": F.softplus,
}


def resolve_non_linearity(non_linearity: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The callable for a name in :data:`NON_LINEARITIES`, or ``non_linearity`` itself if callable."""
    if isinstance(non_linearity, str):
        if non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"non_linearity must be one of {sorted(NON_LINEARITIES)} or a callable, got {non_linearity!r}"
            )
        return NON_LINEARITIES[non_linearity]
    if not callable(non_linearity):
        raise TypeError(f"non_linearity must be a str or callable, got {type(non_linearity).__name__}")
    return non_linearity


def identity(t: Tensor) -> Tensor:
    """The identity, for output layers (a named function, so configurations stay picklable)."""
    return t


def inverse_softplus(y: float | Tensor) -> float | Tensor:
    """``rho`` with ``softplus(rho) = y`` (a number or, elementwise, a tensor of positive values):
    initialises a scale parameterised as ``softplus(rho)``."""
    if torch.is_tensor(y):
        return y + torch.log(-torch.expm1(-y))
    return y + math.log(-math.expm1(-y))
