"""FactorizedNormal equals Normal(loc, scale).to_event(k): densities, gradients, KLs, ELBOs."""

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from bnnpyro.distributions import FactorizedNormal


def _params(shape=(4, 3)):
    loc = torch.randn(shape, requires_grad=True)
    rho = torch.randn(shape, requires_grad=True)
    return loc, rho


def _grads(y, xs):
    return [torch.zeros_like(x) if g is None else g
            for x, g in zip(xs, torch.autograd.grad(y, xs, retain_graph=True, allow_unused=True))]


def test_log_prob_of_its_own_sample_values_and_total_gradients():
    """The shortcut ``-|eps|^2/2 - sum log sigma`` has the value and the total gradient (through
    the reparameterized sample) of the elementwise formula."""
    loc, rho = _params()
    q = FactorizedNormal(loc, F.softplus(rho))
    ref = dist.Normal(loc, F.softplus(rho)).to_event(2)
    assert q.batch_shape == () and q.event_shape == (4, 3)
    w = q.rsample()
    a, b = q.log_prob(w), ref.log_prob(w)
    torch.testing.assert_close(a, b)
    for ga, gb in zip(_grads(a, [loc, rho]), _grads(b, [loc, rho])):
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("scalar", [True, False])
def test_log_prob_of_other_values(scalar):
    shape = (5, 2)
    loc = torch.tensor(0.3) if scalar else torch.randn(shape)
    scale = torch.tensor(0.7) if scalar else torch.rand(shape) + 0.1
    p = FactorizedNormal(loc, scale, shape)
    ref = dist.Normal(loc, scale).expand(shape).to_event(2)
    w = torch.randn(3, *shape, requires_grad=True)
    torch.testing.assert_close(p.log_prob(w), ref.log_prob(w))
    torch.testing.assert_close(_grads(p.log_prob(w).sum(), [w])[0], _grads(ref.log_prob(w).sum(), [w])[0])


@pytest.mark.parametrize("prior", ["scalar", "zero-mean", "tensor", "expanded"])
def test_kl_matches_torch_normal_normal(prior):
    loc, rho = _params()
    q = FactorizedNormal(loc, F.softplus(rho))
    q_ref = dist.Normal(loc, F.softplus(rho)).to_event(2)
    if prior in ("scalar", "zero-mean", "expanded"):
        m0 = torch.tensor(0.0 if prior == "zero-mean" else -0.4)
        s0 = torch.tensor(1.3, requires_grad=True)
    else:
        m0, s0 = torch.randn(4, 3), (torch.rand(4, 3) + 0.2).requires_grad_()
    p_ref = dist.Normal(m0, s0).expand((4, 3)).to_event(2)
    expected = kl_divergence(q_ref, p_ref)
    p = FactorizedNormal(m0.expand(4, 3), s0.expand(4, 3)) if prior == "expanded" else FactorizedNormal(m0, s0, (4, 3))
    for kl in (kl_divergence(q, p), kl_divergence(q, p_ref), kl_divergence(q_ref, p)):
        torch.testing.assert_close(kl, expected)
        for ga, gb in zip(_grads(kl, [loc, rho, s0]), _grads(expected, [loc, rho, s0])):
            torch.testing.assert_close(ga, gb)


def test_entropy_expand_and_batch_dims():
    loc, rho = torch.randn(2, 4, 3), torch.randn(1, 3)
    q = FactorizedNormal(loc, F.softplus(rho), (4, 3))
    ref = dist.Normal(loc, F.softplus(rho)).to_event(2)
    assert q.batch_shape == (2,)
    torch.testing.assert_close(q.entropy(), ref.entropy())
    e = q.expand((5, 2))
    w = e.rsample((6,))
    assert w.shape == (6, 5, 2, 4, 3)
    torch.testing.assert_close(e.log_prob(w), ref.expand((5, 2)).log_prob(w))
    with pytest.raises(ValueError, match="event_shape"):
        FactorizedNormal(torch.zeros(3), torch.ones(3), (4,))


def test_elbos_equal_the_normal_to_event_version_under_the_same_noise():
    """Trace_ELBO (Monte Carlo log q - log p) and TraceMeanField_ELBO (closed-form KL) give the same
    loss and gradients with FactorizedNormal sites as with Normal(...).to_event sites."""
    x = torch.randn(6, 3)
    y = torch.randn(6)
    loc, rho = _params((3,))

    def model(factorized):
        prior = FactorizedNormal(0.0, 1.0, (3,)) if factorized else dist.Normal(0.0, 1.0).expand((3,)).to_event(1)
        w = pyro.sample("w", prior)
        with pyro.plate("data", 6):
            pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    def guide(factorized):
        q = FactorizedNormal(loc, F.softplus(rho)) if factorized else dist.Normal(loc, F.softplus(rho)).to_event(1)
        pyro.sample("w", q)

    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        results = []
        for factorized in (True, False):
            torch.manual_seed(0)
            loss = elbo.differentiable_loss(model, guide, factorized)
            results.append((loss, _grads(loss, [loc, rho])))
        (la, ga), (lb, gb) = results
        torch.testing.assert_close(la, lb)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)


def test_cached_log_scale_sum_follows_grad_mode():
    """The log density and the KL share one ``sum log sigma``; one first computed without gradients
    is not reused where gradients are needed."""
    loc, rho = _params()
    q = FactorizedNormal(loc, F.softplus(rho))
    p = FactorizedNormal(0.0, 1.0, (4, 3))
    with torch.no_grad():
        q.log_prob(q.rsample())
    kl = kl_divergence(q, p)
    expected = kl_divergence(dist.Normal(loc, F.softplus(rho)).to_event(2), dist.Normal(0.0, 1.0).expand((4, 3)).to_event(2))
    torch.testing.assert_close(_grads(kl, [rho])[0], _grads(expected, [rho])[0])


def test_squared_norm_node_values_and_gradient():
    from bnnpyro.distributions.kl import sum_squares as _sum_squares

    t = torch.randn(7, 5, requires_grad=True)
    torch.autograd.gradcheck(lambda u: _sum_squares(u, 2), (t.double().detach().requires_grad_(),))
    torch.testing.assert_close(_sum_squares(t, 2), (t * t).sum())
    torch.testing.assert_close(_sum_squares(t, 1), (t * t).sum(-1))
    torch.testing.assert_close(_sum_squares(t.t(), 2), (t * t).sum())  # non-contiguous


def test_validation_of_values_not_drawn_by_a_factorized_normal():
    """A value drawn by a FactorizedNormal is not re-checked by another one (the prior at the
    model's site); any other value is, like ``Normal(...).to_event``: NaN entries, wrong shape."""
    p = FactorizedNormal(0.0, 1.0, (4, 3), validate_args=True)
    q = FactorizedNormal(torch.zeros(4, 3), torch.ones(4, 3))
    assert torch.isfinite(p.log_prob(q.rsample()))
    with pytest.raises(ValueError):
        p.log_prob(torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError):
        p.log_prob(torch.zeros(4, 2))
    # a draw of another shape is checked for its shape (it had skipped every check: a (3, 4) draw
    # scored under a (2, 3, 4) event broadcast to a batch of 3, an i.i.d. prior raised IndexError)
    w = FactorizedNormal(torch.zeros(3, 4), torch.ones(3, 4)).rsample()
    for prior in (FactorizedNormal(torch.zeros(2, 3, 4), torch.ones(2, 3, 4)),
                  FactorizedNormal(0.0, 1.0, (2, 3, 4), validate_args=True)):
        with pytest.raises(ValueError, match="right-most size of value must match event_shape"):
            prior.log_prob(w)


@pytest.mark.parametrize("prior_scale", [1e-4, 0.1, 1e4])
def test_summed_kl_of_a_large_float32_tensor_near_its_prior_keeps_float32_accuracy(prior_scale):
    """One million weights whose posterior is within 0.1% of the prior: a KL of about 1.5 nats,
    the difference of summed terms of about n |log s| (~1e7). Accumulated in float32 the summed
    form was off by up to 20 nats (665 for a 784-1200-1200-10 network at its prior); in float64 it
    is as accurate as torch's elementwise KL summed (float64 reference on the same float32 values)."""
    from torch.distributions import Normal, kl_divergence

    torch.manual_seed(0)
    n = 1_000_000
    loc = prior_scale * 1e-3 * torch.randn(n)
    scale = torch.full((n,), prior_scale) * (1 + 1e-3 * torch.randn(n))
    q = FactorizedNormal(loc, scale, (n,))
    p = FactorizedNormal(torch.zeros(()), torch.tensor(prior_scale), (n,))
    ref = kl_divergence(Normal(loc.double(), scale.double()), Normal(0.0, prior_scale)).sum()
    elementwise_error = (kl_divergence(Normal(loc, scale), Normal(0.0, prior_scale)).sum() - ref).abs()
    kl = kl_divergence(q, p)
    assert kl.dtype == torch.float32
    assert (kl.double() - ref).abs() < max(0.02, 3 * elementwise_error), (kl.item(), ref.item())
