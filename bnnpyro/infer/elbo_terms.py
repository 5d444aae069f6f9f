"""Split a single-sample ELBO estimate into its expected-NLL and KL parts."""

from __future__ import annotations

from typing import Any, Callable

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor
from torch.distributions import kl_divergence


def elbo_terms(
    model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    r"""
    Split a single-sample estimate of the negative ELBO into its data and
    regularisation parts,

    .. math::

        -\mathrm{ELBO} = \underbrace{-\mathbb E_q[\log p(y\mid z)]}_{\texttt{nll}}
        + \underbrace{\mathrm{KL}(q(z)\,\Vert\,p(z))}_{\texttt{kl}},

    from one traced pass: the guide is traced, the model is replayed against
    the guide's samples, and

    - ``nll`` is minus the sum of the scaled log-probabilities of the model's
      observed sites;
    - ``kl`` is, over the model's latent sites, the sum of the closed-form
      :func:`torch.distributions.kl_divergence` of the guide's distribution
      from the model's where one is registered, and of the single-sample
      estimate ``log q(z) - log p(z)`` otherwise; the guide site's ``scale``
      and ``mask`` apply to the closed form, each trace's own to the
      log-probabilities. Guide sites absent from the model (auxiliary sites)
      add their ``log q``.

    Every term carries its site's ``scale``: for a model that scales its
    likelihood by ``N / B`` in ``pyro.plate("data", N, subsample=...)``,
    ``nll`` estimates the full-data expected NLL from the minibatch and
    ``kl`` is counted once. With the same random state, ``nll + kl`` equals
    ``TraceMeanField_ELBO().loss(model, guide, *args, **kwargs)``.

    Gradients flow as usual; wrap the call in :func:`torch.no_grad` when only
    the values are needed.

    :param callable model: a Pyro model.
    :param callable guide: a Pyro guide for ``model``.
    :param args: positional arguments to both, e.g. a minibatch ``x, y``.
    :param kwargs: keyword arguments to both.
    :returns: ``(nll, kl)``, two scalar tensors.
    :rtype: tuple(torch.Tensor, torch.Tensor)
    :raises ValueError: if a latent site of the model has no counterpart in
        the guide.
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()

    nll: Tensor | float = 0.0
    kl: Tensor | float = 0.0
    for name, model_site in model_trace.nodes.items():
        if model_site["type"] != "sample":
            continue
        if model_site["is_observed"]:
            nll = nll - model_site["log_prob_sum"]
            continue
        if name not in guide_trace.nodes:
            raise ValueError(f"latent site {name!r} of the model has no counterpart in the guide")
        guide_site = guide_trace.nodes[name]
        try:
            site_kl = kl_divergence(guide_site["fn"], model_site["fn"])
        except NotImplementedError:
            kl = kl + guide_site["log_prob_sum"] - model_site["log_prob_sum"]
        else:
            site_kl = scale_and_mask(site_kl, scale=guide_site["scale"], mask=guide_site["mask"])
            kl = kl + torch.as_tensor(site_kl).expand(guide_site["fn"].batch_shape).sum()
    for name, guide_site in guide_trace.nodes.items():
        if guide_site["type"] == "sample" and name not in model_trace.nodes:
            kl = kl + guide_site["log_prob_sum"]
    return torch.as_tensor(nll), torch.as_tensor(kl)
