"""PyroModule layers with PyroSample weights, for Pyro's autoguides."""

from bnnpyro.nn.embedding import BayesianEmbedding
from bnnpyro.nn.lstm import BayesianLSTM, BayesianWeights, lstm_forward

__all__ = ["BayesianEmbedding", "BayesianLSTM", "BayesianWeights", "lstm_forward"]
