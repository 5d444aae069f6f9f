"""EmbeddingLayer: lookup moments per estimator, shared rows under weight-space sampling, KL, ELBO, errors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from bnnpyro.distributions import EmbeddingLayer

ESTIMATORS = ["local_reparameterization", "weight_space"]
V, E = 6, 3
# B = 3 sequences of T = 5 tokens: token 2 repeats within and across rows, 0 is the padding id
TOKENS = torch.tensor([[2, 4, 2, 0, 1], [5, 2, 0, 3, 3], [1, 1, 4, 2, 0]])


def _table(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, E, generator=g), 0.2 + torch.rand(V, E, generator=g)


def _closed_form(W_mean, W_scale, padding_idx):
    mask = (TOKENS != padding_idx).unsqueeze(-1) if padding_idx is not None else torch.ones(())
    return F.embedding(TOKENS, W_mean) * mask, F.embedding(TOKENS, W_scale**2) * mask


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_lookup_moments_match_closed_form(padding_idx, estimator):
    W_mean, W_scale = _table()
    mean_cf, var_cf = _closed_form(W_mean, W_scale, padding_idx)
    d = EmbeddingLayer(TOKENS, W_mean, W_scale, padding_idx=padding_idx, estimator=estimator)
    assert d.batch_shape == (3,) and d.event_shape == (5, E)
    S = 20_000
    h = d.rsample((S,))
    assert h.shape == (S, 3, 5, E)
    if padding_idx is not None:
        assert (h[:, TOKENS == padding_idx] == 0).all()
    # Gaussian lookups: 5 standard errors, sqrt(var / S) for the mean, var * sqrt(2 / S) for the variance
    assert ((h.mean(0) - mean_cf).abs() <= 5 * (var_cf / S).sqrt()).all()
    assert ((h.var(0) - var_cf).abs() <= 5 * var_cf * math.sqrt(2 / S)).all()


def test_closed_form_matches_explicit_table_samples():
    """Independent reference: S tables drawn with torch, looked up with F.embedding, padding zeroed."""
    W_mean, W_scale = _table(seed=2)
    mean_cf, var_cf = _closed_form(W_mean, W_scale, 0)
    S = 20_000
    tables = dist.Normal(W_mean, W_scale).sample((S,))
    h = torch.vmap(lambda W: F.embedding(TOKENS, W))(tables) * (TOKENS != 0).unsqueeze(-1)
    assert ((h.mean(0) - mean_cf).abs() <= 5 * (var_cf / S).sqrt()).all()
    var_cf_safe = var_cf.clamp_min(1e-12)  # padding positions: both zero
    assert ((h.var(0) - var_cf).abs() <= 5 * var_cf_safe * math.sqrt(2 / S)).all()


def test_weight_space_shares_rows_within_a_replica_local_reparameterization_does_not():
    W_mean, W_scale = _table()
    h = EmbeddingLayer(TOKENS, W_mean, W_scale, estimator="weight_space").rsample((4,))
    # token 2 at (0, 0), (0, 2), (1, 1), (2, 3): one vector per replica
    for b, t in ((0, 2), (1, 1), (2, 3)):
        torch.testing.assert_close(h[:, b, t], h[:, 0, 0])
    assert not torch.allclose(h[0], h[1])  # replicas draw their own tables
    # local reparameterization: repeated tokens are independent draws; their sample covariance is
    # zero within 5 standard errors (of the product of independent centred Gaussians: var / sqrt(S))
    S = 20_000
    h = EmbeddingLayer(TOKENS, W_mean, W_scale).rsample((S,))
    a, b = h[:, 0, 0], h[:, 0, 2]
    cov = ((a - a.mean(0)) * (b - b.mean(0))).mean(0)
    assert (cov.abs() <= 5 * W_scale[2] ** 2 / math.sqrt(S)).all()
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_expand_replicas(estimator):
    W_mean, W_scale = _table()
    d = EmbeddingLayer(TOKENS, W_mean, W_scale, KL_factor=0.5, padding_idx=0, estimator=estimator)
    e = d.expand((4, 3))
    assert e.batch_shape == (4, 3) and e.event_shape == (5, E)
    h = e.rsample((2,))
    assert h.shape == (2, 4, 3, 5, E)
    assert (h[:, :, TOKENS == 0] == 0).all()
    assert not torch.allclose(h[:, 0], h[:, 1])
    torch.testing.assert_close(e.log_prob(h).sum(), 2 * 4 * 0.5 * d.KL)


# ---------------------------------------------------------------- KL


@pytest.mark.parametrize("prior_mean, prior_scale", [(0.0, 1.0), (0.5, 0.3), ("tensor", "tensor")])
def test_folded_kl_equals_torch_kl(prior_mean, prior_scale):
    W_mean, W_scale = _table()
    if prior_mean == "tensor":
        prior_mean = torch.linspace(-1, 1, V * E).reshape(V, E)
        prior_scale = torch.linspace(0.5, 2, E)
    expected = kl_divergence(dist.Normal(W_mean, W_scale), dist.Normal(prior_mean, prior_scale)).sum()
    d = EmbeddingLayer(TOKENS, W_mean, W_scale, KL_factor=0.25, W_prior_scale=prior_scale, W_prior_mean=prior_mean)
    torch.testing.assert_close(d.KL, expected)
    lp = d.log_prob(d.rsample())
    assert lp.shape == (3,) and (lp > 0).all()
    torch.testing.assert_close(lp.sum(), 0.25 * expected)
    p = EmbeddingLayer(TOKENS, torch.zeros(V, E) + prior_mean, torch.ones(V, E) * prior_scale)
    kl = kl_divergence(d, p)
    assert kl.shape == (3,)
    torch.testing.assert_close(kl.sum(), 0.25 * expected)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_loss_without_likelihood_is_the_kl(estimator, elbo_cls):
    N, B, T = 40, 6, 4
    tokens = torch.randint(0, V, (N, T))
    W_mean, W_scale = _table()
    ps = 0.7

    def model(idx):
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("e", EmbeddingLayer(tokens[idx], torch.zeros(V, E), ps * torch.ones(V, E),
                                            W_prior_scale=ps, estimator=estimator))

    def guide(idx):
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("e", EmbeddingLayer(tokens[idx], W_mean, W_scale, W_prior_scale=ps, estimator=estimator,
                                            dataset_size=N))

    kl = kl_divergence(dist.Normal(W_mean, W_scale), dist.Normal(0.0, ps)).sum()
    idx = torch.randperm(N)[:B]
    for elbo in (elbo_cls(), elbo_cls(num_particles=3, vectorize_particles=True, max_plate_nesting=1)):
        assert elbo.loss(model, guide, idx) == pytest.approx(kl.item(), rel=1e-5)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradients_reach_parameters(estimator):
    W_mean, W_scale = _table()
    W_mean.requires_grad_()
    W_rho = torch.log(torch.expm1(W_scale)).requires_grad_()
    h = EmbeddingLayer(TOKENS, W_mean, F.softplus(W_rho), padding_idx=0, estimator=estimator).rsample((2,))
    (h * torch.randn_like(h)).pow(2).sum().backward()
    for p in (W_mean, W_rho):
        assert torch.isfinite(p.grad).all() and (p.grad != 0).any()
        # the padding row gets no gradient from the lookups
        assert (p.grad[0] == 0).all()


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise():
    W_mean, W_scale = _table()
    with pytest.raises(TypeError, match="input must be an integer tensor"):
        EmbeddingLayer(TOKENS.float(), W_mean, W_scale)
    with pytest.raises(TypeError, match="input must be an integer tensor"):
        EmbeddingLayer(TOKENS > 2, W_mean, W_scale)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        EmbeddingLayer(TOKENS.tolist(), W_mean, W_scale)
    with pytest.raises(TypeError, match="W_mean must be a floating-point"):
        EmbeddingLayer(TOKENS, W_mean.long(), W_scale)
    with pytest.raises(ValueError, match=r"input token ids must lie in \[0, 6\).*\[0, 6\]"):
        EmbeddingLayer(torch.where(TOKENS == 5, 6, TOKENS), W_mean, W_scale, validate_args=True)
    with pytest.raises(ValueError, match=r"input token ids must lie in \[0, 6\).*\[-1, 5\]"):
        EmbeddingLayer(torch.where(TOKENS == 0, -1, TOKENS), W_mean, W_scale, validate_args=True)
    with pytest.raises(ValueError, match="at least one batch dimension"):
        EmbeddingLayer(TOKENS[0], W_mean, W_scale)
    with pytest.raises(ValueError, match=r"W_mean must be 2-D \(V x E\)"):
        EmbeddingLayer(TOKENS, W_mean.reshape(-1), W_scale.reshape(-1))
    with pytest.raises(ValueError, match="W_scale must have the shape of W_mean"):
        EmbeddingLayer(TOKENS, W_mean, W_scale[:, :2])
    with pytest.raises(ValueError, match="W_scale must be finite and strictly positive"):
        EmbeddingLayer(TOKENS, W_mean, -W_scale, validate_args=True)
    with pytest.raises(ValueError, match="W_prior_scale must be strictly positive"):
        EmbeddingLayer(TOKENS, W_mean, W_scale, W_prior_scale=-1.0, validate_args=True)
    with pytest.raises(ValueError, match="'flipout' is not meaningful for an embedding"):
        EmbeddingLayer(TOKENS, W_mean, W_scale, estimator="flipout")
    with pytest.raises(ValueError, match="estimator must be one of"):
        EmbeddingLayer(TOKENS, W_mean, W_scale, estimator="lrt")
    with pytest.raises(ValueError, match=r"padding_idx must be an int in \[-6, 6\)"):
        EmbeddingLayer(TOKENS, W_mean, W_scale, padding_idx=6)
    with pytest.raises(ValueError, match="either KL_factor or dataset_size"):
        EmbeddingLayer(TOKENS, W_mean, W_scale, KL_factor=0.5, dataset_size=10)
    with pytest.raises(ValueError, match="table shapes"):
        kl_divergence(EmbeddingLayer(TOKENS, W_mean, W_scale), EmbeddingLayer(TOKENS, W_mean[:, :2], W_scale[:, :2]))
    # a negative padding_idx counts from V, as in torch.nn.Embedding
    h = EmbeddingLayer(TOKENS, W_mean, W_scale, padding_idx=-1).rsample()
    assert (h[TOKENS == V - 1] == 0).all() and (h[TOKENS != V - 1] != 0).all()


def test_bad_priors_and_kl_factors_raise():
    """As for HiddenLayer: a prior of a shape that does not broadcast to W_mean is named at
    construction, a NaN or infinite prior or KL_factor with validation on."""
    W_mean, W_scale = _table()
    with pytest.raises(ValueError, match=r"W_prior_mean must be .* to W_mean \(6, 3\), got shape \(3, 6\)"):
        EmbeddingLayer(TOKENS, W_mean, W_scale, W_prior_mean=torch.zeros(3, 6))
    for kwargs, match in [({"W_prior_mean": float("nan")}, "W_prior_mean contains NaN or infinite"),
                          ({"W_prior_scale": math.inf}, "W_prior_scale must be strictly positive and finite"),
                          ({"KL_factor": float("nan")}, "KL_factor must be a finite non-negative number")]:
        with pytest.raises(ValueError, match=match):
            EmbeddingLayer(TOKENS, W_mean, W_scale, validate_args=True, **kwargs)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_any_integer_dtype_looks_up_the_same_rows(dtype):
    """Token ids of any integer dtype are looked up as int64 (a uint8 index tensor was taken as a
    boolean mask: wrong rows, silently)."""
    W_mean, W_scale = torch.arange(30.0).reshape(3, 10), torch.full((3, 10), 1e-6)
    ids = torch.tensor([[2, 1], [1, 2]])
    want = EmbeddingLayer(ids, W_mean, W_scale).rsample()
    got = EmbeddingLayer(ids.to(dtype), W_mean, W_scale).rsample()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(want, W_mean[ids], atol=1e-4, rtol=0)
