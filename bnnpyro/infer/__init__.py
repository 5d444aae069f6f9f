"""Training helpers: a thin loop over SVI.step and the ELBO's NLL/KL split."""

from bnnpyro.infer.elbo_terms import elbo_terms
from bnnpyro.infer.fit import FitHistory, fit

__all__ = ["FitHistory", "elbo_terms", "fit"]
