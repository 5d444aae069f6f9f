"""One-call evaluation of a regression predictive, in the target's original units."""

from __future__ import annotations

import math

from torch import Tensor

from bnnpyro.predict.metrics import gaussian_log_likelihood, mean_interval_width, picp, rmse
from bnnpyro.predict.summary import gaussian_mixture_interval, predictive_mean, predictive_std


def evaluate_regression(
    mean_samples: Tensor,
    noise_scale: Tensor | float,
    y: Tensor,
    *,
    level: float = 0.95,
    y_scale: float = 1.0,
) -> dict[str, float]:
    r"""
    Test metrics of a Gaussian-mixture predictive ``p(y|x) = 1/S sum_s N(y; mu_s(x), sigma_s(x)^2)``.

    ``y`` and the samples may be standardized (``y_std = (y - m) / y_scale``): RMSE and interval
    width are multiplied by ``y_scale`` and ``log(y_scale)`` is subtracted from the average
    log-likelihood, so every number is in the original units (the UCI protocol of
    Hernández-Lobato & Adams 2015).

    :param mean_samples: ``S x N`` predictive means.
    :param noise_scale: noise std, scalar, ``N``, ``S x 1`` or ``S x N``.
    :param y: ``N`` targets.
    :returns: ``rmse``, ``log_likelihood`` (per point), ``coverage`` (PICP of the central
        ``level`` interval of the mixture), ``interval_width`` (its mean width), ``mean_std``.
    """
    mean = predictive_mean(mean_samples)
    lower, upper = gaussian_mixture_interval(mean_samples, noise_scale, level)
    return {
        "rmse": float(rmse(mean, y)) * y_scale,
        "log_likelihood": float(gaussian_log_likelihood(mean_samples, noise_scale, y)) - math.log(y_scale),
        "coverage": float(picp(lower, upper, y)),
        "interval_width": float(mean_interval_width(lower, upper)) * y_scale,
        "mean_std": float(predictive_std(mean_samples, noise_scale).mean()) * y_scale,
    }
