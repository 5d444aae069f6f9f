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
    loss = TraceMeanField_ELBO(num_particles=20_000, vectorize_particles=True).loss(model_pos, guide)
    # both sites start at the prior's median with scale 0.1: KL of each is known in closed form
    kl_w = kl_divergence(dist.Normal(0.0, 0.1), dist.Normal(0.0, 1.0)).item()
    kl_s = kl_w  # log of a LogNormal is Normal: the same KL in the unconstrained space
    # Monte Carlo: per particle and site log q - log p = -log 0.1 - 0.495 u^2 (u ~ N(0, 1)), of
    # variance 0.495^2 * 2 = 0.49; two sites over 20,000 particles: standard error 0.007; 5 of them
    assert loss == pytest.approx(kl_w + kl_s, abs=0.035)


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


@pytest.mark.parametrize("prior_scale", [1.0, "fan_in"])
def test_bayesian_linear_prior_is_the_normal_event_it_stands_for(prior_scale):
    """BayesianLinear's Normal prior is a FactorizedNormal (its log density a norm, one pass): the
    log density of any weights, batched or not, and its gradient equal those of
    ``Normal(0, s).expand(shape).to_event(2)``; so do the MC and closed-form ELBOs of the model."""
    from bnnpyro.nn import BayesianMLP
    from bnnpyro.nn.linear import BayesianLinear

    layer = BayesianLinear(5, 3, prior_scale=prior_scale)
    s = 1.0 if prior_scale == 1.0 else 5 ** -0.5
    for shape in [(3, 5), (7, 1, 3, 5)]:
        w = torch.randn(shape, requires_grad=True)
        prior = layer.prior_distribution((3, 5))
        reference = dist.Normal(0.0, s).expand([3, 5]).to_event(2)
        (g,) = torch.autograd.grad(prior.log_prob(w).sum(), w)
        (g_ref,) = torch.autograd.grad(reference.log_prob(w).sum(), w)
        torch.testing.assert_close(prior.log_prob(w), reference.log_prob(w))
        torch.testing.assert_close(g, g_ref)
    # the ELBO of a whole BayesianMLP under Pyro's AutoNormal (Monte Carlo KL through the prior's
    # log density) against the same network built with Normal(...).to_event priors, same draws
    pyro.clear_param_store()
    x, y = torch.randn(10, 4), torch.randn(10)
    original = BayesianLinear.prior_distribution

    def to_event_prior(self, shape):
        d = original(self, shape)
        return dist.Normal(d.loc, d.scale).expand(torch.Size(shape)).to_event(len(shape))

    nets, guides = [], []
    for prior_distribution in (original, to_event_prior):
        BayesianLinear.prior_distribution = prior_distribution  # bound when the layers are built
        try:
            nets.append(BayesianMLP(4, 1, hidden=(6,), dataset_size=20, prior_scale=prior_scale))
        finally:
            BayesianLinear.prior_distribution = original
        guides.append(make_unique(AutoNormal(nets[-1])))
        guides[-1](x, y)
    guides[1].load_state_dict(guides[0].state_dict())
    trace = pyro.poutine.trace(nets[1]).get_trace(x, y)
    assert isinstance(trace.nodes["layers.0.weight"]["fn"], dist.Independent)
    losses = []
    for net, guide in zip(nets, guides):
        pyro.set_rng_seed(1)
        losses.append(TraceMeanField_ELBO().loss(net, guide, x, y))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
