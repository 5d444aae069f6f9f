"""
Estimators' output distributions against the exact weight-space covariance, for HiddenLayer and
ConvLayer; HiddenLayer's ``estimator`` option and its flipout path.

For a layer linear in its weights theta ~ N(mu, diag(sigma^2)), the outputs of two minibatch rows
f = J theta (J the Jacobian, computed by autograd) have, under weight-space sampling, covariance
J diag(sigma^2) J^T. Flipout (Wen et al. 2018) has the same distribution within each row (the signs
square out, and diag(s_in) dW diag(s_out) is distributed as dW), while independent signs per row
make the weight part of the cross-row covariance zero; a bias shared per replica keeps its cross-row
part. Local reparameterization keeps only the diagonal.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.autograd.functional import jacobian
from torch.distributions import kl_divergence

from bnnpyro.distributions import ConvLayer, HiddenLayer
from bnnpyro.distributions.hidden_layer import random_signs

ESTIMATORS = ["local_reparameterization", "weight_space", "flipout"]
S = 40_000


def identity(t):
    return t


def _correlated_rows(shape, g):
    """Two input rows, the second close to the first: large cross-row covariance under shared weights."""
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    return torch.stack([x0, x0 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)])


def _expected_covariances(f, weight_parts, bias_parts, rows):
    """
    Exact output covariance of the ``rows x K`` outputs of ``f(*params)`` for each estimator:
    ``weight_parts``/``bias_parts`` are (mean, scale) pairs; bias parts are shared by the rows
    under every replica-level estimator.
    """
    means = [m for m, _ in weight_parts + bias_parts]
    J = jacobian(lambda *p: f(*p).reshape(-1), tuple(means))
    def part(Js, parts):
        return sum((j.reshape(j.shape[0], -1) * s.reshape(-1) ** 2) @ j.reshape(j.shape[0], -1).T
                   for j, (_, s) in zip(Js, parts))
    cov_w = part(J[: len(weight_parts)], weight_parts)
    cov_b = part(J[len(weight_parts):], bias_parts) if bias_parts else torch.zeros_like(cov_w)
    row = torch.arange(rows).repeat_interleave(cov_w.shape[0] // rows)
    same_row = row[:, None] == row[None, :]
    weight_space = cov_w + cov_b
    return {
        "weight_space": weight_space,
        "flipout": cov_w * same_row + cov_b,
        "local_reparameterization": torch.diag(weight_space.diagonal()),
    }, f(*means).reshape(-1)


def _mc_mean_cov(samples):
    """Sample mean, sample covariance and each covariance entry's standard error (from 4th moments)."""
    n = samples.shape[0]
    Z = samples - samples.mean(0)
    C = Z.T @ Z / (n - 1)
    Z2 = Z * Z
    se = ((Z2.T @ Z2 / n - C**2).clamp_min(0) / n).sqrt()
    return samples.mean(0), C, se


def _check(samples, mean, covs, estimator):
    m, C, se = _mc_mean_cov(samples)
    cov = covs[estimator]
    # mean: standard error sqrt(var / S); covariance entries: their own standard error; 5 each
    assert ((m - mean).abs() <= 5 * (cov.diagonal() / S).sqrt() + 1e-9).all()
    assert ((C - cov).abs() <= 5 * se + 1e-9).all()
    # the check discriminates: the other estimators' covariances, where they differ (flipout and local
    # reparameterization agree for a dense layer), are far outside the tolerance
    for other, other_cov in covs.items():
        if not torch.allclose(other_cov, cov):
            assert ((C - other_cov).abs() > 10 * se).any(), other


def _hidden_setup(g):
    X = _correlated_rows((4,), g)
    A_mean = torch.randn(4, 3, generator=g, dtype=torch.float64)
    A_scale = 0.3 + torch.rand(4, 3, generator=g, dtype=torch.float64)
    return X, A_mean, A_scale


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_hidden_layer_output_covariance(estimator):
    g = torch.Generator().manual_seed(3)
    X, A_mean, A_scale = _hidden_setup(g)
    covs, mean = _expected_covariances(lambda A: X @ A, [(A_mean, A_scale)], [], rows=2)
    h = HiddenLayer(X, A_mean, A_scale, identity, include_hidden_bias=False, estimator=estimator).rsample((S,))
    _check(h.reshape(S, -1), mean, covs, estimator)


CONV_CASES = {
    # X shape, W shape, conv kwargs (stride, padding, groups, overlapping receptive fields)
    "1d": ((2, 6), (3, 2, 3), {"stride": 2, "padding": 1}),
    "2d_groups": ((4, 3, 3), (4, 2, 2, 2), {"groups": 2}),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_conv_layer_output_covariance(case, estimator):
    x_shape, W_shape, kw = CONV_CASES[case]
    g = torch.Generator().manual_seed(4)
    X = _correlated_rows(x_shape, g)
    W_mean = torch.randn(W_shape, generator=g, dtype=torch.float64)
    W_scale = 0.3 + torch.rand(W_shape, generator=g, dtype=torch.float64)
    b_mean = torch.randn(W_shape[0], generator=g, dtype=torch.float64)
    b_scale = 0.3 + torch.rand(W_shape[0], generator=g, dtype=torch.float64)
    conv = F.conv1d if len(W_shape) == 3 else F.conv2d
    covs, mean = _expected_covariances(lambda W, b: conv(X, W, b, **kw), [(W_mean, W_scale)],
                                       [(b_mean, b_scale)], rows=2)
    d = ConvLayer(X, W_mean, W_scale, identity, **kw, bias_mean=b_mean, bias_scale=b_scale, estimator=estimator)
    _check(d.rsample((S,)).reshape(S, -1), mean, covs, estimator)


# ---------------------------------------------------------------- HiddenLayer's estimator option


def test_estimator_option_and_weight_space_sampling():
    X, A_mean, A_scale = torch.randn(5, 3), torch.randn(3, 4), torch.rand(3, 4) + 0.1
    assert HiddenLayer(X, A_mean, A_scale).estimator == "local_reparameterization"
    assert HiddenLayer(X, A_mean, A_scale, weight_space_sampling=True).estimator == "weight_space"
    d = HiddenLayer(X, A_mean, A_scale, weight_space_sampling=True, estimator="weight_space")
    assert d.weight_space_sampling
    d = HiddenLayer(X, A_mean, A_scale, estimator="flipout")
    assert not d.weight_space_sampling
    assert d.expand((2, 5)).estimator == "flipout"
    with pytest.raises(ValueError, match="weight_space_sampling=True contradicts estimator='flipout'"):
        HiddenLayer(X, A_mean, A_scale, weight_space_sampling=True, estimator="flipout")
    with pytest.raises(ValueError, match="estimator must be one of"):
        HiddenLayer(X, A_mean, A_scale, estimator="reparameterization")


def test_hidden_layer_flipout_shapes_replicas_and_signs():
    X, A_mean, A_scale = torch.randn(5, 3), torch.randn(3, 4), torch.rand(3, 4) + 0.1
    d = HiddenLayer(X, A_mean, A_scale, estimator="flipout")
    assert d.rsample().shape == (5, 5)
    e = d.expand((6, 5))
    h = e.rsample((2,))
    assert h.shape == (2, 6, 5, 5) and (h[..., -1] == 1).all() and (h[..., :-1] >= 0).all()
    # one unbatched row (X of shape D)
    assert HiddenLayer(X[0], A_mean, A_scale, identity, include_hidden_bias=False,
                       estimator="flipout").rsample((7,)).shape == (7, 4)
    # identical rows with shared dW differ only through their signs: |h - mean| agrees up to sign
    # when D = 1 (one sign in, one sign out)
    X1 = torch.ones(8, 1)
    h = HiddenLayer(X1, A_mean[:1], A_scale[:1], identity, include_hidden_bias=False,
                    estimator="flipout").rsample((3,))
    dev = (h - A_mean[:1]).abs()
    torch.testing.assert_close(dev, dev[:, :1].expand_as(dev))
    assert not torch.allclose(h, h[:, :1].expand_as(h))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_hidden_layer_gradients_reach_parameters(estimator):
    X = torch.randn(6, 3)
    A_mean = torch.randn(3, 4, requires_grad=True)
    A_rho = torch.randn(3, 4, requires_grad=True)
    h = HiddenLayer(X, A_mean, F.softplus(A_rho), identity, estimator=estimator).rsample((2,))
    (h * torch.randn_like(h)).pow(2).sum().backward()
    for p in (A_mean, A_rho):
        assert torch.isfinite(p.grad).all() and (p.grad != 0).any()


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_hidden_layer_flipout_loss_without_likelihood_is_the_kl(elbo_cls):
    N, B, D, H = 50, 8, 3, 4
    X_all = torch.randn(N, D)
    A_mean, A_scale = torch.randn(D, H), 0.1 + torch.rand(D, H)

    def model(idx):
        with pyro.plate("data", N, subsample=idx):
            h = pyro.sample("h1", HiddenLayer(X_all[idx], torch.zeros(D, H), torch.ones(D, H), estimator="flipout"))
            pyro.sample("h2", HiddenLayer(h, torch.zeros(H + 1, 2), torch.ones(H + 1, 2), estimator="flipout"))

    def guide(idx):
        with pyro.plate("data", N, subsample=idx):
            h = pyro.sample("h1", HiddenLayer(X_all[idx], A_mean, A_scale, estimator="flipout", dataset_size=N))
            pyro.sample("h2", HiddenLayer(h, torch.zeros(H + 1, 2), torch.ones(H + 1, 2), estimator="flipout",
                                          dataset_size=N))

    kl = kl_divergence(dist.Normal(A_mean, A_scale), dist.Normal(0.0, 1.0)).sum()
    idx = torch.randperm(N)[:B]
    for elbo in (elbo_cls(), elbo_cls(num_particles=5, vectorize_particles=True, max_plate_nesting=1)):
        assert elbo.loss(model, guide, idx) == pytest.approx(kl.item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 32), (5, 33, 2)])
def test_random_signs_values_shape_dtype(shape):
    like = torch.zeros((), dtype=torch.float64)
    s = random_signs(shape, like)
    assert s.shape == shape and s.dtype == torch.float64
    assert ((s == 1) | (s == -1)).all()


def test_random_signs_are_fair_and_independent():
    # n i.i.d. fair signs: the mean and every lag-k autocorrelation have std 1/sqrt(n); the
    # signs are 32 bits of one word each, so lags 1 (bits of one word), 31 and 32 (the same bit
    # of neighbouring words) and every bit position (i mod 32) are checked, at 5 standard errors
    n = 32 * 20_000
    torch.manual_seed(1)
    s = random_signs((n,), torch.zeros(()))
    assert s.mean().abs() < 5 / n**0.5
    for lag in (1, 2, 31, 32, 33):
        assert (s[lag:] * s[:-lag]).mean().abs() < 5 / (n - lag) ** 0.5, lag
    per_bit = s.view(-1, 32).mean(0)  # 32 means of n / 32 signs each
    assert per_bit.abs().max() < 5 / (n / 32) ** 0.5
    # reproducible from the global seed
    torch.manual_seed(1)
    torch.testing.assert_close(random_signs((n,), torch.zeros(())), s)
