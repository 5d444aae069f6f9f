"""Argument checks shared by the layers and models: each raises an error that names the argument."""

from __future__ import annotations


def positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive ``int`` (not a ``bool``), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
