"""Vectorized posterior predictive equals the looped one, given the same random draws."""

import math

import pyro
import pytest
import torch

from bnnpyro import fit, sample_predictive
from bnnpyro.models import BayesianMLPClassifier, BayesianMLPRegressor
from bnnpyro.predict import mean_probs, predictive_std


class _FixedNoise:
    """Stands in for ``torch.randn``: the vectorized pass's draws (leading dim ``S``) are recorded
    by trailing shape, and looped pass ``s`` (leading dim 1) is served slice ``s`` of them, for
    local-reparameterization noise (``S x B x H``) and weight draws (``S x D x H``) alike."""

    def __init__(self, S):
        self.S = S
        self.E = {}
        self.s = None
        self._randn = torch.randn

    def __call__(self, *shape, **kwargs):
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        key = shape[1:]
        if self.s is None and shape[0] == self.S:
            assert key not in self.E, "two sites draw noise of the same shape: make the test's widths distinct"
            self.E[key] = self._randn(*shape, **kwargs)
            return self.E[key].clone()
        if self.s is not None and shape[0] == 1 and key in self.E:
            return self.E[key][self.s : self.s + 1].clone()
        return self._randn(*shape, **kwargs)


@pytest.mark.parametrize("estimator", ["auto", "local_reparameterization", "weight_space"])
@pytest.mark.parametrize("kind", ["regressor", "classifier", "heteroscedastic"])
def test_vectorized_equals_loop_hand_written_guide(monkeypatch, kind, estimator):
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
    fake = _FixedNoise(S)
    monkeypatch.setattr(torch, "randn", fake)
    f_vec = sample_predictive(m.model, m.guide, x, S, estimator=estimator)["f"]
    loop = []
    for s in range(S):
        fake.s = s
        loop.append(sample_predictive(m.model, m.guide, x, 1, estimator=estimator)["f"][0])
    f_loop = torch.stack(loop)
    assert f_vec.shape == (S, B, m.sizes[-1])
    assert f_vec.std(0).min() > 0
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


def test_estimators_give_the_same_predictive_distribution():
    """Per input, local reparameterization and weight-space sampling are both exact: the predictive
    mean and variance of every output agree within Monte Carlo error (5 standard errors)."""
    m = BayesianMLPClassifier(130, 3, hidden=(6,), dataset_size=100, init_scale=0.3)
    x = torch.randn(5, 130) / 3
    S = 20000
    draws = {e: sample_predictive(m.model, m.guide, x, S, estimator=e)["f"]
             for e in ("local_reparameterization", "weight_space", "auto")}
    ref = draws["local_reparameterization"]
    for e in ("weight_space", "auto"):
        f = draws[e]
        se_mean = ((ref.var(0) + f.var(0)) / S).sqrt()
        assert ((f.mean(0) - ref.mean(0)).abs() < 5 * se_mean).all(), e
        # var of a sample variance ~ 2 sigma^4 / S for near-Gaussian outputs (ReLU tails: allow 2x)
        se_var = (2 * 2 * (ref.var(0) ** 2 + f.var(0) ** 2) / S).sqrt()
        assert ((f.var(0) - ref.var(0)).abs() < 5 * se_var).all(), e


def test_auto_estimator_choice(monkeypatch):
    """``auto``: local reparameterization for a wide first layer (moments shared by the S samples),
    weight-space sampling for deeper layers and narrow inputs."""
    from bnnpyro.distributions import HiddenLayer

    chosen = []
    rsample = HiddenLayer.rsample

    def spy(self, sample_shape=torch.Size()):
        chosen.append((self.dim_X, self.estimator))
        return rsample(self, sample_shape)

    monkeypatch.setattr(HiddenLayer, "rsample", spy)
    m = BayesianMLPClassifier(200, 3, hidden=(150, 4), dataset_size=10)
    sample_predictive(m.model, m.guide, torch.randn(6, 200), 3)
    assert chosen == [(201, "local_reparameterization"), (151, "weight_space"), (5, "weight_space")]
    chosen.clear()
    m = BayesianMLPRegressor(13, hidden=(50,), dataset_size=10)
    sample_predictive(m.model, m.guide, torch.randn(6, 13), 3)
    assert chosen == [(14, "weight_space"), (51, "weight_space")]
    for d, estimator in ((126, "weight_space"), (127, "local_reparameterization")):  # dim_X >= 128
        chosen.clear()
        m = BayesianMLPRegressor(d, hidden=(3,), dataset_size=10)
        sample_predictive(m.model, m.guide, torch.randn(6, d), 3)
        assert chosen == [(d + 1, estimator), (4, "weight_space")]
    with pytest.raises(ValueError, match="estimator"):
        sample_predictive(m.model, m.guide, torch.randn(6, 13), 3, estimator="flip")


def test_chunked_equals_unchunked_distribution():
    """Chunks see the same global weights; per-row sites are independent, so moments agree."""
    m = BayesianMLPRegressor(2, hidden=(8,), dataset_size=50)
    x = torch.randn(50, 2)
    fit(m.model, m.guide, (x, x.sum(-1)), epochs=20, seed=0, progress=False)
    a = sample_predictive(m.model, m.guide, x, 4000, chunk_size=None)["f"]
    b = sample_predictive(m.model, m.guide, x, 4000, chunk_size=7)["f"]
    assert a.shape == b.shape == (4000, 50, 1)
    se = (a.var(0) / 4000).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 5 * se * 2**0.5 + 1e-6).all()


@pytest.mark.parametrize("vectorize", [True, False])
def test_progress_bar_counts_the_rows_and_leaves_the_samples_alone(capsys, vectorize):
    """progress=True shows a bar over the rows (S x rows with vectorize=False) on stderr; the
    samples are the same as without it."""
    m = BayesianMLPRegressor(2, hidden=(8,), dataset_size=50)
    x = torch.randn(50, 2)
    draws = []
    for progress in (False, True):
        pyro.set_rng_seed(0)
        draws.append(sample_predictive(m.model, m.guide, x, 3, chunk_size=20, vectorize=vectorize,
                                       progress=progress)["f"])
    assert torch.equal(draws[0], draws[1])
    err = capsys.readouterr().err
    total = 50 if vectorize else 150
    assert "sample_predictive" in err and f"{total}/{total}" in err


@pytest.mark.parametrize("hidden", [(8,), (130, 6)])  # narrow layers; a layer wider than 128
def test_weight_space_layers_are_one_network_across_chunks(hidden):
    """Weight-space layers draw their S weight matrices on the first chunk and reuse them: with the
    same seed, chunked and unchunked outputs are equal (each of the S networks is one function of
    x, no jumps at chunk boundaries); a fresh call draws new networks."""
    m = BayesianMLPRegressor(2, hidden=hidden, dataset_size=50)
    x = torch.randn(50, 2)
    outputs = []
    for chunk_size in (None, 7, 50):
        pyro.set_rng_seed(0)
        outputs.append(sample_predictive(m.model, m.guide, x, 30, chunk_size=chunk_size, estimator="weight_space")["f"])
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(outputs[2], outputs[0])
    assert not torch.allclose(sample_predictive(m.model, m.guide, x, 30, chunk_size=7)["f"], outputs[0])


@pytest.mark.parametrize("hidden", [(20,), (300,), (20, 300)])
def test_auto_chunks_grow_to_the_activation_budget(hidden):
    """chunk_size="auto": a short first pass, then the other rows in equal chunks of
    max(65536 // S, budget // widest output per row) rows; same networks as one pass."""
    from bnnpyro.predict import predictive

    m = BayesianMLPRegressor(2, hidden=hidden, dataset_size=50)
    rows = []

    def model(x, y=None):
        rows.append(len(x))
        return m.model(x, y)

    S, N = 100, 3000
    x = torch.randn(N, 2)
    pyro.set_rng_seed(0)
    f = sample_predictive(model, m.guide, x, S, estimator="weight_space")["f"]
    probe = predictive._AUTO_CHUNK_PROBE_ROWS
    per_row = S * (max(hidden) + 1)  # the widest HiddenLayer output: a hidden one, ones column included
    grow_to = max(predictive._AUTO_CHUNK_ELEMENTS // S, predictive._AUTO_CHUNK_ACTIVATION_ELEMENTS // per_row)
    passes = math.ceil((N - probe) / grow_to)
    assert rows[0] == probe and len(rows) == 1 + passes and sum(rows) == N
    assert set(rows[1:-1]) <= {math.ceil((N - probe) / passes)}
    if hidden == (20,):
        assert rows[1] > predictive._AUTO_CHUNK_ELEMENTS // S  # a narrow network: longer chunks
    pyro.set_rng_seed(0)
    torch.testing.assert_close(f, sample_predictive(m.model, m.guide, x, S, chunk_size=None, estimator="weight_space")["f"])
    rows.clear()
    sample_predictive(model, m.guide, x[:100], S)  # fits the first chunk: one pass
    assert rows == [100]
    rows.clear()
    sample_predictive(model, m.guide, x[: predictive._AUTO_CHUNK_ELEMENTS // S], S)  # "at most": still one
    assert rows == [predictive._AUTO_CHUNK_ELEMENTS // S]


def test_returned_hidden_activations_are_not_overwritten_by_later_chunks():
    """A layer's output storage is handed on from chunk to chunk, except when the model returns
    it: a model whose output f is a hidden layer's activations (ones column included) gives the
    same values chunked and unchunked."""
    from bnnpyro.distributions import HiddenLayer

    A_mean, A_scale = torch.randn(3, 4), torch.full((3, 4), 0.5)

    def model(x, y=None):
        with pyro.plate("data", len(x)):
            return pyro.sample("h", HiddenLayer(x, A_mean, A_scale, KL_factor=0.0))

    def guide(x, y=None):
        return model(x)

    x = torch.randn(20, 3)
    outputs = []
    for chunk_size in (None, 6):
        pyro.set_rng_seed(0)
        outputs.append(sample_predictive(model, guide, x, 8, chunk_size=chunk_size, estimator="weight_space")["f"])
    assert outputs[0].shape == (8, 20, 5)
    torch.testing.assert_close(outputs[1], outputs[0])


def test_bad_arguments():
    m = BayesianMLPRegressor(2, dataset_size=10)
    with pytest.raises(ValueError, match="num_samples"):
        sample_predictive(m.model, m.guide, torch.randn(3, 2), 0)
    with pytest.raises(ValueError, match="chunk_size"):
        sample_predictive(m.model, m.guide, torch.randn(3, 2), 2, chunk_size=0)
    with pytest.raises(ValueError, match="return_sites"):
        sample_predictive(m.model, m.guide, torch.randn(3, 2), 2, return_sites=["nope"])
    with pytest.raises(ValueError, match="return_sites: 'nope'"):  # one name, not its letters
        sample_predictive(m.model, m.guide, torch.randn(3, 2), 2, return_sites="nope")
    # a numpy integer is an int
    import numpy as np

    assert sample_predictive(m.model, m.guide, torch.randn(3, 2), np.int64(2))["f"].shape == (2, 3, 1)


@pytest.mark.parametrize("vectorize", [True, False])
def test_return_sites_of_a_per_row_site_is_refused(vectorize):
    """return_sites takes global latent sites (S x ... values, the same for all chunks); a site in the
    data plate (a HiddenLayer's activations) would hold the first chunk's rows only: refused by name
    (it failed in the reshape to S x ... with a bare RuntimeError)."""
    from bnnpyro.distributions import HiddenLayer

    A_mean, A_scale = torch.randn(3, 4), torch.full((3, 4), 0.5)

    def model(x, y=None):
        with pyro.plate("data", len(x)):
            return pyro.sample("h", HiddenLayer(x, A_mean, A_scale, KL_factor=0.0)) * 1.0

    def guide(x, y=None):
        return model(x)

    with pytest.raises(ValueError, match="return_sites: 'h' is not a global latent site"):
        sample_predictive(model, guide, torch.randn(20, 3), 8, chunk_size=6, return_sites=["h"], vectorize=vectorize)


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_model_output_without_a_width_dim_is_named(vectorize):
    """f must be B x W (the chunks are joined along dim -2): a model returning f of shape B is
    told so, instead of failing inside torch.cat or being joined along the wrong dim."""
    m = BayesianMLPRegressor(2, dataset_size=10)

    def model(x, y=None):
        return m.model(x, y).squeeze(-1)

    with pytest.raises(ValueError, match=r"f as B x W .* got shape \([0-9, ]+\) for 3 rows"):
        sample_predictive(model, m.guide, torch.randn(3, 2), 4, vectorize=vectorize)


def test_argument_checks_run_on_the_first_chunk_and_x_is_checked_up_front():
    """With validation on, the distributions' checks run on the first pass only (the later ones
    differ from it only in rows of x), and a NaN in any row of x is still reported, by row."""
    from bnnpyro.distributions import HiddenLayer

    A_mean, A_scale = torch.randn(2, 3), torch.full((2, 3), 0.5)
    checked = []

    def model(x, y=None):
        checked.append(torch.distributions.Distribution._validate_args)
        with pyro.plate("data", len(x)):
            return pyro.sample("h", HiddenLayer(x, A_mean, A_scale, KL_factor=0.0, include_hidden_bias=False))

    def guide(x, y=None):
        return model(x)

    x = torch.randn(40, 2)
    f = sample_predictive(model, guide, x, 3, chunk_size=10)["f"]
    assert f.shape == (3, 40, 3) and checked == [True, True] + [False] * 6  # guide and model per pass
    assert torch.distributions.Distribution._validate_args  # restored
    x[33, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x contains NaN or infinite values \(first in row 33\)"):
        sample_predictive(model, guide, x, 3, chunk_size=10)
    with pyro.validation_enabled(False):  # the user's choice: no checks at all
        f = sample_predictive(model, guide, x, 3, chunk_size=10)["f"]
    assert f[:, 33].isnan().all() and not f[:, 32].isnan().any()


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


def test_sequential_fallback_matches_vectorized_and_runs_a_converted_cnn():
    """``vectorize=False``: S passes of one network each. Same predictive moments as the vectorized
    pass (5 standard errors), and it runs a ``to_bayesian`` CNN, which the vectorized pass cannot
    (``F.conv2d`` and pooling take one weight draw and 4-D inputs)."""
    from pyro.infer.autoguide import AutoNormal
    from torch import nn

    from bnnpyro.nn import to_bayesian

    m = BayesianMLPRegressor(3, hidden=(5,), dataset_size=50, init_scale=0.3)
    x = torch.randn(6, 3)
    S = 3000
    a = sample_predictive(m.model, m.guide, x, S)["f"]
    b = sample_predictive(m.model, m.guide, x, S, vectorize=False, chunk_size=4)["f"]
    assert a.shape == b.shape == (S, 6, 1)
    se = ((a.var(0) + b.var(0)) / S).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 5 * se).all()

    cnn = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 3))
    bnn = to_bayesian(cnn)

    def model(x, y=None):
        logits = bnn(x)
        with pyro.plate("data", 10, subsample=torch.arange(len(x))):
            pyro.sample("y", pyro.distributions.Categorical(logits=logits), obs=y)
        return logits

    images = torch.randn(5, 1, 8, 8)
    guide = AutoNormal(model, init_scale=0.1)
    guide(images, torch.zeros(5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="pass vectorize=False"):
        sample_predictive(model, guide, images, 7)
    out = sample_predictive(model, guide, images, 7, vectorize=False, return_sites=["4.weight"])
    assert out["f"].shape == (7, 5, 3) and out["4.weight"].shape == (7, 3, 32)
    assert out["f"].std(0).min() > 0


@pytest.mark.parametrize("guide_name", ["AutoNormal", "AutoDiagonalNormal"])
def test_chunks_replay_an_autoguides_global_sites(guide_name):
    """The global weight sites drawn on the first chunk are replayed on the others (not conditioned:
    the model's replay of an observed guide site failed with "must be sampled in trace"), so chunked
    passes give exactly the unchunked output of the same S networks."""
    from pyro.infer import autoguide

    from bnnpyro.nn import BayesianMLP

    net = BayesianMLP(3, 1, hidden=(4,), dataset_size=20)
    guide = getattr(autoguide, guide_name)(net)
    x = torch.randn(20, 3)
    fit(net, guide, (x, x.sum(-1)), epochs=2, seed=0, progress=False)
    outputs = []
    for chunk_size in (None, 7):
        pyro.set_rng_seed(1)
        outputs.append(sample_predictive(net, guide, x, 4, chunk_size=chunk_size)["f"])
    assert outputs[0].shape == (4, 20, 1)
    torch.testing.assert_close(outputs[1], outputs[0])


def test_chunks_of_a_model_with_global_weight_sites_sequential():
    """The LSTM classifier's guide draws global weight sites: chunked sequential passes run."""
    from bnnpyro.models import BayesianLSTMClassifier

    m = BayesianLSTMClassifier(num_classes=3, hidden_size=4, dataset_size=10, input_size=3)
    f = sample_predictive(m.model, m.guide, torch.randn(10, 5, 3), 3, chunk_size=4, vectorize=False)["f"]
    assert f.shape == (3, 10, 3)


@pytest.mark.parametrize("estimator", [None, "weight_space"])
def test_weight_space_guides_keep_their_networks_across_chunks(estimator):
    """A guide whose layers sample their weights (estimator="weight_space") keeps its S networks
    across chunks with sample_predictive's estimator=None ("each layer's own") as with
    "weight_space": x twice over, split so that its two copies fall in different chunks, gives the
    same outputs for both copies (with per-chunk weight draws they differed by about 2)."""
    m = BayesianMLPClassifier(3, 4, hidden=(5,), dataset_size=20, estimator="weight_space", init_scale=0.5)
    x0 = torch.randn(6, 3)
    f = sample_predictive(m.model, m.guide, torch.cat([x0, x0]), 5, chunk_size=4, estimator=estimator)["f"]
    torch.testing.assert_close(f[:, :6], f[:, 6:])
    assert f.std(0).mean() > 0.1  # the S networks differ


def test_a_layer_site_outside_every_plate_is_drawn_per_chunk():
    """A HiddenLayer made an event (.to_event(1)) outside any data plate has one value per row of x:
    it is not a global weight site to replay on later chunks (which copied the first chunk's rows
    into the second). With a tiny posterior scale f is the mean network's X @ A_mean on every row."""
    from bnnpyro.distributions import HiddenLayer
    from bnnpyro.nn.activations import identity

    A_mean, A_scale = torch.randn(3, 2), torch.full((3, 2), 1e-6)

    def model(x, y=None):
        return pyro.sample("f", HiddenLayer(x, A_mean, A_scale, identity, include_hidden_bias=False).to_event(1))

    x = torch.randn(8, 3)
    for chunk_size in (None, 4, 3):
        f = sample_predictive(model, model, x, 2, chunk_size=chunk_size)["f"]
        torch.testing.assert_close(f, (x @ A_mean).expand(2, 8, 2), atol=1e-4, rtol=0)

    # a wrapped weight-space layer keeps its S networks across chunks too (its estimator is set
    # through the wrapper): x twice over, the copies in different chunks, give the same outputs
    A_scale = torch.full((3, 2), 1.0)

    def wide(x, y=None):
        return pyro.sample("f", HiddenLayer(x, A_mean, A_scale, identity, include_hidden_bias=False,
                                            estimator="weight_space").to_event(1))

    for estimator in (None, "weight_space", "auto"):
        f = sample_predictive(wide, wide, torch.cat([x, x]), 5, chunk_size=5, estimator=estimator)["f"]
        torch.testing.assert_close(f[:, :8], f[:, 8:])
        assert f.std(0).mean() > 0.1
