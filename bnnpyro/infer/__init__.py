"""Training helpers: a thin loop over SVI.step, the ELBO's NLL/KL split, an analytic-KL AutoNormal."""

from bnnpyro.infer.autoguide import AnalyticAutoNormal
from bnnpyro.infer.elbo_terms import elbo_terms
from bnnpyro.infer.fit import FitHistory, fit

__all__ = ["AnalyticAutoNormal", "FitHistory", "elbo_terms", "fit"]
