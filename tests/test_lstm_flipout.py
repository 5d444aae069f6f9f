"""Flipout LSTM (Wen et al., 2018): exact per-sequence weights, same marginals as weight-space draws,
and the catalogue models' ``estimator="flipout"``."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from bnnpyro.models.lstm import BayesianLSTMClassifier, BayesianLSTMLanguageModel
from bnnpyro.nn.lstm import flipout_signs, lstm_flipout_forward, lstm_forward
from bnnpyro.serialization import load, save

D, H, T, B = 3, 4, 5, 3


def _flat(lstm: nn.LSTM) -> list[torch.Tensor]:
    return [w.detach().clone() for w in lstm._flat_weights]


def _per_sequence_lstm(template: nn.LSTM, means, deltas, signs, b: int) -> nn.LSTM:
    """An ``nn.LSTM`` whose weight matrices are ``W + outer(s_out[b], s_in[b]) * dW``, biases ``b + db``."""
    lstm = nn.LSTM(template.input_size, template.hidden_size, template.num_layers, template.bias,
                   template.batch_first, bidirectional=template.bidirectional)
    matrix_signs = iter(signs)
    with torch.no_grad():
        for name, m, d in zip(template._flat_weights_names, means, deltas):
            if name.startswith("weight"):
                s_in, s_out = next(matrix_signs)
                lstm.get_parameter(name).copy_(m + torch.outer(s_out[b], s_in[b]) * d)
            else:
                lstm.get_parameter(name).copy_(m + d)
    return lstm


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_each_sequence_runs_nn_lstm_with_its_own_fixed_weights(num_layers, batch_first, bidirectional):
    """Sequence b of the flipout call = nn.LSTM with weights W_b on that sequence alone, at every step:
    the flips are per sequence and held fixed across time."""
    template = nn.LSTM(D, H, num_layers, batch_first=batch_first, bidirectional=bidirectional)
    means = _flat(template)
    deltas = [0.5 * torch.randn_like(w) for w in means]
    signs = flipout_signs(B, means, bias=True)
    x = torch.randn(B, T, D) if batch_first else torch.randn(T, B, D)
    dirs = 2 if bidirectional else 1
    hx = (torch.randn(num_layers * dirs, B, H), torch.randn(num_layers * dirs, B, H))
    out, (h_n, c_n) = lstm_flipout_forward(x, hx, means, deltas, signs, num_layers=num_layers, bias=True,
                                           batch_first=batch_first, bidirectional=bidirectional)
    seq_dim = 0 if batch_first else 1
    for b in range(B):
        lstm = _per_sequence_lstm(template, means, deltas, signs, b)
        hx_b = (hx[0][:, b:b + 1].contiguous(), hx[1][:, b:b + 1].contiguous())
        out_e, (h_e, c_e) = lstm(x.narrow(seq_dim, b, 1), hx_b)
        torch.testing.assert_close(out.narrow(seq_dim, b, 1), out_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_n[:, b:b + 1], h_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c_n[:, b:b + 1], c_e, rtol=1e-5, atol=1e-5)
    # the sequences do see different weights: one shared draw would give a different output
    shared, _ = lstm_forward(x, hx, [m + d for m, d in zip(means, deltas)], num_layers=num_layers, bias=True,
                             batch_first=batch_first, dropout=0.0, training=False, bidirectional=bidirectional)
    assert not torch.allclose(out, shared, atol=1e-3)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_zero_perturbation_is_nn_lstm_with_the_means(num_layers, batch_first, bias):
    lstm = nn.LSTM(D, H, num_layers, bias=bias, batch_first=batch_first)
    means = _flat(lstm)
    x = torch.randn(B, T, D) if batch_first else torch.randn(T, B, D)
    out, (h_n, c_n) = lstm_flipout_forward(x, None, means, [torch.zeros_like(w) for w in means], num_layers=num_layers,
                                           bias=bias, batch_first=batch_first)
    out_e, (h_e, c_e) = lstm(x)
    for a, e in ((out, out_e), (h_n, h_e), (c_n, c_e)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_default_signs_are_one_flipout_signs_draw_per_call():
    lstm = nn.LSTM(D, H, 2)
    means = _flat(lstm)
    deltas = [0.5 * torch.randn_like(w) for w in means]
    x = torch.randn(T, B, D)
    kwargs = dict(num_layers=2, bias=True, batch_first=False)
    torch.manual_seed(7)
    signs = flipout_signs(B, means, bias=True)
    assert len(signs) == 4 and [tuple(s.shape) for s in signs[0]] == [(B, D), (B, 4 * H)]
    assert all(set(s.unique().tolist()) <= {-1.0, 1.0} for pair in signs for s in pair)
    torch.manual_seed(7)
    first = lstm_flipout_forward(x, None, means, deltas, **kwargs)[0]
    torch.testing.assert_close(first, lstm_flipout_forward(x, None, means, deltas, signs, **kwargs)[0])
    assert not torch.allclose(first, lstm_flipout_forward(x, None, means, deltas, **kwargs)[0])


def test_dropout_between_layers_only_in_training():
    """Dropout on layer 0's output (as ``nn.LSTM``), reproduced with two one-layer ``nn.LSTM``s."""
    lstm = nn.LSTM(D, H, 2, dropout=0.5)
    means = _flat(lstm)
    zeros = [torch.zeros_like(w) for w in means]
    signs = flipout_signs(B, means, bias=True)  # given, so that the only random draw is the dropout mask
    x = torch.randn(T, B, D)
    kwargs = dict(num_layers=2, bias=True, batch_first=False, dropout=0.5)
    torch.testing.assert_close(lstm_flipout_forward(x, None, means, zeros, signs, training=False, **kwargs)[0],
                               lstm.eval()(x)[0], rtol=1e-5, atol=1e-5)
    layers = [nn.LSTM(D, H), nn.LSTM(H, H)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for p, w in zip(layer._flat_weights, means[4 * i: 4 * i + 4]):
                p.copy_(w)
    torch.manual_seed(3)
    train = lstm_flipout_forward(x, None, means, zeros, signs, training=True, **kwargs)[0]
    torch.manual_seed(3)
    expected = layers[1](torch.nn.functional.dropout(layers[0](x)[0], 0.5, training=True))[0]
    torch.testing.assert_close(train, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(train, lstm.eval()(x)[0], atol=1e-3)


def test_per_sequence_moments_match_weight_space_draws():
    """Each sequence's output has the distribution of one shared draw W + dW, dW ~ N(0, 0.5^2):
    per-element mean and variance over M independent calls of each estimator agree within 4.5
    standard errors (two-sample z; 2 x 60 elements, family-wise false alarm ~1e-3)."""
    M, sigma = 3000, 0.5
    lstm = nn.LSTM(2, 3, 1)
    means = _flat(lstm)
    x = torch.randn(4, 5, 2)  # T=4, B=5
    kwargs = dict(num_layers=1, bias=True, batch_first=False)
    weight_space, flipout = [], []
    with torch.no_grad():
        for _ in range(M):
            deltas = [sigma * torch.randn_like(w) for w in means]
            weight_space.append(lstm_forward(x, None, [m + d for m, d in zip(means, deltas)], dropout=0.0,
                                             training=False, bidirectional=False, **kwargs)[0])
            deltas = [sigma * torch.randn_like(w) for w in means]
            flipout.append(lstm_flipout_forward(x, None, means, deltas, **kwargs)[0])
    a, b = torch.stack(weight_space).double(), torch.stack(flipout).double()

    def moments(s):
        mean, var = s.mean(0), s.var(0)
        fourth = ((s - mean) ** 4).mean(0)
        return mean, var, var / M, (fourth - var**2) / M  # mean, variance and their squared std errors

    mean_a, var_a, se2_mean_a, se2_var_a = moments(a)
    mean_b, var_b, se2_mean_b, se2_var_b = moments(b)
    z_mean = (mean_a - mean_b) / (se2_mean_a + se2_mean_b).sqrt()
    z_var = (var_a - var_b) / (se2_var_a + se2_var_b).sqrt()
    assert z_mean.abs().max() < 4.5 and z_var.abs().max() < 4.5
    assert var_a.min() > 1e-3  # the perturbation is not negligible


def test_bad_arguments_raise():
    lstm = nn.LSTM(D, H, 1)
    means = _flat(lstm)
    kwargs = dict(num_layers=1, bias=True, batch_first=False)
    x = torch.randn(T, B, D)
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 2]))
    with pytest.raises(NotImplementedError, match="packed"):
        lstm_flipout_forward(packed, None, means, means, **kwargs)
    with pytest.raises(ValueError, match="3-D"):
        lstm_flipout_forward(x[:, 0], None, means, means, **kwargs)
    with pytest.raises(ValueError, match="expected 4 mean and delta"):
        lstm_flipout_forward(x, None, means, means[:2], **kwargs)
    with pytest.raises(ValueError, match=r"delta_weights\[1\]"):
        lstm_flipout_forward(x, None, means, [means[0], means[0], means[2], means[3]], **kwargs)
    with pytest.raises(ValueError, match="projections"):
        proj = _flat(nn.LSTM(D, H, 1, proj_size=2))
        lstm_flipout_forward(x, None, proj[:4], proj[:4], **kwargs)
    with pytest.raises(ValueError, match=r"\(s_in, s_out\) pairs"):
        lstm_flipout_forward(x, None, means, means, flipout_signs(B, means, True)[:1], **kwargs)
    with pytest.raises(RuntimeError, match="h_0"):
        lstm_flipout_forward(x, (torch.zeros(1, B + 1, H), torch.zeros(1, B + 1, H)), means, means, **kwargs)


# -- catalogue models ----------------------------------------------------------------------


N, BATCH = 40, 8


def _classifier(**kw) -> BayesianLSTMClassifier:
    return BayesianLSTMClassifier(num_classes=2, hidden_size=6, dataset_size=N, input_size=1, **kw)


def _lm(**kw) -> BayesianLSTMLanguageModel:
    # flipout's features are computed in the guide: the output layer is the guide's "logits" site
    return BayesianLSTMLanguageModel(5, 3, 4, num_layers=2, dataset_size=N,
                                     output_estimator="local_reparameterization", **kw)


def _sign_task(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 6, 1)
    return x, (x.sum((1, 2)) > 0).long()


def test_flipout_classifier_trains():
    x, y = _sign_task(N)
    m = _classifier(estimator="flipout")
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 0.03}), TraceMeanField_ELBO())
    losses = [svi.step(x[idx], y[idx]) for _ in range(25) for idx in torch.randperm(N).split(BATCH)]
    first, last = sum(losses[:25]) / 25, sum(losses[-25:]) / 25
    assert last < 0.6 * first  # measured 0.27 x over seeds 0-2
    acc = (m.predict(x, 10).argmax(-1) == y).float().mean()
    assert acc > 0.75  # chance 0.5; measured 0.93-1.0


def _lm_task(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting mod 5 from a random start: next token = token + 1."""
    seq = (torch.randint(0, 5, (n, 1)) + torch.arange(7)) % 5
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize("make, task", [(_classifier, _sign_task), (_lm, _lm_task)])
def test_flipout_elbo_has_the_weight_space_expectation(make, task):
    """-ELBO of one minibatch at the same parameters (briefly trained, then every LSTM/embedding weight
    std set to 0.2), M independent estimates per estimator: the means agree within 4 standard errors.
    Measured |z| <= 2.6 over seeds 0-2; flipping the whole weight (centre 0 instead of loc) gives
    |z| = 22-119, so the test separates a wrong centre."""
    M = 200
    ws = make()
    x, y = task(BATCH)
    svi = SVI(ws.model, ws.guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(60):
        svi.step(x, y)
    with torch.no_grad():
        for rho in ws.posterior.rho.values():
            rho.fill_(math.log(math.expm1(0.2)))
    fo = make(estimator="flipout")
    fo.load_state_dict(ws.state_dict())
    elbo = TraceMeanField_ELBO()
    with torch.no_grad():
        a = torch.tensor([elbo.loss(ws.model, ws.guide, x, y) for _ in range(M)], dtype=torch.float64)
        b = torch.tensor([elbo.loss(fo.model, fo.guide, x, y) for _ in range(M)], dtype=torch.float64)
    z = (a.mean() - b.mean()) / math.sqrt((a.var() + b.var()) / M)
    assert abs(z) < 4.0


def test_predictions_keep_weight_space_draws_and_config_round_trips(tmp_path):
    fo = _lm(estimator="flipout")
    ws = _lm()
    ws.load_state_dict(fo.state_dict())
    x = torch.randint(0, 5, (BATCH, 6))
    pyro.set_rng_seed(5)
    expected = ws.get_logits(x, 3)
    pyro.set_rng_seed(5)
    torch.testing.assert_close(fo.get_logits(x, 3), expected)
    save(tmp_path / "lm.pt", fo)
    loaded = load(tmp_path / "lm.pt")
    assert loaded.estimator == "flipout" and loaded.config == fo.config
    with pytest.raises(ValueError, match="estimator"):
        _lm(estimator="local_reparameterization")


def test_flipout_signs_are_uniform_plus_minus_one():
    """Each sign is +-1 with probability 1/2: the mean of n entries is within 5/sqrt(n) of 0, and the
    shapes are B x in, B x out per weight matrix (biases skipped)."""
    lstm = nn.LSTM(D, H, 2)
    n_batch = 5000
    signs = flipout_signs(n_batch, _flat(lstm), bias=True)
    assert [(tuple(a.shape), tuple(b.shape)) for a, b in signs] == [
        ((n_batch, D), (n_batch, 4 * H)), ((n_batch, H), (n_batch, 4 * H)),
        ((n_batch, H), (n_batch, 4 * H)), ((n_batch, H), (n_batch, 4 * H))]
    for s in (t for pair in signs for t in pair):
        assert set(s.unique().tolist()) == {-1.0, 1.0}
        assert abs(s.mean().item()) < 5 / math.sqrt(s.numel())


def test_flipout_model_perturbs_around_loc_by_the_guides_draw(monkeypatch):
    """estimator="flipout": with every sign +1, sequence b's weights are loc + (w - loc) = w, the guide's
    own draw, so the guide's features are nn.LSTM's with the traced weights (a perturbation loc - w,
    same in distribution, would give loc - (w - loc))."""
    import torch.nn.functional as F
    from pyro import poutine

    import bnnpyro.nn.lstm as lstm_module

    monkeypatch.setattr(lstm_module, "flipout_signs",
                        lambda b, weights, bias: [(torch.ones(b, w.shape[1]), torch.ones(b, w.shape[0]))
                                                  for i, w in enumerate(weights) if i % (4 if bias else 2) < 2])
    m = BayesianLSTMClassifier(num_classes=3, hidden_size=H, dataset_size=20, vocab_size=7, embedding_dim=D,
                               init_scale=0.3, estimator="flipout")
    x = torch.randint(0, 7, (B, T))
    tr = poutine.trace(m.guide).get_trace(x)
    weights = {n: s["value"] for n, s in tr.nodes.items() if n.startswith(("lstm.", "embedding."))}
    expected = m.encoder.lstm.to_lstm(weights)(F.embedding(x, weights["embedding.weight"]))[0][:, -1]
    torch.testing.assert_close(tr.nodes["logits"]["fn"].X[:, :-1], expected, rtol=1e-5, atol=1e-6)


def test_signs_of_the_wrong_batch_or_width_are_refused():
    """Signs drawn for one sequence broadcast over the batch would give every sequence one
    perturbation (no longer flipout): refused by index and shape, as are the wrong widths and input."""
    template = nn.LSTM(D, H)
    means = _flat(template)
    deltas = [torch.zeros_like(w) for w in means]
    kwargs = dict(num_layers=1, bias=True, batch_first=False, bidirectional=False)
    x = torch.randn(T, B, D)
    with pytest.raises(ValueError, match=rf"signs\[0\] must be B x in and B x out = \({B}, {D}\) and \({B}, {4 * H}\)"):
        lstm_flipout_forward(x, None, means, deltas, flipout_signs(1, means, bias=True), **kwargs)
    with pytest.raises(RuntimeError, match=f"Expected {D}, got {D + 1}"):
        lstm_flipout_forward(torch.randn(T, B, D + 1), None, means, deltas, **kwargs)
