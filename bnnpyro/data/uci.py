"""UCI regression benchmarks in the layout of Hernández-Lobato & Adams (2015).

Each data set is a folder ``<root>/<name>/`` holding ``data.txt`` (whitespace
separated rows), ``index_features.txt`` and ``index_target.txt`` (0-based
column indices), ``index_train_K.txt`` / ``index_test_K.txt`` (0-based row
indices of the K-th fixed 90/10 split) and the protocol settings
``n_hidden.txt``, ``n_epochs.txt``, ``n_splits.txt``.

Protocol (Hernández-Lobato & Adams 2015, "Probabilistic Backpropagation";
Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation"): standardize
inputs and target with the training split's mean and std, and report test RMSE
and test log-likelihood in the target's original units.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["UCI_DATASETS", "UCISplit", "list_uci", "load_uci", "uci_protocol"]

UCI_DATASETS: tuple[str, ...] = ("concrete", "energy", "yacht")
"""Names of the data sets bundled inside the package (``bnnpyro/data/uci/``)."""

_BUNDLED_ROOT = Path(__file__).resolve().parent / "uci"
_ENV_VAR = "BNNPYRO_UCI_ROOT"


@dataclass
class UCISplit:
    """One train/test split of a UCI regression data set, standardized.

    ``x_*`` are ``N x D`` and ``y_*`` are ``N`` float32 tensors, standardized with
    the training split's per-column mean and (population) std; ``x_mean`` and
    ``x_std`` are ``D``, ``y_mean`` and ``y_std`` are 0-d tensors. Columns whose
    training std is zero use std 1.

    To report metrics in the target's original units: multiply an RMSE
    computed in standardized units by :attr:`y_scale`, and subtract
    ``log(y_scale)`` from a per-point Gaussian log-likelihood computed in
    standardized units (or evaluate it directly against
    :attr:`y_test_original` after :meth:`y_to_original`).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor
    name: str
    split: int

    @property
    def y_scale(self) -> float:
        """Standard deviation of the training targets in original units."""
        return float(self.y_std)

    @property
    def y_test_original(self) -> torch.Tensor:
        """Test targets in original units, shape ``N_test``."""
        return self.y_to_original(self.y_test)

    def y_to_original(self, y_std_units: torch.Tensor) -> torch.Tensor:
        """Map targets of any shape from standardized to original units: ``y * y_std + y_mean``."""
        return y_std_units * self.y_std + self.y_mean


def _search_roots() -> list[Path]:
    """Default roots, searched in order (see :func:`load_uci`)."""
    roots = [
        _BUNDLED_ROOT,
        Path.cwd() / ".." / "shared" / "data" / "uci",
        Path("/work/shared/data/uci"),
    ]
    if os.environ.get(_ENV_VAR):
        roots.append(Path(os.environ[_ENV_VAR]))
    return roots


def _dataset_dir(name: str, root: str | os.PathLike | None) -> Path:
    """Folder of ``name`` under ``root``, or under the first default root that has it; ``name``
    may also be a path to the folder itself (with no ``root``): one written as a path (with a
    separator, or starting with ``.``, as ``./mydata``) that holds ``data.txt``."""
    path = Path(name)
    text = os.fspath(name)
    written_as_path = (any(sep and sep in text for sep in (os.sep, os.altsep)) or text.startswith(".")
                       or path.is_absolute())
    if root is None and written_as_path:
        if (path / "data.txt").is_file():
            return path
        raise FileNotFoundError(f"UCI data set folder {name!r} has no data.txt (resolved: {path.resolve()})")
    roots = [Path(root)] if root is not None else _search_roots()
    for r in roots:
        if (r / name / "data.txt").is_file():
            return r / name
    looked = ", ".join(str(r / name) for r in roots)
    available = list_uci(root)
    raise FileNotFoundError(
        f"UCI data set {name!r} not found; looked in: {looked}. "
        + (f"Available there: {', '.join(available)}. " if available else "")
        + f"Pass root=<folder holding data-set folders> or set ${_ENV_VAR}."
    )


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def _read_indices(path: Path) -> np.ndarray:
    return np.loadtxt(path, ndmin=1).astype(np.int64)


def _safe_std(a: np.ndarray) -> np.ndarray:
    std = a.std(axis=0)
    return np.where(std > 0, std, 1.0)


def uci_protocol(name: str, root: str | os.PathLike | None = None) -> dict[str, int]:
    """Protocol settings of data set ``name``: ``{"n_hidden", "n_epochs", "n_splits"}``."""
    folder = _dataset_dir(name, root)
    return {key: _read_int(folder / f"{key}.txt") for key in ("n_hidden", "n_epochs", "n_splits")}


def list_uci(root: str | os.PathLike | None = None) -> list[str]:
    """Sorted names of the data sets available under ``root`` (or under any default root)."""
    roots = [Path(root)] if root is not None else _search_roots()
    return sorted(
        {d.name for r in roots if r.is_dir() for d in r.iterdir() if (d / "data.txt").is_file()}
    )


def load_uci(name: str, split: int = 0, root: str | os.PathLike | None = None) -> UCISplit:
    """Load split ``split`` of UCI data set ``name``, standardized with training statistics.

    Args:
        name: folder name, e.g. ``"yacht"``, ``"energy"``, ``"concrete"`` (:func:`list_uci` lists
            those found), or a path to a data-set folder (``"../shared/data/uci/yacht"``).
        split: split index in ``0 .. n_splits - 1``.
        root: folder holding data-set folders. ``None`` searches, in order, the
            bundled ``bnnpyro/data/uci/``, ``../shared/data/uci`` (relative to the
            working directory), ``/work/shared/data/uci`` and ``$BNNPYRO_UCI_ROOT``.

    Raises:
        FileNotFoundError: the data set is in none of the searched folders.
        ValueError: ``split`` is not an int or is outside ``0 .. n_splits - 1``.
    """
    if isinstance(split, bool) or not isinstance(split, numbers.Integral):
        raise ValueError(f"split must be an int, got {split!r}")
    split = int(split)  # numpy integers too
    folder = _dataset_dir(name, root)
    n_splits = _read_int(folder / "n_splits.txt")
    if not 0 <= split < n_splits:
        raise ValueError(f"split must be in 0..{n_splits - 1} for {name!r}, got {split}")
    data = np.loadtxt(folder / "data.txt", ndmin=2)
    features = _read_indices(folder / "index_features.txt")
    target = _read_int(folder / "index_target.txt")
    train = _read_indices(folder / f"index_train_{split}.txt")
    test = _read_indices(folder / f"index_test_{split}.txt")

    x, y = data[:, features], data[:, target]
    x_mean, x_std = x[train].mean(axis=0), _safe_std(x[train])
    y_mean, y_std = y[train].mean(), _safe_std(y[train])

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32)

    return UCISplit(
        x_train=t((x[train] - x_mean) / x_std),
        y_train=t((y[train] - y_mean) / y_std),
        x_test=t((x[test] - x_mean) / x_std),
        y_test=t((y[test] - y_mean) / y_std),
        x_mean=t(x_mean),
        x_std=t(x_std),
        y_mean=t(y_mean),
        y_std=t(y_std),
        name=name,
        split=split,
    )
