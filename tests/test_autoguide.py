"""AnalyticAutoNormal: TraceMeanField_ELBO gets the closed-form KL; constrained sites as AutoNormal."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from torch.distributions import kl_divergence

from bnnpyro.infer import AnalyticAutoNormal
from bnnpyro.serialization import make_unique


def model():
    pyro.sample("w", dist.Normal(0.0, 0.5).expand([3, 4]).to_event(2))
    pyro.sample("b", dist.Normal(1.0, 2.0).expand([4]).to_event(1))


def _analytic_kl(guide):
    total = 0.0
    for name, prior in (("w", dist.Normal(0.0, 0.5)), ("b", dist.Normal(1.0, 2.0))):
        loc, scale = guide._get_loc_and_scale(name)
        total = total + kl_divergence(dist.Normal(loc, scale), prior).sum()
    return total.item()


def test_loss_is_the_closed_form_kl_exactly():
    guide = AnalyticAutoNormal(model, init_scale=0.3)
    guide()  # set up parameters
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))
    losses = {TraceMeanField_ELBO().loss(model, guide) for _ in range(5)}
    assert len(losses) == 1  # no Monte Carlo noise at all
    assert losses.pop() == pytest.approx(_analytic_kl(guide), rel=1e-5)
    # Pyro's AutoNormal: the same KL only in expectation (Monte Carlo over log q - log p)
    pyro_guide = AutoNormal(model, init_scale=0.3)
    pyro_guide()
    assert len({TraceMeanField_ELBO().loss(model, pyro_guide) for _ in range(5)}) > 1


def test_same_parameters_and_samples_distribution_as_autonormal():
    guide = AnalyticAutoNormal(model, init_scale=0.3)
    samples = torch.stack([guide()["w"] for _ in range(4000)])
    loc, scale = guide._get_loc_and_scale("w")
    assert samples.shape == (4000, 3, 4)
    assert ((samples.mean(0) - loc).abs() < 5 * scale / 4000**0.5).all()
    assert ((samples.std(0) / scale - 1).abs() < 0.1).all()


def test_constrained_sites_as_in_autonormal():
    def model_pos():
        pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("w", dist.Normal(0.0, 1.0))

    guide = AnalyticAutoNormal(model_pos)
    tr = pyro.poutine.trace(guide).get_trace()
    assert "s_unconstrained" in tr.nodes and "w_unconstrained" not in tr.nodes
    assert (tr.nodes["s"]["value"] > 0).all()
    loss = TraceMeanField_ELBO(num_particles=2000, vectorize_particles=True).loss(model_pos, guide)
    # both sites start at the prior's median with scale 0.1: KL of each is known in closed form
    kl_w = kl_divergence(dist.Normal(0.0, 0.1), dist.Normal(0.0, 1.0)).item()
    kl_s = kl_w  # log of a LogNormal is Normal: the same KL in the unconstrained space
    assert loss == pytest.approx(kl_w + kl_s, abs=0.05)


def test_make_unique_keeps_two_guides_apart():
    a = make_unique(AnalyticAutoNormal(model))
    b = make_unique(AnalyticAutoNormal(model))
    a(), b()
    with torch.no_grad():
        a.locs.w.fill_(1.0)
    assert torch.equal(b.locs.w, torch.zeros(3, 4))
    assert len([k for k in pyro.get_param_store().keys() if k.endswith("locs.w")]) == 2


def test_two_guides_never_share_parameters_by_default():
    a, b = AnalyticAutoNormal(model), AnalyticAutoNormal(model)
    a(), b()
    with torch.no_grad():
        a.locs.w.fill_(1.0)
    assert torch.equal(b.locs.w, torch.zeros(3, 4))
    assert len([k for k in pyro.get_param_store().keys() if k.endswith("locs.w")]) == 2
