"""The model catalogue: ready model/guide pairs for SVI."""

from bnnpyro.models.cnn import BayesianCNNClassifier
from bnnpyro.models.lstm import BayesianLSTMClassifier, BayesianLSTMLanguageModel
from bnnpyro.models.mlp import BayesianMLPClassifier, BayesianMLPRegressor

__all__ = [
    "BayesianCNNClassifier",
    "BayesianLSTMClassifier",
    "BayesianLSTMLanguageModel",
    "BayesianMLPClassifier",
    "BayesianMLPRegressor",
]
