"""
Matplotlib plots of predictive uncertainty.

Every function takes tensors (on any device), draws on ``ax`` (a new figure when
``None``) and returns the ``Axes``. Nothing here selects a backend or calls
``plt.show()``, so the plots work headless (e.g. with the ``Agg`` backend).
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from torch import Tensor

from bnnpyro.predict.metrics import _check_interval, auroc, calibration_curve, expected_calibration_error, picp, rmse
from bnnpyro.predict.summary import _check_same_shape, _check_tensor


def _axes(ax: Axes | None) -> Axes:
    if ax is None:
        _, ax = plt.subplots()
    return ax


def _numpy(x: Tensor) -> np.ndarray:
    x = x.detach().cpu()
    return (x.double() if x.is_floating_point() else x).numpy()


def _inputs(x, name: str) -> Tensor:
    """1-D inputs given as ``N`` or ``N x 1``, flattened to ``N``."""
    _check_tensor(x, name, (1, 2), "N or N x 1", floating=False)
    if x.ndim == 2 and x.shape[1] != 1:
        raise ValueError(f"{name} must be N or N x 1, got shape {tuple(x.shape)}")
    return x.reshape(-1)


def plot_predictive_band(
    x: Tensor,
    y: Tensor,
    mean: Tensor,
    lower: Tensor,
    upper: Tensor,
    ax: Axes | None = None,
    x_test: Tensor | None = None,
    y_test: Tensor | None = None,
    true_fn: Callable[[Tensor], Tensor] | None = None,
) -> Axes:
    """
    1-D regression: observed data, predictive mean and a shaded interval.

    The predictions ``mean``, ``lower`` and ``upper`` are at ``x_test`` when it is given
    (e.g. a dense grid or held-out inputs), otherwise at ``x``.

    Draws, in order: the interval (a ``fill_between`` collection), the mean (a line), the
    true function (a dashed line, when ``true_fn`` is given), the data ``(x, y)`` (a scatter)
    and the test points ``(x_test, y_test)`` (a scatter, when ``y_test`` is given).

    :param x: ``N`` or ``N x 1`` observed inputs.
    :param y: ``N`` observed targets.
    :param mean: ``M`` predictive means (``M = N`` without ``x_test``).
    :param lower: ``M`` lower interval ends.
    :param upper: ``M`` upper interval ends.
    :param ax: axes to draw on; a new figure when ``None``.
    :param x_test: ``M`` or ``M x 1`` inputs of the predictions.
    :param y_test: ``M`` targets at ``x_test`` (needs ``x_test``).
    :param true_fn: the regression function, called on a 500-point grid spanning the
        inputs, shaped and typed like ``x`` (``G`` or ``G x 1``, same device and dtype).
    """
    x_flat = _inputs(x, "x")
    _check_same_shape(y, "y", x_flat, "x", floating=False)
    x_pred = x_flat if x_test is None else _inputs(x_test, "x_test")
    _check_same_shape(mean, "mean", x_pred, "x_test" if x_test is not None else "x")
    _check_same_shape(lower, "lower", mean, "mean")
    _check_same_shape(upper, "upper", mean, "mean")
    _check_interval(lower, upper)
    if y_test is not None:
        if x_test is None:
            raise ValueError("y_test needs x_test")
        _check_same_shape(y_test, "y_test", x_pred, "x_test", floating=False)

    ax = _axes(ax)
    order = torch.argsort(x_pred)
    xs = _numpy(x_pred[order])
    ax.fill_between(xs, _numpy(lower[order]), _numpy(upper[order]), alpha=0.3, label="predictive interval")
    ax.plot(xs, _numpy(mean[order]), label="predictive mean")
    if true_fn is not None:
        lo, hi = torch.cat([x_flat, x_pred]).aminmax()
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        grid = torch.linspace(float(lo), float(hi), 500, dtype=dtype, device=x.device)
        values = true_fn(grid.reshape(-1, *x.shape[1:]))
        ax.plot(_numpy(grid), _numpy(values.reshape(-1)), "k--", label="true function")
    ax.scatter(_numpy(x_flat), _numpy(y), s=12, color="k", label="data")
    if y_test is not None:
        ax.scatter(_numpy(x_pred), _numpy(y_test), s=12, marker="x", color="tab:red", label="test")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend()
    return ax


def plot_predicted_vs_true(
    y_true: Tensor, mean: Tensor, lower: Tensor, upper: Tensor, ax: Axes | None = None
) -> Axes:
    """
    Predicted means against targets with interval error bars and the diagonal ``y = x``;
    the title gives the RMSE and the interval coverage (PICP).

    Draws one ``errorbar`` (a marker line and a bar collection) and the diagonal (a line).

    :param y_true: ``N`` targets.
    :param mean: ``N`` predictive means.
    :param lower: ``N`` lower interval ends.
    :param upper: ``N`` upper interval ends.
    :param ax: axes to draw on; a new figure when ``None``.
    """
    # checked here, by this function's argument names (picp and rmse name theirs)
    _check_tensor(y_true, "y_true", (1,), "N", floating=False)
    for name, t in (("mean", mean), ("lower", lower), ("upper", upper)):
        _check_same_shape(t, name, y_true, "y_true")
    coverage = picp(lower, upper, y_true)
    error = rmse(mean, y_true)

    ax = _axes(ax)
    # Clipped at zero: a mean may fall outside a quantile interval.
    below = (mean - lower).clamp_min(0)
    above = (upper - mean).clamp_min(0)
    ax.errorbar(
        _numpy(y_true), _numpy(mean), yerr=np.stack([_numpy(below), _numpy(above)]),
        fmt="o", markersize=3, elinewidth=1, alpha=0.7, label="prediction",
    )
    lo = float(torch.minimum(y_true.min(), lower.min()))
    hi = float(torch.maximum(y_true.max(), upper.max()))
    ax.plot([lo, hi], [lo, hi], "k--", label="y = x")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(f"RMSE = {float(error):.3g}, coverage = {100 * float(coverage):.1f}%")
    ax.legend()
    return ax


def plot_reliability_diagram(probs: Tensor, y: Tensor, num_bins: int = 15, ax: Axes | None = None) -> Axes:
    """
    Reliability diagram (Guo et al., 2017): accuracy per equal-width confidence bin as bars
    against the diagonal of perfect calibration, with the ECE in the title.

    Draws ``num_bins`` bars (empty bins have height 0) and the diagonal (a line).

    :param probs: ``N x C`` predictive probabilities (``S x N x C`` samples are averaged over ``S``).
    :param y: ``N`` integer labels.
    :param num_bins: number of equal-width bins on ``[0, 1]``.
    :param ax: axes to draw on; a new figure when ``None``.
    """
    _, acc, _ = calibration_curve(probs, y, num_bins=num_bins)
    ece = expected_calibration_error(probs, y, num_bins=num_bins)

    ax = _axes(ax)
    edges = np.linspace(0, 1, num_bins + 1)
    ax.bar(edges[:-1], np.nan_to_num(_numpy(acc)), width=1 / num_bins, align="edge",
           edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE = {float(ece):.4f}")
    ax.legend(loc="upper left")
    return ax


def plot_uncertainty_histogram(
    score_in: Tensor,
    score_out: Tensor,
    ax: Axes | None = None,
    label: str = "uncertainty",
    bins: int = 30,
) -> Axes:
    """
    Overlaid density histograms of an uncertainty score on in- and out-of-distribution
    points, with the AUROC of separating them (:func:`~bnnpyro.predict.metrics.auroc`,
    larger score = more OOD) in the title.

    Draws two filled step histograms (one patch each) on shared bins.

    :param score_in: ``N_in`` scores of in-distribution points.
    :param score_out: ``N_out`` scores of out-of-distribution points.
    :param ax: axes to draw on; a new figure when ``None``.
    :param label: name of the score, for the x axis.
    :param bins: number of shared equal-width bins.
    """
    area = auroc(score_in, score_out)
    s_in, s_out = _numpy(score_in), _numpy(score_out)

    ax = _axes(ax)
    edges = np.histogram_bin_edges(np.concatenate([s_in, s_out]), bins=bins)
    ax.hist(s_in, bins=edges, density=True, histtype="stepfilled", alpha=0.5, label="in-distribution")
    ax.hist(s_out, bins=edges, density=True, histtype="stepfilled", alpha=0.5, label="out-of-distribution")
    ax.set_xlabel(label)
    ax.set_ylabel("density")
    ax.set_title(f"AUROC = {float(area):.3f}")
    ax.legend()
    return ax
