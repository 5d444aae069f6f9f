"""PyroModule layers with PyroSample weights, for Pyro's autoguides; estimator handlers; to_bayesian."""

from bnnpyro.nn.activations import NON_LINEARITIES
from bnnpyro.nn.convert import estimator_for, pretrained_values, to_bayesian
from bnnpyro.nn.embedding import BayesianEmbedding
from bnnpyro.nn.estimators import ESTIMATORS, Flipout, LocalReparameterization, WeightSpace, estimator
from bnnpyro.nn.linear import BayesianLinear
from bnnpyro.nn.lstm import BayesianLSTM, BayesianWeights, flipout_signs, lstm_flipout_forward, lstm_forward
from bnnpyro.nn.mlp import LIKELIHOODS, BayesianMLP

__all__ = [
    "ESTIMATORS",
    "LIKELIHOODS",
    "NON_LINEARITIES",
    "BayesianEmbedding",
    "BayesianLSTM",
    "BayesianLinear",
    "BayesianMLP",
    "BayesianWeights",
    "Flipout",
    "LocalReparameterization",
    "WeightSpace",
    "estimator",
    "estimator_for",
    "flipout_signs",
    "lstm_flipout_forward",
    "lstm_forward",
    "pretrained_values",
    "to_bayesian",
]
