"""One-call evaluation of a predictive: regression (in the target's original units) and classification."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from bnnpyro.predict.metrics import (
    accuracy,
    auroc,
    expected_calibration_error,
    gaussian_log_likelihood,
    mean_interval_width,
    mutual_information,
    nll,
    picp,
    rmse,
)
from bnnpyro.predict.summary import gaussian_mixture_interval, mean_probs, predictive_mean, predictive_std


@torch.no_grad()
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
    Hernández-Lobato & Adams 2015). Computed without autograd: inputs that require grad (a
    model's learned noise scale) are fine.

    :param mean_samples: ``S x N`` predictive means.
    :param noise_scale: noise std, scalar, ``N``, ``S x 1`` or ``S x N``.
    :param y: ``N`` targets.
    :returns: ``rmse``, ``log_likelihood`` (per point), ``coverage`` (PICP of the central
        ``level`` interval of the mixture), ``interval_width`` (its mean width), ``mean_std``.
    """
    if torch.is_tensor(y_scale) and y_scale.numel() == 1:
        y_scale = float(y_scale)
    if isinstance(y_scale, bool) or not isinstance(y_scale, numbers.Real) or not y_scale > 0:
        raise ValueError(f"y_scale must be a positive number (the target's standard deviation), got {y_scale!r}")
    mean = predictive_mean(mean_samples)
    lower, upper = gaussian_mixture_interval(mean_samples, noise_scale, level)
    return {
        "rmse": float(rmse(mean, y)) * y_scale,
        "log_likelihood": float(gaussian_log_likelihood(mean_samples, noise_scale, y)) - math.log(y_scale),
        "coverage": float(picp(lower, upper, y)),
        "interval_width": float(mean_interval_width(lower, upper)) * y_scale,
        "mean_std": float(predictive_std(mean_samples, noise_scale).mean()) * y_scale,
    }


@torch.no_grad()
def evaluate_classification(
    probs_samples: Tensor, y: Tensor, ood_probs_samples: Tensor | None = None
) -> dict[str, float]:
    r"""
    Test metrics of a classification predictive ``p(y|x) = 1/S sum_s p_s(y|x)``, and how well its
    epistemic uncertainty separates out-of-distribution inputs.

    :param probs_samples: ``S x N x C`` class probabilities of ``S`` posterior draws.
    :param y: ``N`` int64 labels.
    :param ood_probs_samples: ``S x M x C`` probabilities on out-of-distribution inputs, or None.
    :returns: ``accuracy``, ``nll`` and ``ece`` (15 bins) of the mean probabilities, ``mi_in``
        (mean mutual information between label and weights, BALD), and with ``ood_probs_samples``
        ``mi_ood`` and ``auroc_mi`` (the AUROC of mutual information for telling the two apart).
    """
    probs = mean_probs(probs_samples)
    mi_in = mutual_information(probs_samples)
    metrics = {
        "accuracy": float(accuracy(probs, y)),
        "nll": float(nll(probs, y)),
        "ece": float(expected_calibration_error(probs, y)),
        "mi_in": float(mi_in.mean()),
    }
    if ood_probs_samples is not None:
        mi_out = mutual_information(ood_probs_samples)
        metrics["mi_ood"] = float(mi_out.mean())
        metrics["auroc_mi"] = float(auroc(mi_in, mi_out))
    return metrics
