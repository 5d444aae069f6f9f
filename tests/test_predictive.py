"""Vectorized posterior predictive equals the looped one, given the same random draws."""

import pyro
import pytest
import torch

from bnnpyro import fit, sample_predictive
from bnnpyro.models import BayesianMLPClassifier, BayesianMLPRegressor
from bnnpyro.predict import mean_probs, predictive_std


class _FixedNoise:
    """Stands in for ``torch.randn``: serves pre-drawn noise ``E[H]`` (``S x B x H``) per layer width
    ``H``, whole for a vectorized pass (``S x B x H`` requested) or one slice per looped pass."""

    def __init__(self, S, B, widths):
        g = torch.Generator().manual_seed(1)
        self.E = {H: torch.randn(S, B, H, generator=g) for H in widths}
        self.s = None
        self._randn = torch.randn

    def __call__(self, *shape, **kwargs):
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        E = self.E.get(shape[-1])
        if E is None or shape[-2] != E.shape[1]:
            return self._randn(*shape, **kwargs)
        if shape[0] == E.shape[0] and len(shape) == 3 and self.s is None:
            return E.clone()
        return E[self.s : self.s + 1].clone().reshape(shape)


@pytest.mark.parametrize("kind", ["regressor", "classifier", "heteroscedastic"])
def test_vectorized_equals_loop_hand_written_guide(monkeypatch, kind):
    S, B = 30, 17
    x = torch.randn(B, 4)
    if kind == "classifier":
        m = BayesianMLPClassifier(4, 3, hidden=(7, 5), dataset_size=100)
        y = torch.randint(0, 3, (B,))
    else:
        noise = "heteroscedastic" if kind == "heteroscedastic" else "learned"
        m = BayesianMLPRegressor(4, hidden=(7, 5), dataset_size=100, noise=noise)
        y = x.sum(-1)
    fit(m.model, m.guide, (x, y), epochs=30, seed=0, progress=False)
    widths = (7, 5, m.sizes[-1])
    fake = _FixedNoise(S, B, widths)
    monkeypatch.setattr(torch, "randn", fake)
    f_vec = sample_predictive(m.model, m.guide, x, S)["f"]
    loop = []
    for s in range(S):
        fake.s = s
        loop.append(sample_predictive(m.model, m.guide, x, 1)["f"][0])
    f_loop = torch.stack(loop)
    assert f_vec.shape == (S, B, m.sizes[-1])
    torch.testing.assert_close(f_vec, f_loop, rtol=1e-5, atol=1e-5)
    if kind == "classifier":
        torch.testing.assert_close(mean_probs(f_vec, logits=True), mean_probs(f_loop, logits=True),
                                   rtol=1e-5, atol=1e-5)
    else:
        with torch.no_grad():
            mv, sv = m.mean_and_scale(f_vec)
            ml, sl = m.mean_and_scale(f_loop)
        torch.testing.assert_close(mv.mean(0), ml.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(predictive_std(mv, sv), predictive_std(ml, sl), rtol=1e-5, atol=1e-5)


def test_chunked_equals_unchunked_distribution():
    """Chunks see the same global weights; per-row sites are independent, so moments agree."""
    m = BayesianMLPRegressor(2, hidden=(8,), dataset_size=50)
    x = torch.randn(50, 2)
    fit(m.model, m.guide, (x, x.sum(-1)), epochs=20, seed=0, progress=False)
    a = sample_predictive(m.model, m.guide, x, 4000)["f"]
    b = sample_predictive(m.model, m.guide, x, 4000, chunk_size=7)["f"]
    assert a.shape == b.shape == (4000, 50, 1)
    se = (a.var(0) / 4000).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 5 * se * 2**0.5 + 1e-6).all()


def test_bad_arguments():
    m = BayesianMLPRegressor(2, dataset_size=10)
    with pytest.raises(ValueError, match="num_samples"):
        sample_predictive(m.model, m.guide, torch.randn(3, 2), 0)
    with pytest.raises(ValueError, match="chunk_size"):
        sample_predictive(m.model, m.guide, torch.randn(3, 2), 2, chunk_size=0)
    with pytest.raises(ValueError, match="return_sites"):
        sample_predictive(m.model, m.guide, torch.randn(3, 2), 2, return_sites=["nope"])


@pytest.mark.parametrize("guide_name", ["AnalyticAutoNormal", "AutoNormal", "AutoLowRankMultivariateNormal"])
def test_vectorized_equals_loop_autoguides(guide_name):
    """One batched pass with S weight draws == S forward passes, one per (same) weight draw."""
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal

    from bnnpyro.infer import AnalyticAutoNormal
    from bnnpyro.nn import BayesianMLP

    cls = {"AnalyticAutoNormal": AnalyticAutoNormal, "AutoNormal": AutoNormal,
           "AutoLowRankMultivariateNormal": AutoLowRankMultivariateNormal}[guide_name]
    S, B = 25, 13
    net = BayesianMLP(3, 1, hidden=(6, 5), dataset_size=40)
    guide = cls(net, init_scale=0.1)
    x = torch.randn(40, 3)
    fit(net, guide, (x, x.sum(-1)), epochs=20, seed=0, progress=False)
    names = [f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    out = sample_predictive(net, guide, x[:B], S, return_sites=names)
    f_vec = out["f"]
    assert f_vec.shape == (S, B, 1)
    assert out["layers.0.weight"].shape == (S, 6, 3)
    with torch.no_grad():
        f_loop = torch.stack([
            pyro.poutine.condition(net, data={n: out[n][s] for n in names})(x[:B]) for s in range(S)
        ])
    torch.testing.assert_close(f_vec, f_loop, rtol=1e-5, atol=1e-5)
    mv, sv = net.mean_and_scale(f_vec.detach())
    ml, sl = net.mean_and_scale(f_loop)
    torch.testing.assert_close(mv.mean(0), ml.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predictive_std(mv, sv), predictive_std(ml, sl), rtol=1e-5, atol=1e-5)
    # the S draws differ: this is a distribution, not one network repeated
    assert f_vec.std(0).min() > 0
