"""The model catalogue: ready model/guide pairs for SVI."""

from bnnpyro.models.mlp import BayesianMLPClassifier, BayesianMLPRegressor

__all__ = ["BayesianMLPClassifier", "BayesianMLPRegressor"]
