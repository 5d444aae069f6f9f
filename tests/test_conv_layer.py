"""ConvLayer: moments per estimator, closed form vs explicit weight samples, folded KL, ELBO, errors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from bnnpyro.distributions import ConvLayer

ESTIMATORS = ["local_reparameterization", "weight_space", "flipout"]

# (name, X shape, W shape, conv kwargs, with bias): stride/padding/dilation/groups each covered
CONFIGS = {
    "1d": ((3, 2, 7), (4, 2, 3), {}, False),
    "1d_stride_pad_dil_bias": ((3, 2, 9), (4, 2, 3), {"stride": 2, "padding": 2, "dilation": 2}, True),
    "2d_pad_bias": ((3, 2, 4, 4), (3, 2, 3, 3), {"padding": 1}, True),
    "2d_groups_stride_dil": ((3, 4, 5, 6), (6, 2, 2, 3), {"groups": 2, "stride": (2, 1), "dilation": (1, 2)}, False),
}


def identity(t):
    return t


def _params(X_shape, W_shape, bias, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(X_shape, generator=g)
    W_mean = torch.randn(W_shape, generator=g)
    W_scale = 0.2 + torch.rand(W_shape, generator=g)
    b = (torch.randn(W_shape[0], generator=g), 0.2 + torch.rand(W_shape[0], generator=g)) if bias else (None, None)
    return X, W_mean, W_scale, b


def _conv(X, W, b, kw):
    return (F.conv1d if W.dim() == 3 else F.conv2d)(X, W, b, **kw)


def _closed_form(X, W_mean, W_scale, b, kw):
    """mean conv(X, W_mean) + b_mean, variance conv(X**2, W_scale**2) + b_scale**2, straight from torch."""
    b_mean, b_scale = b
    mean = _conv(X, W_mean, b_mean, kw)
    var = _conv(X**2, W_scale**2, None if b_scale is None else b_scale**2, kw)
    return mean, var


# ---------------------------------------------------------------- moments


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_pre_activation_moments_match_closed_form(config, estimator):
    X_shape, W_shape, kw, bias = CONFIGS[config]
    X, W_mean, W_scale, b = _params(X_shape, W_shape, bias)
    mean_cf, var_cf = _closed_form(X, W_mean, W_scale, b, kw)
    d = ConvLayer(X, W_mean, W_scale, identity, **kw, bias_mean=b[0], bias_scale=b[1], estimator=estimator)
    assert d.batch_shape == X_shape[:1] and d.event_shape == mean_cf.shape[1:]
    m, v = d.pre_activation_moments()
    torch.testing.assert_close(m, mean_cf)
    torch.testing.assert_close(v, var_cf)
    S = 20_000
    h = d.rsample((S,))
    assert h.shape == (S,) + mean_cf.shape
    # every estimator's output element is Gaussian: the sample mean has standard error sqrt(var / S),
    # the sample variance var * sqrt(2 / S); allow 5 standard errors each
    assert ((h.mean(0) - mean_cf).abs() <= 5 * (var_cf / S).sqrt()).all()
    assert ((h.var(0) - var_cf).abs() <= 5 * var_cf * math.sqrt(2 / S)).all()


@pytest.mark.parametrize("config", ["1d_stride_pad_dil_bias", "2d_groups_stride_dil"])
def test_closed_form_matches_explicit_weight_samples(config):
    """Independent reference: S filter (and bias) draws from torch, each run through F.conv*d."""
    X_shape, W_shape, kw, bias = CONFIGS[config]
    X, W_mean, W_scale, b = _params(X_shape, W_shape, bias, seed=2)
    mean_cf, var_cf = _closed_form(X, W_mean, W_scale, b, kw)
    S = 20_000
    W = dist.Normal(W_mean, W_scale).sample((S,))
    if bias:
        bs = dist.Normal(*b).sample((S,))
        h = torch.vmap(lambda w, b_: _conv(X, w, b_, kw))(W, bs)
    else:
        h = torch.vmap(lambda w: _conv(X, w, None, kw))(W)
    assert ((h.mean(0) - mean_cf).abs() <= 5 * (var_cf / S).sqrt()).all()
    assert ((h.var(0) - var_cf).abs() <= 5 * var_cf * math.sqrt(2 / S)).all()


def test_weight_space_shares_filters_across_rows_not_replicas():
    # conv is linear in X: with one filter draw per replica, row 2 = row 0 + row 1 exactly
    X_shape, W_shape, kw, _ = CONFIGS["2d_groups_stride_dil"]
    X, W_mean, W_scale, _ = _params(X_shape, W_shape, False)
    X[2] = X[0] + X[1]
    h = ConvLayer(X, W_mean, W_scale, identity, **kw, estimator="weight_space").rsample((4,))
    torch.testing.assert_close(h[:, 2], h[:, 0] + h[:, 1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(h[0], h[1])  # replicas draw their own filters
    for estimator in ("local_reparameterization", "flipout"):
        h = ConvLayer(X, W_mean, W_scale, identity, **kw, estimator=estimator).rsample((4,))
        assert not torch.allclose(h[:, 2], h[:, 0] + h[:, 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_expand_replicas_and_relu(estimator):
    X_shape, W_shape, kw, bias = CONFIGS["2d_pad_bias"]
    X, W_mean, W_scale, b = _params(X_shape, W_shape, bias)
    d = ConvLayer(X, W_mean, W_scale, KL_factor=0.5, **kw, bias_mean=b[0], bias_scale=b[1], estimator=estimator)
    e = d.expand((5, 3))
    assert e.batch_shape == (5, 3) and e.event_shape == d.event_shape
    h = e.rsample((2,))
    assert h.shape == (2, 5, 3) + d.event_shape
    assert (h >= 0).all()  # ReLU by default
    assert not torch.allclose(h[:, 0], h[:, 1])  # replicas are independent draws
    # each leading replica carries the minibatch's full share of the KL
    torch.testing.assert_close(e.log_prob(h).sum(), 2 * 5 * 0.5 * d.KL)


# ---------------------------------------------------------------- folded KL


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("prior", ["standard", "scalar", "tensor"])
def test_folded_kl_equals_torch_kl(bias, prior):
    X_shape, W_shape, kw, _ = CONFIGS["2d_pad_bias"]
    X, W_mean, W_scale, b = _params(X_shape, W_shape, bias)
    C_out = W_shape[0]
    if prior == "standard":
        pm, ps = 0.0, 1.0
    elif prior == "scalar":
        pm, ps = 0.5, 0.3
    elif bias:  # a tensor prior that also serves the bias: constant over input channels and kernel
        pm = torch.linspace(-1, 1, C_out).reshape(C_out, 1, 1, 1)
        ps = torch.linspace(0.5, 2, C_out).reshape(C_out, 1, 1, 1)
    else:
        pm, ps = torch.linspace(-1, 1, math.prod(W_shape)).reshape(W_shape), torch.linspace(0.5, 2, W_shape[-1])
    expected = kl_divergence(dist.Normal(W_mean, W_scale), dist.Normal(pm, ps)).sum()
    if bias:
        bpm = pm.reshape(-1) if torch.is_tensor(pm) else pm
        bps = ps.reshape(-1) if torch.is_tensor(ps) else ps
        expected = expected + kl_divergence(dist.Normal(*b), dist.Normal(bpm, bps)).sum()
    d = ConvLayer(X, W_mean, W_scale, KL_factor=0.25, W_prior_scale=ps, **kw,
                  bias_mean=b[0], bias_scale=b[1], W_prior_mean=pm)
    torch.testing.assert_close(d.KL, expected)
    lp = d.log_prob(d.rsample())
    assert lp.shape == (3,) and (lp > 0).all()
    torch.testing.assert_close(lp.sum(), 0.25 * expected)
    # registered analytic KL against a prior layer holding those parameters
    prior_b = (torch.zeros(C_out) + bpm, torch.ones(C_out) * bps) if bias else (None, None)
    p = ConvLayer(X, torch.zeros(W_shape) + pm, torch.ones(W_shape) * ps, **kw,
                  bias_mean=prior_b[0], bias_scale=prior_b[1])
    kl = kl_divergence(d, p)
    assert kl.shape == (3,)
    torch.testing.assert_close(kl.sum(), 0.25 * expected)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("N, B", [(10, 3), (200, 16)])
def test_loss_without_likelihood_is_the_kl(estimator, elbo_cls, N, B):
    X_shape, W_shape, kw, _ = CONFIGS["1d_stride_pad_dil_bias"]
    X_all = torch.randn((N,) + X_shape[1:])
    _, W_mean, W_scale, (b_mean, b_scale) = _params(X_shape, W_shape, True)
    ps = 0.8

    def model(idx):
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("h", ConvLayer(X_all[idx], torch.zeros(W_shape), ps * torch.ones(W_shape), **kw,
                                       bias_mean=torch.zeros(W_shape[0]), bias_scale=ps * torch.ones(W_shape[0]),
                                       W_prior_scale=ps, estimator=estimator))

    def guide(idx):
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("h", ConvLayer(X_all[idx], W_mean, W_scale, **kw, bias_mean=b_mean, bias_scale=b_scale,
                                       W_prior_scale=ps, estimator=estimator, dataset_size=N))

    kl = (kl_divergence(dist.Normal(W_mean, W_scale), dist.Normal(0.0, ps)).sum()
          + kl_divergence(dist.Normal(b_mean, b_scale), dist.Normal(0.0, ps)).sum())
    idx = torch.randperm(N)[:B]
    assert elbo_cls().loss(model, guide, idx) == pytest.approx(kl.item(), rel=1e-5)
    # vectorised particles: the layer is expanded to P x B replicas, each counting the KL once
    elbo = elbo_cls(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    assert elbo.loss(model, guide, idx) == pytest.approx(kl.item(), rel=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("config", ["1d_stride_pad_dil_bias", "2d_groups_stride_dil"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradients_reach_all_parameters(config, estimator):
    X_shape, W_shape, kw, _ = CONFIGS[config]
    X, W_mean, W_scale, (b_mean, b_scale) = _params(X_shape, W_shape, True)
    params = {
        "W_mean": W_mean.requires_grad_(),
        "W_rho": torch.log(torch.expm1(W_scale)).requires_grad_(),
        "b_mean": b_mean.requires_grad_(),
        "b_rho": torch.log(torch.expm1(b_scale)).requires_grad_(),
    }
    d = ConvLayer(X, params["W_mean"], F.softplus(params["W_rho"]), identity, **kw, bias_mean=params["b_mean"],
                  bias_scale=F.softplus(params["b_rho"]), estimator=estimator)
    h = d.rsample((2,))
    (h * torch.randn_like(h)).pow(2).sum().backward()
    for name, p in params.items():
        assert torch.isfinite(p.grad).all() and (p.grad != 0).any(), name


def test_zero_input_has_finite_gradients():
    X = torch.zeros(2, 2, 5)
    W_mean = torch.randn(3, 2, 3, requires_grad=True)
    W_rho = torch.randn(3, 2, 3, requires_grad=True)
    ConvLayer(X, W_mean, F.softplus(W_rho), identity, padding=1).rsample().sum().backward()
    assert torch.isfinite(W_mean.grad).all() and torch.isfinite(W_rho.grad).all()


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise():
    X, W_mean, W_scale, (b_mean, b_scale) = _params((3, 4, 5, 5), (6, 2, 3, 3), True)
    kw = {"groups": 2}
    with pytest.raises(TypeError, match="X must be a torch.Tensor"):
        ConvLayer(X.numpy(), W_mean, W_scale, **kw)
    with pytest.raises(TypeError, match="X must be a floating-point"):
        ConvLayer(X.long(), W_mean, W_scale, **kw)
    with pytest.raises(TypeError, match="W_scale must be a floating-point"):
        ConvLayer(X, W_mean, W_scale.long(), **kw)
    with pytest.raises(ValueError, match="W_mean must be 3-D .* or 4-D"):
        ConvLayer(X, W_mean.reshape(6, -1), W_scale.reshape(6, -1), **kw)
    with pytest.raises(ValueError, match="W_scale must have the shape of W_mean"):
        ConvLayer(X, W_mean, W_scale[:3], **kw)
    with pytest.raises(ValueError, match=r"C_in = W_mean.size\(1\) \* groups = 2.*got shape \(3, 4, 5, 5\)"):
        ConvLayer(X, W_mean, W_scale)  # groups=1: expects 2 input channels
    with pytest.raises(ValueError, match="at least one batch dimension"):
        ConvLayer(X[0], W_mean, W_scale, **kw)
    with pytest.raises(ValueError, match="divisible by groups"):
        ConvLayer(X, W_mean, W_scale, groups=4)
    with pytest.raises(ValueError, match="does not fit the filters"):
        ConvLayer(X[..., :2, :2], W_mean, W_scale, **kw)
    Xn = X.clone()
    Xn[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="X contains NaN"):
        ConvLayer(Xn, W_mean, W_scale, **kw, validate_args=True)
    with pytest.raises(ValueError, match="W_scale must be finite and strictly positive"):
        ConvLayer(X, W_mean, -W_scale, **kw, validate_args=True)
    with pytest.raises(ValueError, match="bias_scale must be finite and strictly positive"):
        ConvLayer(X, W_mean, W_scale, **kw, bias_mean=b_mean, bias_scale=-b_scale, validate_args=True)
    with pytest.raises(ValueError, match="W_prior_scale must be strictly positive"):
        ConvLayer(X, W_mean, W_scale, **kw, W_prior_scale=0.0, validate_args=True)
    with pytest.raises(ValueError, match="both bias_mean and bias_scale"):
        ConvLayer(X, W_mean, W_scale, **kw, bias_mean=b_mean)
    with pytest.raises(ValueError, match=r"bias_scale must have shape \(C_out,\)"):
        ConvLayer(X, W_mean, W_scale, **kw, bias_mean=b_mean, bias_scale=b_scale[:2])
    with pytest.raises(ValueError, match="serve as the bias prior"):
        ConvLayer(X, W_mean, W_scale, **kw, bias_mean=b_mean, bias_scale=b_scale, W_prior_mean=torch.zeros(6, 2, 3, 3))
    with pytest.raises(ValueError, match="estimator must be one of"):
        ConvLayer(X, W_mean, W_scale, **kw, estimator="reparam")
    with pytest.raises(TypeError, match="non_linearity must be callable"):
        ConvLayer(X, W_mean, W_scale, "relu", **kw)
    with pytest.raises(ValueError, match="either KL_factor or dataset_size"):
        ConvLayer(X, W_mean, W_scale, KL_factor=0.5, **kw, dataset_size=10)
    with pytest.raises(ValueError, match="filter shapes"):
        kl_divergence(ConvLayer(X, W_mean, W_scale, **kw), ConvLayer(X, W_mean[:4], W_scale[:4], **kw))
    with pytest.raises(ValueError, match="with a bias to one without"):
        kl_divergence(ConvLayer(X, W_mean, W_scale, **kw, bias_mean=b_mean, bias_scale=b_scale),
                      ConvLayer(X, W_mean, W_scale, **kw))


def test_bad_priors_and_kl_factors_raise():
    """As for HiddenLayer: a prior of a shape that does not broadcast to W_mean is named at
    construction, a NaN or infinite prior or KL_factor with validation on."""
    X, W_mean, W_scale, _ = _params((3, 2, 5, 5), (4, 2, 3, 3), False)
    with pytest.raises(ValueError, match=r"W_prior_scale must be .* to W_mean \(4, 2, 3, 3\), got shape \(2, 2\)"):
        ConvLayer(X, W_mean, W_scale, W_prior_scale=torch.ones(2, 2))
    for kwargs, match in [({"W_prior_mean": float("nan")}, "W_prior_mean contains NaN or infinite"),
                          ({"W_prior_scale": math.inf}, "W_prior_scale must be strictly positive and finite"),
                          ({"KL_factor": float("nan")}, "KL_factor must be a finite non-negative number")]:
        with pytest.raises(ValueError, match=match):
            ConvLayer(X, W_mean, W_scale, validate_args=True, **kwargs)
