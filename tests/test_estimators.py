"""
Estimator handlers (weight space, local reparameterization, flipout) on PyroModules with Pyro's
AutoNormal: pre-activation moments against the closed form and weight-space Monte Carlo, the
examples' correlation, the ELBO's expectation, gradient variance, fallbacks, usage, no leaks.

Tolerances: S independent draws of a Normal N(m, v) give a sample mean with standard error
sqrt(v / S) and a sample variance with standard error v * sqrt(2 / (S - 1)); every comparison is
within 5 standard errors (a false alarm rate below 1e-6 per compared element).
"""

import functools
import gc
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal, init_to_value
from pyro.nn import PyroModule, PyroSample
from torch import nn
from torch.distributions import kl_divergence

from bnnpyro.infer import AnalyticAutoNormal
from bnnpyro.nn import (ESTIMATORS, BayesianMLP, Flipout, LocalReparameterization, WeightSpace,
                        estimator, to_bayesian)

HANDLERS = [WeightSpace, LocalReparameterization, Flipout]
PRIOR_SCALE = 0.5


def _bayesian(layer: nn.Module) -> PyroModule:
    """``layer`` as a PyroModule whose weight and bias are PyroSample N(0, PRIOR_SCALE^2) sites."""
    pyro.nn.module.to_pyro_module_(layer)
    for name, p in list(layer.named_parameters()):
        setattr(layer, name, PyroSample(dist.Normal(0.0, PRIOR_SCALE).expand(p.shape).to_event(p.dim())))
    return layer


class Net(PyroModule):
    """One layer and a Normal likelihood of fixed noise 1 over the flattened outputs."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = _bayesian(layer)

    def forward(self, x, y=None):
        f = self.layer(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(f.flatten(1), 1.0).to_event(1), obs=y)
        return f


def _guide(model, x, y=None, guide_cls=AutoNormal):
    """A guide with random locs and scales in [0.05, 0.5] (set through the guide's parameters)."""
    if y is None:
        y = torch.zeros_like(poutine.block(model)(x).flatten(1))
    trace = poutine.trace(model).get_trace(x, y)
    values = {n: torch.randn(s["value"].shape) for n, s in trace.nodes.items()
              if s["type"] == "sample" and not s["is_observed"]}
    guide = guide_cls(model, init_loc_fn=init_to_value(values=values))
    guide(x, y)
    for name in values:
        owner, attr = _owner(guide.scales, name)
        setattr(owner, attr, 0.05 + 0.45 * torch.rand(values[name].shape))
    return guide


def _owner(module, name):
    *path, attr = name.split(".")
    return functools.reduce(getattr, path, module), attr


def _loc_scale(guide, name):
    return tuple(functools.reduce(getattr, name.split("."), p).detach() for p in (guide.locs, guide.scales))


def _closed_form(op, guide, x):
    """Pre-activation mean op(x, loc_W, loc_b) and variance op(x^2, scale_W^2, scale_b^2)."""
    (mw, sw), (mb, sb) = _loc_scale(guide, "layer.weight"), _loc_scale(guide, "layer.bias")
    return op(x, mw, mb), op(x**2, sw**2, sb**2)


def _draws(handler, model, guide, x, S):
    """S forward passes, each with a fresh guide draw: S x (output shape)."""
    out = []
    with torch.no_grad():
        for _ in range(S):
            with handler:
                trace = poutine.trace(guide).get_trace(x)
                out.append(poutine.replay(model, trace=trace)(x))
    return torch.stack(out)


LAYERS = {
    "linear": (lambda: nn.Linear(3, 4), F.linear, (5, 3)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2), functools.partial(F.conv2d, padding=1, stride=2),
               (2, 2, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, dilation=2), functools.partial(F.conv1d, dilation=2), (2, 2, 7)),
}


def _weight_space_reference(op, guide, x, S):
    """S outputs op(x, W, b) with W, b drawn from the guide's Normals directly (no Pyro)."""
    (mw, sw), (mb, sb) = _loc_scale(guide, "layer.weight"), _loc_scale(guide, "layer.bias")
    return torch.stack([op(x, mw + sw * torch.randn_like(sw), mb + sb * torch.randn_like(sb)) for _ in range(S)])


@pytest.mark.parametrize("handler_cls", HANDLERS)
@pytest.mark.parametrize("kind", LAYERS)
def test_preactivation_moments(kind, handler_cls):
    """
    Per output element: mean and variance equal the closed form and weight-space Monte Carlo.
    Examples 0 and 1 are the same input: under weight space their outputs are equal; under local
    reparameterization uncorrelated; under flipout their covariance is the shared bias draw's
    variance (flipout perturbs the weights only), compared within 5 standard errors of the sample
    covariance (from the draws' fourth moments).
    """
    make, op, x_shape = LAYERS[kind]
    model = Net(make())
    x = torch.randn(x_shape)
    x[1] = x[0]
    guide = _guide(model, x)
    mean, var = _closed_form(op, guide, x)
    S = 600
    out = _draws(handler_cls(), model, guide, x, S)
    reference = _weight_space_reference(op, guide, x, S)
    se_mean, se_var = (var / S).sqrt(), var * math.sqrt(2 / (S - 1))
    for draws in (out, reference):
        assert ((draws.mean(0) - mean).abs() < 5 * se_mean).all()
        assert ((draws.var(0) - var).abs() < 5 * se_var).all()
    assert ((out.mean(0) - reference.mean(0)).abs() < 5 * math.sqrt(2) * se_mean).all()
    assert ((out.var(0) - reference.var(0)).abs() < 5 * math.sqrt(2) * se_var).all()

    if handler_cls is WeightSpace:
        assert torch.equal(out[:, 0], out[:, 1])
        return
    bias_var = _loc_scale(guide, "layer.bias")[1] ** 2
    expected_cov = torch.zeros_like(var[0]) if handler_cls is LocalReparameterization else \
        bias_var.reshape(-1, *[1] * (var.dim() - 2)).expand_as(var[0])
    centred = out[:, :2] - out[:, :2].mean(0)
    product = centred[:, 0] * centred[:, 1]
    cov = product.sum(0) / (S - 1)
    # the sample covariance's standard error from the draws' fourth moments: under flipout the two
    # examples' weight terms share one dW, so E[z0^2 z1^2] exceeds the Gaussian v0 v1 + c^2
    se_cov = ((product**2).mean(0) - cov**2).clamp_min(0).div(S).sqrt()
    assert ((cov - expected_cov).abs() < 5 * se_cov).all()


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_flipout_flips_signs_of_the_drawn_perturbation(kind):
    """
    Every example is x = e_1 + e_2 (two inputs / channels, 1x1 kernel): example n's output is
    loc x + s_out_n * (s_in_n1 dW_1 + s_in_n2 dW_2), so |out - loc x| is |dW_1 + dW_2| for all
    outputs or |dW_1 - dW_2| for all outputs (and all positions); over 64 examples both occur.
    """
    loc, scale = torch.randn(3, 2), 0.1 + torch.rand(3, 2)
    x = torch.ones(64, 2) if kind == "linear" else torch.ones(64, 2, 2, 2)
    shape = (3, 2) if kind == "linear" else (3, 2, 1, 1)
    op = F.linear if kind == "linear" else F.conv2d
    with Flipout():
        w = pyro.sample("w", dist.Normal(loc.reshape(shape), scale.reshape(shape)).to_event(len(shape)))
        out = op(x, w)
    delta = (w.reshape(3, 2) - loc).detach()
    deviation = (out - op(x, loc.reshape(shape))).detach().reshape(64, 3, -1)
    plus = torch.isclose(deviation.abs(), (delta[:, 0] + delta[:, 1]).abs()[:, None]).flatten(1).all(1)
    minus = torch.isclose(deviation.abs(), (delta[:, 0] - delta[:, 1]).abs()[:, None]).flatten(1).all(1)
    assert (plus | minus).all() and plus.any() and minus.any()


def test_local_reparameterization_decorrelates_conv_positions():
    """Under a shared weight draw, two positions seeing the same patch have equal outputs; under
    local reparameterization each output element has its own noise."""
    model = Net(nn.Conv2d(1, 2, 1))
    x = torch.ones(1, 1, 2, 2)
    guide = _guide(model, x)
    ws = _draws(WeightSpace(), model, guide, x, 50)
    lr = _draws(LocalReparameterization(), model, guide, x, 50)
    assert torch.equal(ws[..., 0, 0], ws[..., 1, 1])
    assert not torch.isclose(lr[..., 0, 0], lr[..., 1, 1]).any()


def _expected_loss(guide, model, x, y):
    """E_q[-log p(y | x, w)] + KL(q || p) for the one-layer linear Net (noise 1)."""
    mean, var = _closed_form(F.linear, guide, x)
    nll = (0.5 * math.log(2 * math.pi) + ((y - mean) ** 2 + var) / 2).sum()
    kl = sum(kl_divergence(dist.Normal(*_loc_scale(guide, n)), dist.Normal(0.0, PRIOR_SCALE)).sum()
             for n in ("layer.weight", "layer.bias"))
    return (nll + kl).item()


@pytest.mark.parametrize("handler_cls", HANDLERS)
@pytest.mark.parametrize("guide_cls, elbo", [(AutoNormal, Trace_ELBO()), (AnalyticAutoNormal, TraceMeanField_ELBO())])
def test_elbo_has_the_weight_space_expectation(handler_cls, guide_cls, elbo):
    """Mean of R single-draw losses within 5 standard errors of the closed-form expected loss."""
    model = Net(nn.Linear(3, 4))
    x, y = torch.randn(16, 3), torch.randn(16, 4)
    guide = _guide(model, x, y, guide_cls)
    R = 300
    with handler_cls():
        losses = torch.tensor([elbo.loss(model, guide, x, y) for _ in range(R)])
    assert abs(losses.mean().item() - _expected_loss(guide, model, x, y)) < 5 * losses.std().item() / math.sqrt(R)


def _weight_loc_grad_variance(handler_cls, batch=128, repeats=60):
    """Mean over the first layer's weight locs of the variance of the ELBO gradient (analytic KL)."""
    model = BayesianMLP(8, 3, hidden=(32,), dataset_size=1000, likelihood="classification")
    x, y = torch.randn(batch, 8), torch.randint(0, 3, (batch,))
    guide = AnalyticAutoNormal(model, init_scale=0.3)
    guide(x, y)
    elbo = TraceMeanField_ELBO()
    grads = []
    for _ in range(repeats):
        with handler_cls():
            loc = getattr(guide.locs.layers, "0").weight
            (g,) = torch.autograd.grad(elbo.differentiable_loss(model, guide, x, y), [loc])
        grads.append(g)
    return torch.stack(grads).var(0).mean().item()


def test_local_reparameterization_and_flipout_reduce_gradient_variance():
    """Batch 128, 60 gradients each: variance ratios to weight space 0.028-0.034 (local
    reparameterization) and 0.43-0.45 (flipout; the shared bias draws are not decorrelated)
    observed over seeds 0-3."""
    ws = _weight_loc_grad_variance(WeightSpace)
    assert _weight_loc_grad_variance(LocalReparameterization) < 0.1 * ws
    assert _weight_loc_grad_variance(Flipout) < 0.7 * ws


def test_decorator_usage_shares_one_instance():
    model = Net(nn.Linear(3, 4))
    x, y = torch.randn(1, 3).expand(2, 3), torch.randn(2, 4)
    guide = _guide(model, x)
    lr = LocalReparameterization()
    out = poutine.replay(lr(model), trace=poutine.trace(lr(guide)).get_trace(x))(x)
    assert not torch.isclose(out[0], out[1]).any()  # the two identical examples got independent noise
    svi = SVI(lr(model), lr(guide), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step(x, y))


def test_guide_outside_the_handler_falls_back_to_weight_space():
    """A model replaying draws the handler did not see keeps the shared draw (never uses the prior)."""
    model = Net(nn.Linear(3, 4))
    x = torch.randn(1, 3).expand(2, 3)
    guide = _guide(model, x)
    trace = poutine.trace(guide).get_trace(x)
    out = poutine.replay(LocalReparameterization()(model), trace=trace)(x)
    assert torch.equal(out[0], out[1])
    assert torch.allclose(out, F.linear(x, trace.nodes["layer.weight"]["value"], trace.nodes["layer.bias"]["value"]))


@pytest.mark.parametrize("handler_cls", [LocalReparameterization, Flipout])
def test_unrecorded_and_batched_weights_are_unchanged(handler_cls):
    """Same seed, same loss with and without the handler when it has nothing to replace:
    AutoDiagonalNormal (joint latent, Delta sites), batched weights under vectorize_particles,
    and a deterministic nn.Linear."""
    model = BayesianMLP(4, 2, hidden=(5,), likelihood="classification")
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    cases = [(AutoDiagonalNormal(model), TraceMeanField_ELBO()),
             (AutoNormal(model), TraceMeanField_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1))]
    for guide, elbo in cases:
        guide(x, y)
        pyro.set_rng_seed(3)
        plain = elbo.loss(model, guide, x, y)
        pyro.set_rng_seed(3)
        with handler_cls():
            assert elbo.loss(model, guide, x, y) == plain
    linear = nn.Linear(4, 3)
    with handler_cls():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))


@pytest.mark.parametrize("handler_cls", [LocalReparameterization, Flipout])
def test_records_are_released_after_the_step(handler_cls):
    model = Net(nn.Linear(3, 4))
    x, y = torch.randn(5, 3), torch.randn(5, 4)
    guide = _guide(model, x)
    handler = handler_cls()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    with handler:
        svi.step(x, y)
        assert len(handler._records) == 0  # the step's traces are gone
    svi_shared = SVI(handler(model), handler(guide), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi_shared.step(x, y)
    gc.collect()
    assert len(handler._records) == 0


def test_estimator_factory():
    assert [type(estimator(name)) for name in ESTIMATORS] == [WeightSpace, LocalReparameterization, Flipout]
    with pytest.raises(ValueError, match="estimator must be one of"):
        estimator("reparameterization")


def _replay_under(handler, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``to_bayesian(module)`` with a fresh AutoNormal: one guide draw replayed through it on ``x``,
    model and guide under ``handler()``."""
    pyro.clear_param_store()
    bnn = to_bayesian(module)
    guide = AutoNormal(bnn)
    guide(x)
    with handler():
        return poutine.replay(bnn, trace=poutine.trace(guide).get_trace(x))(x)


class _Twice(nn.Module):
    """``y = W (W x)``: one weight used by two calls."""

    def __init__(self, features: int = 1) -> None:
        super().__init__()
        self.lin = nn.Linear(features, features, bias=False)

    def forward(self, x):
        return self.lin(self.lin(x))


def test_flipout_keeps_each_examples_weight_across_calls():
    """A weight draw used twice keeps its signs: example n's output is W_n (W_n x_n) with one
    W_n = mu + dW * (s_out_n s_in_n^T), so with mu = 0, sigma = 1 (q(W) = N(0, 1), 1 x 1) every
    example gives dW^2 x, the weight-space value. With fresh signs per call it was
    s_n s'_n dW^2 x, of mean 0 instead of E[W^2] x = 1."""
    bnn = to_bayesian(_Twice())
    x = torch.ones(64, 1)
    guide = AutoNormal(bnn, init_scale=1.0)
    guide(x)
    with torch.no_grad():
        guide.locs.lin.weight.zero_()
        for _ in range(5):
            with Flipout():
                tr = poutine.trace(guide).get_trace(x)
                y = poutine.replay(bnn, trace=tr)(x)
            w = tr.nodes["lin.weight"]["value"]
            torch.testing.assert_close(y, (w**2).expand(64, 1))
    # different example dims in the second call: refused, by name
    class Reshaped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2, bias=False)

        def forward(self, x):
            return self.lin(self.lin(x)[:3])

    with pytest.raises(ValueError, match="Flipout: one weight draw of shape \\(2, 2\\) is used by a second"):
        _replay_under(Flipout, Reshaped(), torch.randn(6, 2))


def test_local_reparameterization_refuses_a_weight_used_twice():
    """Independent pre-activation noise per call is another model than one shared draw: refused,
    pointing to Flipout."""
    with pytest.raises(ValueError, match="LocalReparameterization: one weight draw .* Use Flipout"):
        _replay_under(LocalReparameterization, _Twice(3), torch.randn(4, 3))


@pytest.mark.parametrize("handler", [Flipout, LocalReparameterization])
def test_one_draw_replayed_in_several_passes_is_not_a_reuse(handler):
    """A replay of a weight draw starts another pass over it: one guide draw evaluated on two batches,
    or sample_predictive's later chunks replaying the first chunk's draws, raised as if one pass had
    used the weight twice."""
    from bnnpyro import sample_predictive

    pyro.clear_param_store()
    bnn = to_bayesian(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    guide = AutoNormal(bnn)
    x = torch.randn(10, 3)
    guide(x)
    with handler():
        tr = poutine.trace(guide).get_trace(x)
        assert poutine.replay(bnn, trace=tr)(x).shape == (10, 2)
        assert poutine.replay(bnn, trace=tr)(x[:7]).shape == (7, 2)
    for vectorize in (False, True):
        with handler():
            assert sample_predictive(bnn, guide, x, 3, chunk_size=4, vectorize=vectorize)["f"].shape == (3, 10, 2)
