"""bnnpyro: Bayesian neural networks on Pyro."""

from bnnpyro import distributions
from bnnpyro.distributions import HiddenLayer

__version__ = "0.1.0"

__all__ = ["HiddenLayer", "distributions", "__version__"]
