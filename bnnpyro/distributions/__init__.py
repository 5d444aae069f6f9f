"""Bayesian layers written as Pyro distributions over their activations, and weight priors."""

from bnnpyro.distributions.conv import ConvLayer
from bnnpyro.distributions.embedding import EmbeddingLayer
from bnnpyro.distributions.factorized_normal import FactorizedNormal
from bnnpyro.distributions.folded_kl import FoldedKLLayer
from bnnpyro.distributions.hidden_layer import HiddenLayer
from bnnpyro.distributions.kl import normal_kl, normal_kl_sum
from bnnpyro.distributions.priors import (
    NormalPrior,
    ParameterPrior,
    Prior,
    ScaleMixtureNormal,
    ScaleMixturePrior,
    parameter_prior,
)

__all__ = [
    "ConvLayer",
    "EmbeddingLayer",
    "FactorizedNormal",
    "FoldedKLLayer",
    "HiddenLayer",
    "NormalPrior",
    "ParameterPrior",
    "Prior",
    "ScaleMixtureNormal",
    "ScaleMixturePrior",
    "normal_kl",
    "normal_kl_sum",
    "parameter_prior",
]
