"""Argument checks shared by the layers and models: each raises an error that names the argument."""

from __future__ import annotations

import torch
from pyro.distributions.util import is_validation_enabled
from torch import Tensor


def all_finite(t: Tensor) -> bool:
    """
    Whether every element of ``t`` is finite. NaN and infinities propagate into the sum, so a
    finite sum settles it in one pass without a temporary; only a sum that is not finite (a bad
    element, or an overflow of large finite values) is checked elementwise with
    ``isfinite(t).all()`` (several passes: about ten times the cost on a ``10,000 x 13`` tensor here).
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(name: str, t: Tensor) -> None:
    """``ValueError`` naming ``name`` if ``t`` holds NaN or infinite values, checked with Pyro's
    validation on (as the distributions' value checks: a pass over ``t`` and, on a GPU, a sync)."""
    if is_validation_enabled() and not all_finite(t):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_float_batch(x: object, like: Tensor, shape_ok: bool, expected: str, dataset_size: int,
                      training: bool, unit: str = "rows") -> None:
    """
    ``x``, a model's input batch, must be a floating-point tensor of ``like``'s dtype and device
    (:func:`check_like`), of the expected shape (``shape_ok``, described by ``expected``, e.g.
    ``"B x 13"``), with at least one and, in training, at most ``dataset_size`` ``unit``, and with
    finite values (checked with Pyro's validation on, as the distributions' value checks: a pass over
    the batch and, on a GPU, a synchronisation). Raises ``TypeError``/``ValueError`` naming ``x``
    otherwise.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    check_like("x", x, like)
    if not shape_ok:
        raise ValueError(f"x must be {expected}, got shape {tuple(x.shape)}")
    if training and x.size(0) > dataset_size:
        raise ValueError(
            f"the batch has {x.size(0)} {unit} but dataset_size is {dataset_size}: "
            f"dataset_size must be the number of training {unit}"
        )
    if x.size(0) == 0:
        raise ValueError(f"x must have at least one row, got shape {tuple(x.shape)}")
    check_finite("x", x)


def check_like(name: str, t: Tensor, reference: Tensor, owner: str = "the model's parameters") -> None:
    """
    ``t`` (a floating-point input) must have ``reference``'s dtype, and any ``t`` its device: a
    matmul of mixed dtypes or devices fails deep inside with a message that names neither.
    Raises ``TypeError`` (dtype) or ``ValueError`` (device) naming ``name``, ``owner`` and the fix.
    """
    if t.is_floating_point() and t.dtype != reference.dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but {owner} are {reference.dtype}: convert {name} "
            f"({name}.to({reference.dtype})) or the model (model.to({t.dtype}))"
        )
    if t.device != reference.device:
        raise ValueError(
            f"{name} is on {t.device} but {owner} are on {reference.device}: move {name} "
            f"({name}.to('{reference.device}')) or the model (model.to('{t.device}'))"
        )


def positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive ``int`` (not a ``bool``), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def positive_ints(name: str, value: object) -> tuple[int, ...]:
    """``value`` as a tuple if it is a sequence of positive ints (e.g. layer widths ``(50,)``), else
    ``ValueError`` naming ``name`` (a bare int, a common slip for a one-element tuple, included)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a sequence of positive ints, e.g. (50,), got {value!r}")
    values = tuple(value)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}")
    return values


def positive_number(name: str, value: object) -> float:
    """``value`` if it is a positive ``int`` or ``float`` (not a ``bool``), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive float, got {value!r}")
    return value


def one_of(name: str, value: object, choices: tuple) -> object:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def prior_scale_or_fan_in(value: object) -> float | str:
    """A catalogue model's ``prior_scale``: a positive number or ``"fan_in"``, else ``ValueError``."""
    if not (value == "fan_in" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)):
        raise ValueError(f"prior_scale must be a positive float or 'fan_in', got {value!r}")
    return value


def check_class_labels(x: Tensor, y: object, num_classes: int) -> None:
    """``y`` must be an int64 tensor of shape ``(B,)`` for ``x`` of ``B`` rows, holding labels in
    ``[0, num_classes)`` (the range checked with Pyro's validation on); raises ``TypeError``/``ValueError``
    naming ``y`` otherwise."""
    if not torch.is_tensor(y) or y.dtype != torch.long:
        raise TypeError(f"y must be an int64 tensor of class labels, got {getattr(y, 'dtype', type(y).__name__)}")
    if tuple(y.shape) != (x.size(0),):
        raise ValueError(f"y must have shape ({x.size(0)},) for x of shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if is_validation_enabled() and y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"y holds labels in [{int(y.min())}, {int(y.max())}], expected [0, {num_classes})")
