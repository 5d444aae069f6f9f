"""bnnpyro: Bayesian neural networks on Pyro."""

from bnnpyro import data, distributions, infer, models, predict
from bnnpyro.distributions import HiddenLayer
from bnnpyro.infer import fit
from bnnpyro.predict import sample_predictive

__version__ = "0.1.0"

__all__ = [
    "HiddenLayer",
    "data",
    "distributions",
    "fit",
    "infer",
    "models",
    "predict",
    "sample_predictive",
    "__version__",
]
