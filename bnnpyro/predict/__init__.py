"""Posterior predictive sampling, uncertainty summaries, metrics and plots."""

from bnnpyro.predict.evaluate import evaluate_regression
from bnnpyro.predict.metrics import (
    accuracy,
    auroc,
    brier,
    calibration_curve,
    classwise_ece,
    crps_ensemble,
    crps_gaussian,
    expected_calibration_error,
    expected_entropy,
    gaussian_log_likelihood,
    mean_interval_width,
    mutual_information,
    nll,
    per_class_ece,
    picp,
    predictive_entropy,
    rmse,
)
from bnnpyro.predict.plots import (
    plot_predicted_vs_true,
    plot_predictive_band,
    plot_reliability_diagram,
    plot_uncertainty_histogram,
)
from bnnpyro.predict.predictive import sample_predictive
from bnnpyro.predict.summary import (
    gaussian_mixture_interval,
    mean_probs,
    normal_interval,
    predictive_mean,
    predictive_std,
    quantile_interval,
)

__all__ = [
    "sample_predictive",
    "evaluate_regression",
    "predictive_mean",
    "predictive_std",
    "quantile_interval",
    "normal_interval",
    "gaussian_mixture_interval",
    "mean_probs",
    "rmse",
    "gaussian_log_likelihood",
    "picp",
    "mean_interval_width",
    "crps_gaussian",
    "crps_ensemble",
    "accuracy",
    "nll",
    "brier",
    "expected_calibration_error",
    "calibration_curve",
    "per_class_ece",
    "classwise_ece",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "auroc",
    "plot_predictive_band",
    "plot_predicted_vs_true",
    "plot_reliability_diagram",
    "plot_uncertainty_histogram",
]
