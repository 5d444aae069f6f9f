"""PyroModule layers with PyroSample weights, for Pyro's autoguides."""

from bnnpyro.nn.activations import NON_LINEARITIES
from bnnpyro.nn.embedding import BayesianEmbedding
from bnnpyro.nn.linear import BayesianLinear
from bnnpyro.nn.lstm import BayesianLSTM, BayesianWeights, lstm_forward
from bnnpyro.nn.mlp import LIKELIHOODS, BayesianMLP

__all__ = [
    "LIKELIHOODS",
    "NON_LINEARITIES",
    "BayesianEmbedding",
    "BayesianLSTM",
    "BayesianLinear",
    "BayesianMLP",
    "BayesianWeights",
    "lstm_forward",
]
