"""Bayesian layers written as Pyro distributions over their activations, and weight priors."""

from bnnpyro.distributions.hidden_layer import HiddenLayer
from bnnpyro.distributions.kl import normal_kl, normal_kl_sum
from bnnpyro.distributions.priors import Prior, ScaleMixtureNormal

__all__ = ["HiddenLayer", "Prior", "ScaleMixtureNormal", "normal_kl", "normal_kl_sum"]
