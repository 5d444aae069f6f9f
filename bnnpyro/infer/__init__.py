"""Training helpers: a thin loop over SVI.step, the ELBO's NLL/KL split, an analytic-KL AutoNormal,
a compiled mean-field ELBO, data-parallel SVI on torch.distributed."""

from bnnpyro.infer.autoguide import AnalyticAutoNormal
from bnnpyro.infer.distributed import DistributedSVI, fit_distributed, shard
from bnnpyro.infer.elbo_terms import elbo_terms
from bnnpyro.infer.fit import FitHistory, fit
from bnnpyro.infer.jit import JitTraceMeanField_ELBO

__all__ = [
    "AnalyticAutoNormal",
    "DistributedSVI",
    "FitHistory",
    "JitTraceMeanField_ELBO",
    "elbo_terms",
    "fit",
    "fit_distributed",
    "shard",
]
