"""bnnpyro: Bayesian neural networks on Pyro."""

from bnnpyro import data, distributions, infer, models, predict
from bnnpyro.distributions import HiddenLayer
from bnnpyro.infer import fit
from bnnpyro.predict import sample_predictive
from bnnpyro.serialization import load, load_optim_state, save

__version__ = "0.1.0"

__all__ = [
    "HiddenLayer",
    "data",
    "distributions",
    "fit",
    "infer",
    "load",
    "load_optim_state",
    "models",
    "predict",
    "sample_predictive",
    "save",
    "__version__",
]
