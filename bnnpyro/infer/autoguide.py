"""An AutoNormal whose sites are Normal distributions, so TraceMeanField_ELBO uses the closed-form KL."""

from __future__ import annotations

from contextlib import ExitStack

import pyro
import pyro.distributions as dist
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoNormal
from torch.distributions import biject_to, constraints

from bnnpyro.distributions import FactorizedNormal
from bnnpyro.nn.param_names import NewParamNameOnCopy, new_param_prefix


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class AnalyticAutoNormal(NewParamNameOnCopy, AutoNormal):
    r"""
    :class:`pyro.infer.autoguide.AutoNormal` with the same parameters, initialisation and API,
    differing in one respect: at every site with real support it samples
    ``Normal(loc, scale).to_event(k)`` *at the site itself*. Pyro's ``AutoNormal`` (1.9) samples an
    auxiliary ``<name>_unconstrained`` Normal and puts a ``Delta`` at the site, so
    ``TraceMeanField_ELBO`` cannot find a closed-form KL and falls back to the Monte Carlo estimate
    ``log q - log p``. Here, for a Normal prior, ``kl_divergence(Normal, Normal)`` is used: lower
    variance gradients for the weights of a Bayesian network, same optimum. Sites with constrained
    support (e.g. a positive noise scale) are handled exactly as in ``AutoNormal``.

    Each instance keeps its parameters in Pyro's param store under a name of its own
    (``AnalyticAutoNormal_<k>.locs.<site>``), so two guides in one process never share them (two
    of Pyro's ``AutoNormal`` s for models with the same site names do); so does a deep copy or an
    unpickled guide. As with Pyro's autoguides, a copy holds no reference to the model; unlike
    them, copying leaves the original's reference in place.
    """

    def __init__(self, model, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self._pyro_name = new_param_prefix(type(self).__name__)

    def __getstate__(self) -> dict:
        # Pyro's AutoGuide leaves its model out of a copy or pickle by dropping its own reference to
        # it, which broke the original; here only the copy's state goes without it
        model, master = self._model, self.master
        state = dict(super().__getstate__())
        self._model, self.master = model, master
        return state

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                loc, scale = self._get_loc_and_scale(name)
                event_dim = self._event_dims[name]
                if _is_real(site["fn"].support):
                    event_shape = loc.shape[loc.dim() - event_dim:]
                    # loc and scale are the guide's own parameters (scale positive by its constraint):
                    # no per-step argument checks
                    q = FactorizedNormal(loc, scale, event_shape, validate_args=False)
                    result[name] = pyro.sample(name, q)
                    continue
                normal = dist.Normal(loc, scale).to_event(event_dim)
                transform = biject_to(site["fn"].support)
                unconstrained = pyro.sample(name + "_unconstrained", normal, infer={"is_auxiliary": True})
                value = transform(unconstrained)
                if pyro.poutine.get_mask() is False:
                    log_density = 0.0
                else:
                    log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
                    log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + site["fn"].event_dim)
                delta = dist.Delta(value, log_density=log_density, event_dim=site["fn"].event_dim)
                result[name] = pyro.sample(name, delta)
        return result
