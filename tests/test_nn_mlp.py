"""BayesianLinear / BayesianMLP with Pyro's autoguides: objective, batched weights, training, errors."""

import functools
import io
import math
import pickle

import pyro
import pytest
import torch
from pyro import poutine
from pyro.distributions import Normal
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_sample,
)
from torch.distributions import kl_divergence

from bnnpyro.data import load_classification, load_uci
from bnnpyro.distributions.priors import Prior, ScaleMixtureNormal
from bnnpyro.infer.autoguide import AnalyticAutoNormal
from bnnpyro.nn.linear import BayesianLinear
from bnnpyro.nn.mlp import BayesianMLP

GUIDES = [AutoNormal, AutoDiagonalNormal, AutoLowRankMultivariateNormal]


def _loc_scale(guide, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An AutoNormal's ``loc`` and ``scale`` of site ``name`` (e.g. ``layers.0.weight``)."""
    return tuple(functools.reduce(getattr, name.split("."), p).detach() for p in (guide.locs, guide.scales))


def _guide_kl(guide, model: BayesianMLP) -> torch.Tensor:
    """sum over all weights of KL(N(loc, scale) || N(0, prior scale)), from the guide's locs/scales."""
    total = torch.zeros(())
    for name in guide.prototype_trace.stochastic_nodes:
        loc, scale = _loc_scale(guide, name)
        layer = model.layers[int(name.split(".")[1])]
        total += kl_divergence(Normal(loc, scale), Normal(0.0, layer.prior.scale)).sum()
    return total


@pytest.mark.parametrize("N, B", [(100, 10), (30, 30)])
def test_loss_without_observations_is_the_analytic_kl(N, B):
    m = BayesianMLP(4, 2, hidden=(7, 5), dataset_size=N, prior_scale="fan_in")
    x, y = torch.randn(B, 4), torch.randn(B, 2)
    guide = AnalyticAutoNormal(m, init_loc_fn=init_to_sample, init_scale=0.3)
    guide(x, y)
    no_likelihood = poutine.block(m, hide=["y"])
    assert TraceMeanField_ELBO().loss(no_likelihood, guide, x, y) == pytest.approx(_guide_kl(guide, m).item(), rel=1e-5)


def test_pyro_autonormal_gives_a_monte_carlo_kl():
    """Pyro's AutoNormal puts a Delta at each site, so TraceMeanField_ELBO estimates the KL by sampling."""
    m = BayesianMLP(3, 1, hidden=(4,), dataset_size=50)
    x, y = torch.randn(5, 3), torch.randn(5)
    guide = AutoNormal(m, init_loc_fn=init_to_sample, init_scale=0.3)
    guide(x, y)
    no_likelihood = poutine.block(m, hide=["y"])
    kl = _guide_kl(guide, m).item()
    assert TraceMeanField_ELBO().loss(no_likelihood, guide, x, y) != pytest.approx(kl, rel=1e-3)
    elbo = TraceMeanField_ELBO(num_particles=20000, vectorize_particles=True, max_plate_nesting=1)
    assert elbo.loss(no_likelihood, guide, x, y) == pytest.approx(kl, rel=0.02)


def test_minibatch_loss_matches_full_data_objective():
    r"""
    One linear layer, fixed noise sigma: under the Normal guide f_n = x_n^T w + b ~ N(m_n, v_n), so
    E_q[-log N(y_n; f_n, sigma^2)] = log(sigma sqrt(2 pi)) + ((y_n - m_n)^2 + v_n) / (2 sigma^2) and
    -ELBO = (N/B) sum_batch E_q[NLL_n] + KL. The vectorized P-particle estimate (which runs the
    network on P x 1 x out x in weights) must be within 5 Monte Carlo standard errors.
    """
    N, B, D, sigma = 100, 8, 3, 0.5
    m = BayesianMLP(D, 1, hidden=(), dataset_size=N, noise_scale=sigma)
    x, y = torch.randn(B, D), torch.randn(B)
    guide = AnalyticAutoNormal(m, init_loc_fn=init_to_sample, init_scale=0.3)
    guide(x, y)
    (mw, sw), (mb, sb) = _loc_scale(guide, "layers.0.weight"), _loc_scale(guide, "layers.0.bias")
    mean, var = x @ mw[0] + mb, x**2 @ sw[0] ** 2 + sb**2
    e_nll = (math.log(sigma * math.sqrt(2 * math.pi)) + ((y - mean) ** 2 + var) / (2 * sigma**2)).sum()
    expected = (N / B) * e_nll + _guide_kl(guide, m)
    P = 20000
    singles = torch.tensor([TraceMeanField_ELBO().loss(m, guide, x, y) for _ in range(200)])
    se = singles.std() / math.sqrt(P)
    elbo = TraceMeanField_ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1)
    assert abs(elbo.loss(m, guide, x, y) - expected.item()) < 5 * se


@pytest.mark.parametrize("sample_shape", [(5,), (5, 1), (2, 3)])
def test_batched_weights_equal_a_loop_of_single_draws(sample_shape):
    layer = BayesianLinear(4, 3)
    x = torch.randn(6, 4)
    w, b = torch.randn(*sample_shape, 3, 4), torch.randn(*sample_shape, 3)
    out = poutine.condition(layer, data={"weight": w, "bias": b})(x)
    assert out.shape == (*sample_shape, 6, 3)
    for i in torch.cartesian_prod(*[torch.arange(s) for s in sample_shape]).reshape(-1, len(sample_shape)):
        i = tuple(i.tolist())
        single = poutine.condition(layer, data={"weight": w[i], "bias": b[i]})(x)
        assert torch.allclose(out[i], single, atol=1e-6)
        assert torch.allclose(single, torch.nn.functional.linear(x, w[i], b[i]), atol=1e-6)


def test_mlp_with_stacked_draws_equals_a_loop():
    m = BayesianMLP(4, 2, hidden=(5,), likelihood="classification")
    x = torch.randn(6, 4)
    S = 3
    draws = {
        "layers.0.weight": torch.randn(S, 5, 4), "layers.0.bias": torch.randn(S, 5),
        "layers.1.weight": torch.randn(S, 2, 5), "layers.1.bias": torch.randn(S, 2),
    }
    stacked = poutine.condition(m, data=draws)(x)
    padded = poutine.condition(m, data={k: v.unsqueeze(1) for k, v in draws.items()})(x)  # S x 1 x ...
    assert stacked.shape == padded.shape == (S, 6, 2)
    for s in range(S):
        single = poutine.condition(m, data={k: v[s] for k, v in draws.items()})(x)
        assert torch.allclose(stacked[s], single, atol=1e-6)
        assert torch.allclose(padded[s], single, atol=1e-6)


@pytest.mark.parametrize("guide_cls", GUIDES)
@pytest.mark.parametrize("likelihood, out", [("regression", 1), ("regression", 2), ("classification", 3)])
def test_parallel_predictive_shapes(guide_cls, likelihood, out):
    S, B = 11, 7
    m = BayesianMLP(4, out, hidden=(5,), dataset_size=100, likelihood=likelihood)
    x = torch.randn(B, 4)
    y = torch.randint(0, out, (B,)) if likelihood == "classification" else torch.randn(B, out).squeeze(-1)
    guide = guide_cls(m)
    SVI(m, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO()).step(x, y)
    samples = Predictive(m, guide=guide, num_samples=S, parallel=True)(x)
    assert samples["f"].shape == (S, B, out)
    assert samples["y"].shape == ((S, B) if out == 1 or likelihood == "classification" else (S, B, out))
    sequential = Predictive(m, guide=guide, num_samples=S, return_sites=["f"])(x)
    assert sequential["f"].shape == (S, B, out)


def _train_digits(guide_cls, prior=None, steps=300, **guide_kwargs):
    data = load_classification("digits")
    N, B = len(data.x_train), 128
    m = BayesianMLP(64, 10, hidden=(32,), dataset_size=N, likelihood="classification",
                    prior=prior, prior_scale=1.0 if prior else "fan_in")
    guide = guide_cls(m, init_loc_fn=init_to_sample, init_scale=0.01, **guide_kwargs)
    svi = SVI(m, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99}), TraceMeanField_ELBO())
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, N, (B,))
        losses.append(svi.step(data.x_train[idx], data.y_train[idx]))
    with torch.no_grad():
        f = Predictive(m, guide=guide, num_samples=32, parallel=True, return_sites=["f"])(data.x_test)["f"]
    accuracy = (f.softmax(-1).mean(0).argmax(-1) == data.y_test).float().mean().item()
    return losses, accuracy


@pytest.mark.parametrize("guide_cls, kwargs", [(AutoNormal, {}), (AutoDiagonalNormal, {}),
                                               (AutoLowRankMultivariateNormal, {"rank": 5})])
def test_trains_on_digits_with_autoguides(guide_cls, kwargs):
    _, accuracy = _train_digits(guide_cls, **kwargs)
    assert accuracy > 0.85  # 300 steps of 128 points; 0.9-0.94 observed over seeds 0-3


def test_scale_mixture_prior_trains():
    losses, accuracy = _train_digits(AutoDiagonalNormal, prior=Prior("scale_mixture"))
    assert sum(losses[-20:]) < 0.6 * sum(losses[:20])  # about 0.47 observed
    assert accuracy > 0.9  # 0.95-0.96 observed over seeds 0-3


def test_regression_on_yacht_learns_the_noise():
    data = load_uci("yacht")
    m = BayesianMLP(6, 1, hidden=(20,), dataset_size=len(data.x_train), prior_scale="fan_in")
    guide = AutoNormal(m, init_loc_fn=init_to_sample, init_scale=0.01)
    svi = SVI(m, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995}), TraceMeanField_ELBO())
    for _ in range(400):
        svi.step(data.x_train, data.y_train)
    with torch.no_grad():
        f = Predictive(m, guide=guide, num_samples=32, parallel=True, return_sites=["f"])(data.x_test)["f"]
    rmse = ((f.mean(0).squeeze(-1) - data.y_test) ** 2).mean().sqrt().item()
    assert rmse < 0.15  # standardized units (the mean predictor: about 1); 0.076-0.085 over seeds 0-2
    assert m.sigma.item() < 0.3  # learned from 1.0; 0.13-0.16 observed


def _bad_inputs():
    x, y = torch.randn(4, 3), torch.randn(4)
    nan_x, nan_y = x.clone(), y.clone()
    nan_x[0, 0], nan_y[1] = float("nan"), float("nan")
    inf_x, inf_y = x.clone(), y.clone()
    inf_x[2, 1], inf_y[3] = float("inf"), float("-inf")
    return [
        ({}, x.double()[:, :2], y, "x must be"),
        ({}, x.long(), y, "x must be"),
        ({}, x[0], y, "x must be"),
        ({}, nan_x, y, "x contains NaN"),
        ({}, x, nan_y, "y contains NaN"),
        ({}, inf_x, y, "x contains NaN or infinite values"),
        ({}, x, inf_y, "y contains NaN or infinite values"),
        ({}, x, y.unsqueeze(-1), "y must be"),
        ({}, x, y.long(), "y must be"),
        ({"dataset_size": 3}, x, y, "dataset_size"),
        ({"likelihood": "classification", "out_features": 2}, x, y, "y must be"),
        ({"likelihood": "classification", "out_features": 2}, x, torch.tensor([0, 1, 2, 0]), "labels"),
        ({"likelihood": "classification", "out_features": 2}, x, torch.tensor([0, 1, -1, 0]), "labels"),
    ]


@pytest.mark.parametrize("kwargs, x, y, match", _bad_inputs())
def test_bad_inputs_raise(kwargs, x, y, match):
    m = BayesianMLP(**{"in_features": 3, "out_features": 1, **kwargs})
    with pytest.raises(ValueError, match=match):
        m(x, y)


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden": (0,)}, "hidden"),
    ({"hidden": 50}, r"hidden must be a sequence of positive ints, e.g. \(50,\), got 50"),
    ({"dataset_size": 0}, "dataset_size"),
    ({"likelihood": "poisson"}, "likelihood"),
    ({"noise_scale": -1.0}, "noise_scale"),
    ({"likelihood": "classification", "noise_scale": 1.0}, "noise_scale"),
    ({"prior_scale": "xavier"}, "prior_scale"),
    ({"prior": Prior(), "prior_scale": "fan_in"}, "prior_scale"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesianMLP(3, 2, **kwargs)


@pytest.mark.parametrize("fields, match", [
    ({"scale": float("nan")}, "Prior scale must be a finite number, got nan"),
    ({"scale": float("inf")}, "Prior scale must be a finite number, got inf"),
    ({"mean": float("nan")}, "Prior mean must be a finite number"),
    ({"kind": "scale_mixture", "sigma1": float("nan")}, "Prior sigma1 must be a finite number"),
    ({"scale": "1"}, "Prior scale must be a finite number, got '1'"),
])
def test_a_prior_with_a_nan_infinite_or_non_numeric_field_raises(fields, match):
    """The layers build their prior distributions from a Prior's fields without validating them
    again: a NaN scale gave BayesianLinear a NaN log prior silently (a string, a TypeError from
    a comparison)."""
    with pytest.raises(ValueError, match=match):
        Prior(**fields)
    with pytest.raises(ValueError, match=match):
        BayesianMLP(3, 2, prior=fields)


def test_a_normal_prior_module_with_a_nan_or_infinite_value_raises():
    from bnnpyro.distributions import NormalPrior

    with pytest.raises(ValueError, match="loc contains NaN or infinite values"):
        NormalPrior((2, 3), torch.tensor([0.0, float("nan"), 0.0]), 1.0)
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        NormalPrior((2, 3), 0.0, float("inf"))


def test_priors_follow_the_module_device_and_dtype():
    layer = BayesianLinear(4, 2, prior_scale="fan_in")
    assert layer.prior.scale == pytest.approx(0.5)
    assert layer.state_dict().keys() == set()  # prior buffers are configuration, not state
    layer = BayesianLinear(4, 2, prior=Prior("scale_mixture")).double()
    prior = layer.prior_distribution((2, 4))
    assert isinstance(prior.base_dist, ScaleMixtureNormal) and prior.event_shape == (2, 4)
    assert prior.base_dist.pi.dtype == torch.float64
    assert layer(torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64


def test_state_dict_round_trip():
    x, y = torch.randn(10, 3), torch.randn(10)
    m = BayesianMLP(3, 1, hidden=(4,))
    guide = AutoNormal(m)
    svi = SVI(m, guide, pyro.optim.Adam({"lr": 0.1}), TraceMeanField_ELBO())
    for _ in range(5):
        svi.step(x, y)
    sigma = m.sigma.item()
    assert sigma != pytest.approx(1.0)
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    # loaded in the same process, the trained model's store entry still there: the loaded value is used
    loaded = BayesianMLP(3, 1, hidden=(4,))
    loaded.load_state_dict(torch.load(buffer))
    assert loaded.sigma.item() == pytest.approx(sigma)
    weights = {k: v.detach() for k, v in guide.median().items()}
    f = poutine.condition(loaded, data=weights)(x, y)
    assert torch.allclose(f, poutine.condition(m, data=weights)(x, y))
    # the model call registered the loaded value under the new instance's own name
    assert pyro.param(f"{loaded._param_prefix}.sigma").item() == pytest.approx(sigma)
    assert loaded._param_prefix != m._param_prefix
    fixed = BayesianMLP(3, 1, noise_scale=0.3)
    assert fixed.state_dict()["sigma"].item() == pytest.approx(0.3)


def test_module_pickles():
    m = BayesianMLP(3, 2, hidden=(4,), prior=Prior("scale_mixture"), likelihood="classification")
    copy = pickle.loads(pickle.dumps(m))
    assert copy(torch.randn(5, 3)).shape == (5, 2)


def test_two_models_in_one_process_keep_their_own_noise_scale():
    # Pyro's param store is global and keyed by name: with a plain "sigma" the second model would
    # read the first one's trained value (and SVI step only the first one's tensor)
    x, y = torch.randn(64, 3), 5 * torch.randn(64)
    a, b = BayesianMLP(3, 1, hidden=(8,), dataset_size=64), BayesianMLP(3, 1, hidden=(8,), dataset_size=64)
    guide_b = AnalyticAutoNormal(b)
    guide_b(x, y)
    svi = SVI(a, AnalyticAutoNormal(a), pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(50):
        svi.step(x, y)
    assert a.sigma.item() > 2.0  # y has std 5: sigma grew from 1
    assert b.sigma.item() == pytest.approx(1.0)
    svi = SVI(b, guide_b, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    a_sigma = a.sigma.item()
    for _ in range(50):
        svi.step(x, y)
    assert b.sigma.item() > 2.0 and a.sigma.item() == a_sigma
    # the sample sites keep their plain names
    assert "layers.0.weight" in poutine.trace(b).get_trace(x, y).nodes


def test_scale_mixture_normal_density_and_draws():
    """``ScaleMixtureNormal`` against its definition: log density equal to torch's
    ``MixtureSameFamily`` of N(0, sigma1^2) with weight pi and N(0, sigma2^2); draws (200k) with the
    mixture's second moment and its mass near zero, within 5 Monte Carlo standard errors."""
    import math

    pi, s1, s2 = 0.25, 1.0, 0.01
    d = ScaleMixtureNormal(torch.tensor(pi, dtype=torch.float64), s1, s2)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.tensor([pi, 1 - pi], dtype=torch.float64)),
        torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), torch.tensor([s1, s2], dtype=torch.float64)),
    )
    w = torch.tensor([-2.0, -0.3, -0.01, 0.0, 0.004, 0.05, 1.5], dtype=torch.float64)
    torch.testing.assert_close(d.log_prob(w), ref.log_prob(w))
    torch.testing.assert_close(d.variance, torch.tensor(pi * s1**2 + (1 - pi) * s2**2, dtype=torch.float64))
    n = 200_000
    draws = d.expand((n,)).sample()
    # E[w^2] = pi s1^2 + (1 - pi) s2^2; Var[w^2] = 3 (pi s1^4 + (1 - pi) s2^4) - E[w^2]^2
    m2 = pi * s1**2 + (1 - pi) * s2**2
    se = math.sqrt((3 * (pi * s1**4 + (1 - pi) * s2**4) - m2**2) / n)
    assert abs(draws.square().mean().item() - m2) < 5 * se
    # P(|w| < 0.05) = pi (2 Phi(0.05 / s1) - 1) + (1 - pi) (2 Phi(5) - 1); binomial standard error
    ndtr = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    p = pi * (2 * ndtr(0.05 / s1) - 1) + (1 - pi) * (2 * ndtr(0.05 / s2) - 1)
    assert abs((draws.abs() < 0.05).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_repr_shows_the_non_linearity_and_the_noise():
    """Two networks differing in their activation or noise printed the same."""
    assert repr(BayesianMLP(3, 1, non_linearity="tanh")) != repr(BayesianMLP(3, 1))
    assert "non_linearity='tanh'" in repr(BayesianMLP(3, 1, non_linearity="tanh"))
    assert "noise='learned'" in repr(BayesianMLP(3, 1)) and "noise_scale=0.1" in repr(BayesianMLP(3, 1, noise_scale=0.1))
    assert "non_linearity='sigmoid'" in repr(BayesianMLP(3, 2, likelihood="classification", non_linearity=torch.sigmoid))


def test_prior_repr_shows_the_fields_of_its_kind():
    assert repr(Prior(scale=0.5)) == "Prior(kind='normal', mean=0.0, scale=0.5)"
    assert repr(Prior("scale_mixture", pi=0.5)).startswith("Prior(kind='scale_mixture', pi=0.5, sigma1=")
    assert "scale=" not in repr(Prior("scale_mixture")).replace("sigma", "")
