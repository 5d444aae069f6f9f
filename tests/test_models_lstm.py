"""Catalogue Bayesian LSTM classifier / language model (Fortunato et al., 2017) and the char-level text data."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from bnnpyro.data import load_classification
from bnnpyro.data.text import CharVocab, char_lm_batches, load_text
from bnnpyro.distributions import FactorizedNormal, Prior, normal_kl
from bnnpyro.models.lstm import BayesianLSTMClassifier, BayesianLSTMLanguageModel
from bnnpyro.predict.metrics import accuracy, auroc

N, B, T = 20, 6, 5


@pytest.fixture(autouse=True)
def _seed():
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def _token_classifier(**kw) -> BayesianLSTMClassifier:
    return BayesianLSTMClassifier(num_classes=3, hidden_size=4, dataset_size=N, vocab_size=7, embedding_dim=5, **kw)


def _float_classifier(**kw) -> BayesianLSTMClassifier:
    return BayesianLSTMClassifier(num_classes=3, hidden_size=4, dataset_size=N, input_size=2, **kw)


def _lm(**kw) -> BayesianLSTMLanguageModel:
    return BayesianLSTMLanguageModel(7, 5, 4, num_layers=2, dataset_size=N, **kw)


def _data(m) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(B, T, 2) if m.vocab_size is None else torch.randint(0, 7, (B, T))
    y = torch.randint(0, 7, (B, T)) if isinstance(m, BayesianLSTMLanguageModel) else torch.randint(0, 3, (B,))
    return x, y


def _perturb(m) -> None:
    """Move the posterior away from its initialisation, so that every KL term is distinct."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))


def _analytic_kl(m) -> torch.Tensor:
    """KL of all weights: LSTM and embedding sites against ``m.prior``, plus the output layer."""
    kl = sum(kl_divergence(m.posterior.distribution(s), m.prior(shape)) for s, shape in m.encoder.site_shapes().items())
    return kl + normal_kl(m.out_mean, F.softplus(m.out_rho), 0.0, m.out_prior_scale).sum()


def _weight_sites(trace) -> dict[str, torch.Tensor]:
    return {n: s["value"] for n, s in trace.nodes.items() if n.startswith(("lstm.", "embedding."))}


def _lm_local_reparameterization(**kw) -> BayesianLSTMLanguageModel:
    return _lm(output_estimator="local_reparameterization", **kw)


MODELS = [_token_classifier, _float_classifier, _lm, _lm_local_reparameterization]


@pytest.mark.parametrize("make", MODELS)
def test_loss_without_likelihood_is_the_kl_once(make):
    m = make(prior=Prior(scale=0.7), prior_scale=0.5)
    _perturb(m)
    x, y = _data(m)
    loss = TraceMeanField_ELBO().loss(poutine.block(m.model, hide=["y"]), m.guide, x, y)
    expected = _analytic_kl(m).item()
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("make", MODELS)
def test_loss_is_full_data_objective(make):
    """-ELBO = KL + (N/B) * NLL(batch), the likelihood evaluated at the guide's logits."""
    m = make()
    _perturb(m)
    x, y = _data(m)
    pyro.set_rng_seed(1)
    loss = TraceMeanField_ELBO().loss(m.model, m.guide, x, y)
    pyro.set_rng_seed(1)
    guide_trace = poutine.trace(m.guide).get_trace(x, y)  # the ELBO runs the guide first: same draws
    logits = poutine.replay(m.model, trace=guide_trace)(x, y)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
    assert loss == pytest.approx((_analytic_kl(m) + N / B * nll).item(), rel=1e-5)


def test_weight_sites_are_global_and_named_like_nn_lstm():
    m = _token_classifier(num_layers=2)
    x, y = _data(m)
    guide = poutine.trace(m.guide).get_trace(x, y)
    model = poutine.trace(poutine.replay(m.model, trace=guide)).get_trace(x, y)
    names = list(m.encoder.site_shapes())
    assert names[0] == "embedding.weight" and "lstm.weight_hh_l1" in names
    for tr in (guide, model):
        for name in names:
            assert tr.nodes[name]["cond_indep_stack"] == ()
            assert tr.nodes[name]["value"].shape == m.encoder.site_shapes()[name]
        assert [f.name for f in tr.nodes["logits"]["cond_indep_stack"]] == ["data"]
    fn = guide.nodes["lstm.weight_ih_l0"]["fn"]
    assert isinstance(fn, FactorizedNormal) and fn.event_shape == m.encoder.site_shapes()["lstm.weight_ih_l0"]


@pytest.mark.parametrize("program", ["model", "guide"])
def test_one_weight_draw_shared_across_time_and_fresh_per_call(program):
    m = _token_classifier(num_layers=2)
    _perturb(m)
    x, y = _data(m)
    features = []
    for _ in range(2):
        tr = poutine.trace(getattr(m, program)).get_trace(x, y)
        weights = _weight_sites(tr)
        lstm = m.encoder.lstm.to_lstm(weights)  # a deterministic nn.LSTM with the traced weights
        expected = lstm(F.embedding(x, weights["embedding.weight"]))[0][:, -1]
        X = tr.nodes["logits"]["fn"].X  # the output layer's input: [h_T, 1]
        torch.testing.assert_close(X[:, :-1], expected, rtol=1e-5, atol=1e-6)
        features.append((weights, X))
    (w0, X0), (w1, X1) = features
    assert all(not torch.equal(w0[k], w1[k]) for k in w0)
    assert not torch.allclose(X0, X1)


def test_lm_features_at_every_position():
    m = _lm_local_reparameterization()
    x, y = _data(m)
    tr = poutine.trace(m.guide).get_trace(x, y)
    weights = _weight_sites(tr)
    expected = m.encoder.lstm.to_lstm(weights)(F.embedding(x, weights["embedding.weight"]))[0]
    layer = tr.nodes["logits"]["fn"]
    assert layer.batch_shape == (B,) and layer.event_shape == (T, 7)
    torch.testing.assert_close(layer.base_dist.X[..., :-1], expected, rtol=1e-5, atol=1e-6)


def test_lm_weight_space_output_layer_is_one_global_draw():
    """``output_estimator="weight_space"``: the output weights are one global site, drawn once per call
    in the guide (no LSTM pass there); the model's logits are ``[h, 1] @ A`` at every position."""
    m = _lm()
    _perturb(m)
    x, y = _data(m)
    draws = []
    for _ in range(2):
        guide = poutine.trace(m.guide).get_trace(x, y)
        model = poutine.trace(poutine.replay(m.model, trace=guide)).get_trace(x, y)
        A = guide.nodes["output.weight"]["value"]
        assert A.shape == m.out_mean.shape and guide.nodes["output.weight"]["cond_indep_stack"] == ()
        assert "logits" not in guide.nodes
        weights = _weight_sites(guide)
        h = m.encoder.lstm.to_lstm(weights)(F.embedding(x, weights["embedding.weight"]))[0]
        torch.testing.assert_close(model.nodes["_RETURN"]["value"], h @ A[:-1] + A[-1], rtol=1e-5, atol=1e-5)
        draws.append(A)
    assert not torch.equal(*draws)


def test_prediction_shapes_and_probabilities():
    clf, lm = _token_classifier(), _lm()
    x, y = _data(clf)
    assert clf.get_logits(x, num_predictions=3).shape == (B, 3, 3)
    torch.testing.assert_close(clf.predict(x, 4).sum(-1), torch.ones(B))
    u = clf.uncertainty(x, 4)
    assert u["predictive_entropy"].shape == u["mutual_information"].shape == (B,)
    assert (u["mutual_information"] >= 0).all() and (u["mutual_information"] <= u["predictive_entropy"] + 1e-6).all()
    x, y = _data(lm)
    assert lm.get_logits(x, num_predictions=3).shape == (B, 3, T, 7)
    torch.testing.assert_close(lm.predict(x, 2).sum(-1), torch.ones(B, T))
    ppl = lm.perplexity(x, y, num_predictions=3, batch_size=4)
    assert 1 < ppl < 100
    tokens = lm.generate(x[0], 8)
    assert tokens.shape == (8,) and tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < 7


def test_predictions_more_samples_larger_than_dataset():
    """Predicting is not bound by dataset_size (only training batches are): through get_logits, and
    through the model and guide without y (sample_predictive, Predictive), which had refused a batch
    of more than dataset_size sequences."""
    from bnnpyro import sample_predictive

    m = _float_classifier()
    x = torch.randn(N + 5, T, 2)
    assert m.get_logits(x, 2).shape == (N + 5, 2, 3)
    assert sample_predictive(m.model, m.guide, x, 2, vectorize=False)["f"].shape == (2, N + 5, 3)
    lm = _lm()
    tokens = torch.randint(0, 7, (N + 5, T))
    assert poutine.trace(lm.guide).get_trace(tokens).nodes  # the guide alone, no y
    with pytest.raises(ValueError, match="dataset_size must be the number of training sequences"):
        m.model(x, torch.zeros(N + 5, dtype=torch.long))  # a training batch still is


def test_lm_likelihood_is_the_categorical_log_prob_and_samples():
    """The LM's fused cross-entropy likelihood equals ``Categorical(logits).log_prob`` (also broadcast
    against leading sample dimensions); run alone, the model samples next tokens from it."""
    from bnnpyro.models.lstm import _SoftmaxCategorical

    logits = 3 * torch.randn(B, T, 7)
    y = torch.randint(0, 7, (B, T))
    torch.testing.assert_close(_SoftmaxCategorical(logits).log_prob(y), dist.Categorical(logits=logits).log_prob(y))
    ys = torch.randint(0, 7, (4, B, T))
    torch.testing.assert_close(_SoftmaxCategorical(logits).log_prob(ys), dist.Categorical(logits=logits).log_prob(ys))
    m = _lm()
    x, _ = _data(m)
    tr = poutine.trace(m.model).get_trace(x)
    sampled = tr.nodes["y"]["value"]
    assert sampled.shape == (B, T) and sampled.dtype == torch.long and 0 <= sampled.min() and sampled.max() < 7


def test_config_rebuilds_the_model():
    m = _lm(prior=Prior(kind="scale_mixture"), dropout=0.2)
    copy = BayesianLSTMLanguageModel(**m.config)
    copy.load_state_dict(m.state_dict())
    assert copy.prior == m.prior
    x, _ = _data(m)
    pyro.set_rng_seed(3)
    a = m.get_logits(x, 2)
    pyro.set_rng_seed(3)
    torch.testing.assert_close(copy.get_logits(x, 2), a)


def test_scale_mixture_prior_trains():
    """With the scale-mixture prior the LSTM and embedding KLs have no closed form: the loss without
    likelihood is the one-sample ``log q(w) - log p(w)`` at the guide's draws, ``p`` written out by
    hand as ``log(pi N(w; 0, s1^2) + (1 - pi) N(w; 0, s2^2))``, plus the output layer's closed-form
    KL. Then three SVI steps run and give finite losses (the previous whole test)."""
    m = _lm(prior=Prior(kind="scale_mixture"), dropout=0.1)
    _perturb(m)
    x, y = _data(m)
    pi, s1, s2 = m.prior.pi, m.prior.sigma1, m.prior.sigma2
    pyro.set_rng_seed(2)
    loss = TraceMeanField_ELBO().loss(poutine.block(m.model, hide=["y"]), m.guide, x, y)
    pyro.set_rng_seed(2)
    guide_trace = poutine.trace(m.guide).get_trace(x, y)
    expected = normal_kl(m.out_mean, F.softplus(m.out_rho), 0.0, m.out_prior_scale).sum()
    for name, w in _weight_sites(guide_trace).items():
        q = guide_trace.nodes[name]["fn"]
        w = w.detach().double()
        log_q = torch.distributions.Normal(q.loc.detach().double(), q.scale.detach().double()).log_prob(w)
        log_p = torch.log(pi * torch.exp(-0.5 * (w / s1) ** 2) / (s1 * math.sqrt(2 * math.pi))
                          + (1 - pi) * torch.exp(-0.5 * (w / s2) ** 2) / (s2 * math.sqrt(2 * math.pi)))
        expected = expected + (log_q - log_p).sum()
    assert loss == pytest.approx(expected.item(), rel=1e-4)
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    assert torch.isfinite(torch.tensor([svi.step(x, y) for _ in range(3)])).all()


def test_digits_rows_as_sequences_accuracy_and_ood_mutual_information():
    """8x8 digits read row by row (8 steps x 8 features). Margins measured over seeds 0-2 at this
    setting: accuracy 0.92-0.94, MI ratio row-shuffled / test 2.4-2.5, AUROC 0.81-0.83."""
    data = load_classification("digits")
    x_train, x_test = data.x_train.view(-1, 8, 8), data.x_test.view(-1, 8, 8)
    n = len(x_train)
    m = BayesianLSTMClassifier(num_classes=10, hidden_size=32, dataset_size=n, input_size=8)
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for _ in range(10):
        for idx in torch.randperm(n).split(64):
            svi.step(x_train[idx], data.y_train[idx])
    majority = torch.bincount(data.y_test).max() / len(data.y_test)
    acc = accuracy(m.predict(x_test, 20), data.y_test)
    assert majority < 0.15 and acc > 0.8

    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([image[torch.randperm(8, generator=g)] for image in x_test])  # rows in random order
    mi_in = m.uncertainty(x_test, 30)["mutual_information"]
    mi_out = m.uncertainty(shuffled, 30)["mutual_information"]
    assert mi_out.mean() > 1.5 * mi_in.mean()
    assert auroc(mi_in, mi_out) > 0.7


def test_lm_perplexity_decreases_on_bundled_text():
    text = load_text()
    vocab = CharVocab(text)
    x, y = char_lm_batches(text, vocab, seq_len=35)
    x_val, y_val = char_lm_batches(text, vocab, seq_len=35, split="valid")
    x_val, y_val = x_val[:64], y_val[:64]
    m = BayesianLSTMLanguageModel(len(vocab), 16, 32, num_layers=2, dataset_size=len(x))
    before = m.perplexity(x_val, y_val, num_predictions=4)
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for _ in range(30):
        idx = torch.randint(0, len(x), (32,))
        svi.step(x[idx], y[idx])
    after = m.perplexity(x_val, y_val, num_predictions=4)
    assert before > 0.9 * len(vocab) and after < 0.6 * before


# -- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, x, y, error, match",
    [
        (_float_classifier, torch.randint(0, 3, (B, T, 2)), None, TypeError, "x must be a floating-point"),
        (_float_classifier, torch.randn(B, T), None, ValueError, "x must be B x T x 2"),
        (_float_classifier, torch.randn(B, T, 3), None, ValueError, "x must be B x T x 2"),
        (_float_classifier, torch.full((B, T, 2), float("nan")), None, ValueError, "x contains NaN"),
        (_float_classifier, torch.randn(N + 1, T, 2), torch.zeros(N + 1).long(), ValueError, "dataset_size"),
        (_float_classifier, torch.randn(B, T, 2), torch.full((B,), 3), ValueError, r"y holds class labels in \[3, 3"),
        (_float_classifier, torch.randn(B, T, 2), torch.full((B,), -1), ValueError, "y holds class labels"),
        (_float_classifier, torch.randn(B, T, 2), torch.zeros(B), TypeError, "y must be an int64"),
        (_float_classifier, torch.randn(B, T, 2), torch.zeros(B + 1).long(), ValueError, "y must have shape"),
        (_token_classifier, torch.randn(B, T), None, TypeError, "x must be an int64"),
        (_token_classifier, torch.full((B, T), 7), None, ValueError, r"x holds ids in \[7, 7\], expected \[0, 7"),
        (_token_classifier, torch.zeros(B, T, 1).long(), None, ValueError, "x must be B x T token ids"),
        (_lm, torch.zeros(B, T).long(), torch.zeros(B, T - 1).long(), ValueError, "y must have shape"),
        (_lm, torch.zeros(B, T).long(), torch.full((B, T), 9), ValueError, "y holds next-token ids"),
        (_lm, torch.zeros(N + 1, T).long(), torch.zeros(N + 1, T).long(), ValueError, "dataset_size"),
    ],
)
@pytest.mark.parametrize("program", ["model", "guide"])
def test_bad_training_inputs_raise(make, x, y, error, match, program):
    with pytest.raises(error, match=match):
        getattr(make(), program)(x, y)


def test_bad_prediction_inputs_raise():
    clf, lm = _float_classifier(), _lm()
    with pytest.raises(ValueError, match="num_predictions"):
        clf.get_logits(torch.randn(B, T, 2), num_predictions=0)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        clf.uncertainty(torch.zeros(B, T, 2, dtype=torch.long))
    x = torch.zeros(B, T, dtype=torch.long)
    with pytest.raises(ValueError, match="y must have shape"):
        lm.perplexity(x, x[:, 1:])
    with pytest.raises(ValueError, match="prompt"):
        lm.generate(x, 3)
    with pytest.raises(ValueError, match="temperature"):
        lm.generate(x[0], 3, temperature=0.0)


def test_out_of_range_token_ids_are_named_in_every_chunk_of_the_predictive():
    """sample_predictive runs its later chunks with validation off; the token-id check runs anyway
    (a bad id had become a bare IndexError, a device-side assert on a GPU)."""
    from bnnpyro import sample_predictive

    m = BayesianLSTMClassifier(num_classes=3, hidden_size=4, dataset_size=30, vocab_size=6, embedding_dim=3)
    x = torch.randint(0, 6, (12, 5))
    x[-1, 0] = 9
    with pytest.raises(ValueError, match=r"x holds ids in \[0, 9\], expected \[0, 6\)"):
        sample_predictive(m.model, m.guide, x, 2, chunk_size=4, vectorize=False)


@pytest.mark.parametrize("make", ["token classifier", "language model"])
def test_vectorized_particles_raise_an_explanation(make):
    """The LSTM models take one weight draw per call: a token model under vectorize_particles says so,
    as the float-input path does, instead of F.embedding's bare "'weight' must be 2-D"."""
    if make == "token classifier":
        m = BayesianLSTMClassifier(num_classes=3, hidden_size=4, dataset_size=30, vocab_size=6, embedding_dim=3)
        y = torch.randint(0, 3, (4,))
    else:
        m, y = _lm(), torch.randint(0, 6, (4, 5))
    x = torch.randint(0, 6, (4, 5))
    elbo = TraceMeanField_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=2)
    with pytest.raises(RuntimeError, match=r"embedding table must be one draw \(V x E\).*one at a time"):
        elbo.loss(m.model, m.guide, x, y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vocab_size": 7, "embedding_dim": 5, "input_size": 2}, "exactly one of vocab_size"),
        ({}, "exactly one of vocab_size"),
        ({"vocab_size": 7}, "embedding_dim is required"),
        ({"vocab_size": 7, "embedding_dim": 0}, "embedding_dim must be a positive int"),
        ({"input_size": 2, "embedding_dim": 5}, "embedding_dim is only used"),
        ({"input_size": 2, "num_classes": 1}, "num_classes"),
        ({"input_size": 2, "dataset_size": 0}, "dataset_size"),
        ({"input_size": 2, "hidden_size": 2.5}, "hidden_size"),
        ({"input_size": 2, "prior_scale": -1.0}, "prior_scale"),
    ],
)
def test_bad_classifier_arguments_raise(kwargs, match):
    args = {"num_classes": 3, "hidden_size": 4, "dataset_size": N, **kwargs}
    with pytest.raises(ValueError, match=match):
        BayesianLSTMClassifier(**args)


def test_bad_lm_arguments_raise():
    with pytest.raises(ValueError, match="vocab_size"):
        BayesianLSTMLanguageModel(0, 5, 4, dataset_size=N)
    with pytest.raises(ValueError, match="dropout"):
        BayesianLSTMLanguageModel(7, 5, 4, dataset_size=N, dropout=1.0)
    with pytest.raises(TypeError, match="prior"):
        BayesianLSTMLanguageModel(7, 5, 4, dataset_size=N, prior="normal")
    with pytest.raises(ValueError, match="output_estimator must be one of"):
        BayesianLSTMLanguageModel(7, 5, 4, dataset_size=N, output_estimator="flipout")
    with pytest.raises(ValueError, match="needs output_estimator='local_reparameterization'"):
        BayesianLSTMLanguageModel(7, 5, 4, dataset_size=N, estimator="flipout")


# -- text data -------------------------------------------------------------------------------


def test_bundled_text_vocab_and_batches():
    text = load_text()
    assert 150_000 < len(text.encode()) <= 200_000 and text.startswith("First Citizen:")
    vocab = CharVocab(text)
    assert vocab.decode(vocab.encode("ROMEO: to be")) == "ROMEO: to be"
    x, y = char_lm_batches(text, vocab, seq_len=35)
    x_val, y_val = char_lm_batches(text, vocab, seq_len=35, split="valid")
    cut = int(0.9 * len(text))
    assert x.shape == y.shape == ((cut - 1) // 35, 35) and x_val.shape == ((len(text) - cut - 1) // 35, 35)
    assert vocab.decode(x[0]) == text[:35] and vocab.decode(y[0]) == text[1:36]
    assert vocab.decode(x_val[0]) == text[cut : cut + 35]
    torch.testing.assert_close(x.flatten()[1:], y.flatten()[:-1])


def test_text_errors(tmp_path):
    vocab = CharVocab("abc")
    with pytest.raises(ValueError, match="'z'"):
        vocab.encode("abz")
    with pytest.raises(ValueError, match="split"):
        char_lm_batches("abcabc", vocab, seq_len=2, split="test")
    with pytest.raises(ValueError, match="too few"):
        char_lm_batches("abcabc", vocab, seq_len=35)
    with pytest.raises(ValueError, match="unknown text"):
        load_text(name="wikitext")
    (tmp_path / "t.txt").write_text("hello", encoding="utf-8")
    assert load_text(tmp_path / "t.txt") == "hello"


@pytest.mark.parametrize("make, x, S", [
    (_token_classifier, torch.randint(0, 7, (6, 5)), 4),
    (_float_classifier, torch.randn(6, 5, 2), 4),  # no embedding: the LSTM kernel itself gets the stack
    (_float_classifier, torch.randn(6, 5, 2), 6),
])
def test_sample_predictive_runs_the_classifier_one_draw_at_a_time(make, x, S):
    """The fused LSTM kernel takes 2-D weights: sample_predictive's vectorized pass fails with a
    hint naming the LSTM models and ``vectorize=False``, which then gives ``S x B x C`` logits whose
    draws differ, each the output layer's draw on one LSTM weight draw."""
    from bnnpyro import sample_predictive

    m = make()
    with pytest.raises(RuntimeError, match="(?s)the Bayesian LSTM models.*pass vectorize=False"):
        sample_predictive(m.model, m.guide, x, S)
    f = sample_predictive(m.model, m.guide, x, S, vectorize=False)["f"]
    assert f.shape == (S, 6, 3)
    assert not torch.allclose(f[0], f[1])


@pytest.mark.parametrize("make, kwargs, reused", [
    (_token_classifier, {}, True),
    (_float_classifier, {}, True),
    (_lm, {"output_estimator": "local_reparameterization"}, True),
    (_token_classifier, {"estimator": "flipout"}, False),  # the guide's output is not the plain LSTM's
    (_lm, {"output_estimator": "local_reparameterization", "dropout": 0.3}, False),  # dropout masks differ
])
def test_the_model_reuses_the_guides_lstm_pass_of_replayed_weights(monkeypatch, make, kwargs, reused):
    """Under replay the model gets the guide's weight draws (the same tensors) on the same x and,
    when the guide's output is the plain LSTM of those draws, takes it instead of running the
    LSTM again; otherwise, and for the prior predictive, it runs the LSTM itself. The losses are
    the same as with the model running it every time."""
    import bnnpyro.models.lstm as lstm_models

    calls = []
    forward = lstm_models.lstm_forward
    monkeypatch.setattr(lstm_models, "lstm_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    m = make(**kwargs)
    x, y = _data(m)
    guide_trace = poutine.trace(m.guide).get_trace(x, y)
    guide_runs = len(calls)
    poutine.replay(m.model, trace=guide_trace)(x, y)
    assert len(calls) - guide_runs == (0 if reused else 1)
    assert m.encoder not in lstm_models._GUIDE_PASS  # nothing kept once the model took it
    m.model(x)  # the prior predictive runs the LSTM
    assert len(calls) - guide_runs == (1 if reused else 2)


def test_reusing_the_lstm_pass_changes_no_loss():
    import bnnpyro.models.lstm as lstm_models

    class Running(BayesianLSTMClassifier):
        def _guide_outputs(self, x):
            return self.encoder.run(self.posterior.sample(), x, training=self.training)[0]

    losses = []
    for cls in (BayesianLSTMClassifier, Running):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        m = cls(num_classes=3, hidden_size=4, dataset_size=N, vocab_size=7, embedding_dim=5)
        x, y = _data(m)
        svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
        losses.append([svi.step(x, y) for _ in range(3)])
        assert m.encoder not in lstm_models._GUIDE_PASS
    assert losses[0] == losses[1]


def test_repr_shows_the_configuration():
    assert "num_classes=3, hidden_size=4" in repr(_float_classifier()) and "input_size=2" in repr(_float_classifier())
    assert "output_estimator='local_reparameterization'" in repr(_lm(output_estimator="local_reparameterization"))


def _reference_logits(m, x, S):
    """``B x S x ...`` logits by hand: per draw s the guide's weights (``posterior.rsample()``) in an eval-mode
    nn.LSTM, then the output layer's exact marginal ``X @ mean + sqrt(X^2 @ scale^2) * eps``."""
    draws = [m.posterior.rsample() for _ in range(S)]
    rng = torch.get_rng_state()  # building an nn.LSTM draws its initial weights
    hs = []
    for w in draws:
        inputs = x if m.vocab_size is None else F.embedding(x, w["embedding.weight"])
        hs.append(m.encoder.lstm.to_lstm(w).eval()(inputs)[0])
    torch.set_rng_state(rng)
    h = torch.stack(hs)  # S x B x T x H
    if isinstance(m, BayesianLSTMClassifier):
        h = h[:, :, -1]
    X = torch.cat([h, torch.ones_like(h[..., :1])], -1)
    scale = F.softplus(m.out_rho)
    eps = torch.randn(X.shape[:-1] + (m.out_mean.size(-1),))
    return (X @ m.out_mean + (X**2 @ scale**2).sqrt() * eps).movedim(0, 1)


@pytest.mark.parametrize("make", [_token_classifier, _float_classifier, lambda **kw: _lm(dropout=0.5, **kw)])
def test_get_logits_equals_a_looped_nn_lstm_reference(make):
    """get_logits: S posterior draws, each through nn.LSTM (no dropout at prediction, even in training
    mode), the classifier at the last step, the output layer from its exact marginal."""
    m = make(init_scale=0.3)
    _perturb(m)
    x, _ = _data(m)
    S = 4
    pyro.set_rng_seed(3)
    with torch.no_grad():
        expected = _reference_logits(m, x, S)
    pyro.set_rng_seed(3)
    got = m.get_logits(x, S)
    assert m.training and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:, 0], got[:, 1])


def test_perplexity_is_exp_of_minus_the_mean_log_predictive_probability():
    """perplexity = exp(-mean_{b,t} log( (1/S) sum_s p_s(y_bt) )) from get_logits' draws, also
    computed in batches of sequences (the same draws when each batch is predicted in turn)."""
    m = _lm(init_scale=0.5)
    _perturb(m)
    x, y = _data(m)
    S = 5
    for batch_size in (B, 4):
        pyro.set_rng_seed(2)
        probs = torch.cat([m.get_logits(xb, S).softmax(-1).mean(1) for xb in x.split(batch_size)])  # B x T x V
        expected = torch.exp(-probs.gather(-1, y[..., None]).log().mean())
        pyro.set_rng_seed(2)
        got = m.perplexity(x, y, num_predictions=S, batch_size=batch_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_generate_is_ancestral_sampling_under_one_posterior_draw():
    """At a temperature near 0, generate is greedy decoding under one draw of all weights (output layer
    included): each token the argmax of the next-token logits of nn.LSTM run on prompt + tokens so far."""
    pyro.set_rng_seed(2)  # a posterior whose greedy continuation is not one token repeated
    m = _lm(init_scale=0.5)
    _perturb(m)
    prompt = torch.tensor([1, 4, 2])
    pyro.set_rng_seed(4)
    tokens = m.generate(prompt, 10, temperature=1e-4)
    pyro.set_rng_seed(4)
    with torch.no_grad():
        w = m.posterior.rsample()
        A = m.out_mean + F.softplus(m.out_rho) * torch.randn_like(m.out_mean)
        lstm = m.encoder.lstm.to_lstm(w).eval()
        seq = prompt
        for _ in range(10):
            h = lstm(F.embedding(seq[None], w["embedding.weight"]))[0][0, -1]
            seq = torch.cat([seq, (h @ A[:-1] + A[-1]).argmax()[None]])
    assert tokens.tolist() == seq[len(prompt):].tolist()
    assert len(set(tokens.tolist())) > 2


def test_the_models_features_are_its_own_weights_on_its_own_x():
    """The model reuses the guide's LSTM pass only for the guide's draws on the same x: after a guide
    pass, the prior predictive (the model's own weight draws) and a replay on another x compute their
    own features."""
    m = _token_classifier(init_scale=0.3)
    _perturb(m)
    x, y = _data(m)
    x2 = torch.randint(0, 7, (B, T))
    for replay_on in (None, x2):
        guide_trace = poutine.trace(m.guide).get_trace(x, y)
        model = m.model if replay_on is None else poutine.replay(m.model, trace=guide_trace)
        xm = x if replay_on is None else x2
        tr = poutine.trace(model).get_trace(xm)
        weights = _weight_sites(tr)
        expected = m.encoder.lstm.to_lstm(weights)(F.embedding(xm, weights["embedding.weight"]))[0][:, -1]
        torch.testing.assert_close(tr.nodes["logits"]["fn"].X[:, :-1], expected, rtol=1e-5, atol=1e-6)
