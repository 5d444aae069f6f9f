"""Small offline data sets: a 1-D regression curve and classification splits.

``toy_regression`` is the curve of Blundell et al. (2015), "Weight Uncertainty
in Neural Networks", eq. 14. ``make_moons`` and ``make_spirals`` are synthetic
2-D classification problems generated with numpy (no scikit-learn needed);
``"digits"`` and ``"breast_cancer"`` are the real data sets bundled with
scikit-learn, imported lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bnnpyro._checks import positive_int

__all__ = [
    "CLASSIFICATION_DATASETS",
    "ClassificationSplit",
    "load_classification",
    "make_moons",
    "make_spirals",
    "toy_regression",
    "toy_regression_curve",
]

CLASSIFICATION_DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "two_moons", "spirals")


def toy_regression_curve(x: torch.Tensor) -> torch.Tensor:
    """Noise-free curve ``x + 0.3 sin(2πx) + 0.3 sin(4πx)`` (Blundell et al. 2015, eq. 14, ε = 0).

    Args:
        x: inputs of any shape (``N x 1`` or ``N``).

    Returns:
        tensor of the same shape as ``x``.
    """
    return x + 0.3 * torch.sin(2 * math.pi * x) + 0.3 * torch.sin(4 * math.pi * x)


def toy_regression(
    n: int = 100,
    noise: float = 0.02,
    x_range: tuple[float, float] = (0.0, 0.5),
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the 1-D regression problem of Blundell et al. (2015), eq. 14.

    ``y = x + 0.3 sin(2π(x + ε)) + 0.3 sin(4π(x + ε)) + ε`` with ``ε ~ N(0, noise²)``
    (``noise`` is the standard deviation) and ``x ~ Uniform(x_range)``.

    Returns:
        ``(x, y)``: float32 tensors, ``x`` of shape ``n x 1`` and ``y`` of shape ``n``.

    Raises:
        ValueError: ``n`` not a positive int, ``noise`` negative, or ``x_range`` not ``(low, high)``
        with ``low < high``.
    """
    positive_int("n", n)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a non-negative float (a standard deviation), got {noise!r}")
    if len(x_range) != 2 or not x_range[0] < x_range[1]:
        raise ValueError(f"x_range must be (low, high) with low < high, got {x_range!r}")
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.uniform(x_range[0], x_range[1], size=n), dtype=torch.float32)
    eps = torch.as_tensor(rng.normal(0.0, noise, size=n), dtype=torch.float32)
    y = toy_regression_curve(x + eps)  # = x + 0.3 sin(2π(x+ε)) + 0.3 sin(4π(x+ε)) + ε
    return x.unsqueeze(-1), y


def make_moons(n: int = 1000, noise: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles with Gaussian noise of std ``noise``.

    Returns:
        ``(x, y)``: ``x`` float64 of shape ``n x 2``; ``y`` int64 labels in ``{0, 1}``
        of shape ``n`` (``n // 2`` of class 0, the rest class 1).

    Raises:
        ValueError: ``n`` is not a positive int.
    """
    positive_int("n", n)
    rng = np.random.default_rng(seed)
    y = (np.arange(n) >= n // 2).astype(np.int64)
    t = rng.uniform(0.0, math.pi, size=n)
    outer = np.stack([np.cos(t), np.sin(t)], axis=1)
    inner = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1)
    x = np.where(y[:, None] == 0, outer, inner) + rng.normal(0.0, noise, size=(n, 2))
    return x, y


def make_spirals(
    n: int = 1000, noise: float = 0.05, num_classes: int = 2, turns: float = 1.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Interleaved spiral arms, one per class, with Gaussian noise of std ``noise``.

    Arm ``k`` is ``r (cos θ, sin θ)`` with ``r ~ Uniform(0, 1)`` and
    ``θ = 2π (k / num_classes + turns · r)``.

    Returns:
        ``(x, y)``: ``x`` float64 of shape ``n x 2``; ``y`` int64 labels in
        ``0 .. num_classes - 1`` of shape ``n``.

    Raises:
        ValueError: ``n`` or ``num_classes`` is not a positive int.
    """
    positive_int("n", n)
    positive_int("num_classes", num_classes)
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.int64) * num_classes // n
    r = rng.uniform(0.0, 1.0, size=n)
    theta = 2 * math.pi * (y / num_classes + turns * r)
    x = r[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return x + rng.normal(0.0, noise, size=(n, 2)), y


@dataclass
class ClassificationSplit:
    """A train/test split of a classification data set.

    ``x_*`` are ``N x D`` float32 tensors, scaled with training statistics as
    ``(x - x_mean) / x_std``; ``y_*`` are ``N`` int64 tensors in
    ``0 .. num_classes - 1``. ``x_mean`` and ``x_std`` (``D``) map inputs back to
    original units, e.g. for plotting decision boundaries.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    x_mean: torch.Tensor
    x_std: torch.Tensor


def _sklearn_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn import datasets
    except ImportError as err:
        raise ImportError(
            f"load_classification({name!r}) needs scikit-learn, which bundles the data: "
            "pip install scikit-learn"
        ) from err
    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}[name]
    x, y = loader(return_X_y=True)
    return x.astype(np.float64), y.astype(np.int64)


def _stratified_split(
    y: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train/test row indices, ``round(test_fraction · n_c)`` of class c in test."""
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_classification(
    name: str = "digits", test_fraction: float = 0.2, seed: int = 0, n: int = 1000
) -> ClassificationSplit:
    """Load a classification data set with a deterministic stratified train/test split.

    Args:
        name: ``"digits"`` (scikit-learn's 1,797 8x8 images, 10 classes, pixels
            divided by 16), ``"breast_cancer"`` (scikit-learn, 569 x 30, 2 classes),
            ``"two_moons"`` or ``"spirals"`` (synthetic, 2-D, 2 classes, generated
            from ``seed``). All but digits are standardized with training mean/std.
        test_fraction: fraction of each class put in the test split.
        seed: seed of the split (and of the synthetic generators).
        n: number of points of the synthetic data sets (ignored otherwise).

    Raises:
        ValueError: unknown ``name``; ``test_fraction`` not in ``(0, 1)`` or leaving a split
            empty; ``n`` not a positive int.
        ImportError: ``"digits"``/``"breast_cancer"`` without scikit-learn.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    positive_int("n", n)
    if name in ("digits", "breast_cancer"):
        x, y = _sklearn_data(name)
    elif name == "two_moons":
        x, y = make_moons(n, seed=seed)
    elif name == "spirals":
        x, y = make_spirals(n, seed=seed)
    else:
        raise ValueError(f"unknown data set {name!r}; choose from {CLASSIFICATION_DATASETS}")

    # A child seed, so that the split is independent of the synthetic generators' draws.
    split_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    train, test = _stratified_split(y, test_fraction, split_rng)
    if len(test) == 0 or len(train) == 0:
        raise ValueError(f"test_fraction={test_fraction} of {len(y)} points leaves the "
                         f"{'test' if len(test) == 0 else 'training'} split empty")
    if name == "digits":
        x_mean, x_std = np.zeros(x.shape[1]), np.full(x.shape[1], 16.0)
    else:
        x_mean, x_std = x[train].mean(axis=0), x[train].std(axis=0)
        x_std = np.where(x_std > 0, x_std, 1.0)

    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32)

    return ClassificationSplit(
        x_train=f32((x[train] - x_mean) / x_std),
        y_train=torch.as_tensor(y[train]),
        x_test=f32((x[test] - x_mean) / x_std),
        y_test=torch.as_tensor(y[test]),
        num_classes=int(y.max()) + 1,
        name=name,
        x_mean=f32(x_mean),
        x_std=f32(x_std),
    )
