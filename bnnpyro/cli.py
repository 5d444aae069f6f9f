"""
``argparse`` argument types for command-line scripts: the ``bnnpyro`` command and the examples.
A bad value ends in argparse's usage error naming the option (exit status 2), not a traceback
after the data are loaded or the model trained.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable


def _parse(kind: type, text: str) -> int | float:
    """``kind(text)``, or argparse's error naming what was expected."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None


def positive(kind: type) -> Callable[[str], int | float]:
    """A type accepting numbers of ``kind`` (``int`` or ``float``) above zero."""
    def parse(text: str) -> int | float:
        value = _parse(kind, text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def level(text: str) -> float:
    """A credible level in (0, 1)."""
    value = _parse(float, text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def seed(text: str) -> int:
    """A seed numpy accepts (``pyro.set_rng_seed`` seeds numpy too): an int in ``[0, 2**32)``."""
    value = _parse(int, text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text}")
    return value


def output_path(text: str) -> str:
    """A file to write (``''``: none), not a folder, whose folder exists: checked when the arguments
    are parsed, not after the work that produces the file."""
    folder = os.path.dirname(text)
    if text and folder and not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} does not exist")
    if text and os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: give a file name")
    return text
