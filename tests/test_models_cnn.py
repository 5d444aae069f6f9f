"""BayesianCNNClassifier: the exact minibatch objective, training on real images, estimators, save/load."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

import bnnpyro
from bnnpyro import fit, sample_predictive
from bnnpyro.data import load_classification
from bnnpyro.models import BayesianCNNClassifier
from bnnpyro.predict import accuracy, expected_calibration_error, mean_probs, nll


def _digits():
    d = load_classification("digits", seed=0)
    return (d.x_train.reshape(-1, 1, 8, 8), d.y_train, d.x_test.reshape(-1, 1, 8, 8), d.y_test)


def _small(**kwargs):
    return BayesianCNNClassifier(num_classes=10, image_size=8, channels=(4, 6), hidden=(12,), **kwargs)


@pytest.mark.parametrize("estimator", ["local_reparameterization", "flipout", "weight_space"])
def test_minibatch_loss_is_the_full_data_objective(estimator):
    """One-particle ``TraceMeanField_ELBO`` loss == (N/B) * NLL of the guide's sampled logits + KL
    (closed form, counted once), for a subsampled batch: same seed, guide traced separately."""
    N, B = 500, 16
    m = _small(dataset_size=N, estimator=estimator, init_scale=0.1)
    x, y = torch.randn(B, 1, 8, 8), torch.randint(0, 10, (B,))
    pyro.set_rng_seed(3)
    loss = TraceMeanField_ELBO().loss(m.model, m.guide, x, y)
    pyro.set_rng_seed(3)
    f = poutine.trace(m.guide).get_trace(x, y).nodes[m.output_site]["value"]
    expected = -(N / B) * torch.distributions.Categorical(logits=f).log_prob(y).sum() + m.kl()
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_trains_on_digits_accuracy_and_calibration():
    """8x8 digits (1,438 train / 359 test), 30 epochs: accuracy >= 0.93, ECE <= 0.12, NLL < 0.3
    (measured: 0.967, 0.082, 0.17; the posterior is underconfident on this small set)."""
    x, y, x_test, y_test = _digits()
    m = BayesianCNNClassifier(num_classes=10, dataset_size=len(x), image_size=8, channels=(8, 16), hidden=(64,))
    fit(m.model, m.guide, (x, y), epochs=30, batch_size=64, seed=0, progress=False,
        optim=pyro.optim.Adam({"lr": 1e-2}))
    with torch.no_grad():
        probs = mean_probs(sample_predictive(m.model, m.guide, x_test, 50)["f"], logits=True)
    acc = accuracy(probs, y_test).item()
    assert acc >= 0.93
    assert expected_calibration_error(probs, y_test).item() <= 0.12
    assert nll(probs, y_test).item() < 0.3


@pytest.mark.parametrize("estimator", ["flipout", "weight_space"])
def test_other_estimators_train(estimator):
    """100 steps on 256 digits: training accuracy of the predictive mean >= 0.6 (chance: 0.1)."""
    x, y, _, _ = _digits()
    x, y = x[:256], y[:256]
    m = _small(dataset_size=len(x), estimator=estimator)
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for _ in range(100):
        svi.step(x, y)
    with torch.no_grad():
        probs = mean_probs(sample_predictive(m.model, m.guide, x, 20)["f"], logits=True)
    assert accuracy(probs, y).item() >= 0.6


def test_predictive_shapes_and_save_load_round_trip(tmp_path):
    x, y, x_test, _ = _digits()
    m = _small(dataset_size=len(x))
    fit(m.model, m.guide, (x[:128], y[:128]), epochs=2, batch_size=64, seed=0, progress=False)
    path = tmp_path / "cnn.pt"
    bnnpyro.save(path, m)
    loaded = bnnpyro.load(path)
    assert isinstance(loaded, BayesianCNNClassifier) and loaded.config == m.config
    with torch.no_grad():
        pyro.set_rng_seed(5)
        a = sample_predictive(m.model, m.guide, x_test[:7], 9)["f"]
        pyro.set_rng_seed(5)
        b = sample_predictive(loaded.model, loaded.guide, x_test[:7], 9)["f"]
    assert a.shape == (9, 7, 10)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_input():
    m = _small(dataset_size=10)
    with pytest.raises(ValueError, match="x must be B x 1 x 8 x 8"):
        m.guide(torch.randn(2, 64))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        m.guide(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        m.guide(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="labels in"):
        m.model(torch.randn(2, 1, 8, 8), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="dataset_size"):
        m.model(torch.randn(11, 1, 8, 8), torch.zeros(11, dtype=torch.long))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        BayesianCNNClassifier(kernel_size=4)
    with pytest.raises(ValueError, match="estimator"):
        BayesianCNNClassifier(estimator="dropout")
    with pytest.raises(ValueError, match="too small"):
        BayesianCNNClassifier(image_size=4, channels=(2, 2, 2))


def test_the_model_reuses_the_guides_pooling_of_replayed_draws(monkeypatch):
    """Under replay the model gets the guide's conv draws (the same tensors) and takes their pooled
    values from the guide's pass instead of pooling again; with any other draw (the prior
    predictive, or a draw the guide did not make) it pools itself. Same values either way."""
    import bnnpyro.models.cnn as cnn

    calls = []
    pool = cnn._max_pool
    monkeypatch.setattr(cnn, "_max_pool", lambda h: calls.append(h.shape) or pool(h))
    m = _small(dataset_size=100)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    guide_trace = poutine.trace(m.guide).get_trace(x, y)
    assert len(calls) == 2  # the guide's two conv blocks
    f = poutine.replay(m.model, trace=guide_trace)(x, y)
    assert len(calls) == 2  # the model pooled nothing
    assert cnn._GUIDE_POOLED[m] == []  # what the model took is not kept
    # the same draws as different tensors: pooled by the model, to the same values
    trace_copy = guide_trace.copy()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            trace_copy.nodes[name] = {**site, "value": site["value"].clone()}
    torch.testing.assert_close(poutine.replay(m.model, trace=trace_copy)(x, y), f, rtol=0, atol=0)
    assert len(calls) == 4
    # the prior predictive: the model alone
    assert m.model(x).shape == (5, 10) and len(calls) == 6
    # a guide pass without gradients (prediction) keeps nothing: its S x B pooled draws may be large
    with torch.no_grad():
        m.guide(x)
    assert cnn._GUIDE_POOLED[m] == []


def test_reusing_the_pooling_changes_no_loss():
    """svi.step losses with the model pooling for itself and with the reuse are identical."""
    import bnnpyro.models.cnn as cnn

    class Pooling(BayesianCNNClassifier):
        @staticmethod
        def _pool(draw, pooled, variational):
            return cnn._max_pool(draw)

    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    losses = []
    for cls in (BayesianCNNClassifier, Pooling):
        torch.manual_seed(0)
        m = cls(num_classes=10, image_size=8, channels=(4, 6), hidden=(12,), dataset_size=100)
        svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
        pyro.set_rng_seed(1)
        losses.append([svi.step(x, y) for _ in range(3)])
    assert losses[0] == losses[1]


def test_repr_shows_the_configuration():
    text = repr(_small(dataset_size=40, estimator="flipout"))
    assert "num_classes=10, dataset_size=40" in text and "channels=[4, 6]" in text and "estimator='flipout'" in text


def test_width_sequences_are_checked_by_name():
    with pytest.raises(ValueError, match=r"hidden must be a sequence of positive ints, e.g. \(50,\), got 128"):
        BayesianCNNClassifier(image_size=8, channels=(4,), hidden=128)
    with pytest.raises(ValueError, match=r"channels must be a sequence of positive ints, got \(4, 0\)"):
        BayesianCNNClassifier(image_size=8, channels=(4, 0))


@pytest.mark.parametrize("estimator", ["auto", None])
def test_weight_space_filters_are_one_network_across_chunks(estimator):
    """sample_predictive reuses a weight-space ConvLayer's S filter (and bias) draws on every chunk,
    as a HiddenLayer's: the two copies of x, in different chunks, give the same outputs (the conv
    weights were redrawn per chunk, a difference of about 1)."""
    m = _small(estimator="weight_space", init_scale=0.3)
    x0 = torch.rand(3, 1, 8, 8)
    f = sample_predictive(m.model, m.guide, torch.cat([x0, x0]), 4, chunk_size=3, estimator=estimator)["f"]
    torch.testing.assert_close(f[:, :3], f[:, 3:])
    assert f.std(0).mean() > 0.01
