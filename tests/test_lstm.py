"""BayesianLSTM / lstm_forward / BayesianEmbedding: equality with torch, one weight draw per call, KL, training."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_sample
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import kl_divergence
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bnnpyro.distributions.priors import Prior, ScaleMixtureNormal
from bnnpyro.nn.embedding import BayesianEmbedding
from bnnpyro.nn.lstm import BayesianLSTM, lstm_forward

D, H, T, B = 3, 4, 5, 3


@pytest.fixture(autouse=True)
def _seed():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _sample_sites(trace) -> dict[str, torch.Tensor]:
    return {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "sample"}


def _fixed(bayes: BayesianLSTM, lstm: nn.LSTM):
    """``bayes`` with every weight site conditioned on ``lstm``'s weights."""
    return poutine.condition(bayes, data=_weights(lstm))


def _assert_same(actual, expected) -> None:
    (out, (h, c)), (out_e, (h_e, c_e)) = actual, expected
    if isinstance(out, nn.utils.rnn.PackedSequence):
        assert torch.equal(out.batch_sizes, out_e.batch_sizes)
        assert torch.equal(out.unsorted_indices, out_e.unsorted_indices)
        out, out_e = out.data, out_e.data
    for a, e in ((out, out_e), (h, h_e), (c, c_e)):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_equals_nn_lstm(num_layers, batch_first, bidirectional, with_hx):
    lstm = nn.LSTM(D, H, num_layers, batch_first=batch_first, bidirectional=bidirectional)
    bayes = BayesianLSTM.from_lstm(lstm)
    x = torch.randn(B, T, D) if batch_first else torch.randn(T, B, D)
    dirs = 2 if bidirectional else 1
    hx = (torch.randn(num_layers * dirs, B, H), torch.randn(num_layers * dirs, B, H)) if with_hx else None
    _assert_same(_fixed(bayes, lstm)(x, hx), lstm(x, hx))


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed_unsorted_equals_nn_lstm(bidirectional, with_hx):
    lstm = nn.LSTM(D, H, 2, bidirectional=bidirectional)
    bayes = BayesianLSTM.from_lstm(lstm)
    lengths = torch.tensor([3, 5, 1, 4])
    x = pack_padded_sequence(torch.randn(T, 4, D), lengths, enforce_sorted=False)
    dirs = 2 if bidirectional else 1
    hx = (torch.randn(2 * dirs, 4, H), torch.randn(2 * dirs, 4, H)) if with_hx else None
    actual, expected = _fixed(bayes, lstm)(x, hx), lstm(x, hx)
    _assert_same(actual, expected)
    _, out_lengths = pad_packed_sequence(actual[0])
    assert torch.equal(out_lengths, lengths)


@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched_equals_nn_lstm(with_hx):
    lstm = nn.LSTM(D, H, 2)
    bayes = BayesianLSTM.from_lstm(lstm)
    hx = (torch.randn(2, H), torch.randn(2, H)) if with_hx else None
    x = torch.randn(T, D)
    actual, expected = _fixed(bayes, lstm)(x, hx), lstm(x, hx)
    assert actual[0].shape == (T, H) and actual[1][0].shape == (2, H)
    _assert_same(actual, expected)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_projection_and_no_bias_equal_nn_lstm():
    lstm = nn.LSTM(D, H, 2, bias=False, proj_size=2)
    bayes = BayesianLSTM.from_lstm(lstm)
    assert set(bayes.weight_shapes) == set(_weights(lstm))
    x = torch.randn(T, B, D)
    _assert_same(_fixed(bayes, lstm)(x), lstm(x))


def test_dropout_between_layers_follows_training_flag():
    lstm = nn.LSTM(D, H, 2, dropout=0.5)
    bayes = BayesianLSTM.from_lstm(lstm)
    x = torch.randn(T, B, D)
    torch.manual_seed(1)
    actual = _fixed(bayes, lstm)(x)
    torch.manual_seed(1)
    _assert_same(actual, lstm(x))
    bayes.eval(), lstm.eval()
    _assert_same(_fixed(bayes, lstm)(x), lstm(x))


def test_lstm_forward_is_functional_nn_lstm():
    lstm = nn.LSTM(D, H, 2, batch_first=True, bidirectional=True)
    x = torch.randn(B, T, D)
    actual = lstm_forward(x, None, list(lstm.parameters()), num_layers=2, bias=True, batch_first=True,
                          dropout=0.0, training=True, bidirectional=True)
    _assert_same(actual, lstm(x))
    with pytest.raises(ValueError, match="weight tensors"):
        lstm_forward(x, None, list(lstm.parameters())[:-1], num_layers=2, bias=True, batch_first=True,
                     dropout=0.0, training=True, bidirectional=True)


@pytest.mark.parametrize("S", [4, 6])
def test_lstm_forward_rejects_stacked_weight_draws(S):
    """Weights with a leading sample dim (as under a plate of posterior samples) are not one draw:
    they raise instead of running the kernel on them (which returned a width-1 output)."""
    lstm = nn.LSTM(D, 8, batch_first=True)
    stacked = [p.expand(S, 1, *p.shape) for p in lstm.parameters()]
    with pytest.raises(RuntimeError, match=r"flat_weights\[1\] must be 2-D, got shape \(%d, 1, 32, 8\)" % S):
        lstm_forward(torch.randn(B, T, D), None, stacked, num_layers=1, bias=True, batch_first=True,
                     dropout=0.0, training=False, bidirectional=False)
    weights = list(lstm.parameters())
    weights[2] = weights[2][None]
    with pytest.raises(RuntimeError, match=r"flat_weights\[2\] must be 1-D"):
        lstm_forward(torch.randn(B, T, D), None, weights, num_layers=1, bias=True, batch_first=True,
                     dropout=0.0, training=False, bidirectional=False)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_one_draw_per_call_shared_across_time(bidirectional):
    lstm = nn.LSTM(D, H, 2, bidirectional=bidirectional)
    bayes = BayesianLSTM.from_lstm(lstm, prior=Prior(scale=0.5))
    x = torch.randn(T, B, D)
    trace = poutine.trace(bayes).get_trace(x)
    sites = _sample_sites(trace)
    # exactly one site per nn.LSTM parameter, with its shape: no time (or batch) dimension
    assert {n: v.shape for n, v in sites.items()} == {n: p.shape for n, p in lstm.named_parameters()}
    # the output is nn.LSTM's with the traced weights: every step used the same draw
    _assert_same(trace.nodes["_RETURN"]["value"], bayes.to_lstm(sites)(x))
    # a second call redraws every weight
    again = _sample_sites(poutine.trace(bayes).get_trace(x))
    assert all(not torch.equal(sites[n], again[n]) for n in sites)


def test_priors_are_built_once_and_follow_dtype():
    bayes = BayesianLSTM(D, H, prior=Prior(kind="scale_mixture"))
    first = poutine.trace(bayes).get_trace(torch.randn(T, B, D)).nodes["weight_ih_l0"]["fn"]
    second = poutine.trace(bayes).get_trace(torch.randn(T, B, D)).nodes["weight_ih_l0"]["fn"]
    assert first is second and first.base_dist.pi.dtype == torch.float32
    bayes.double()
    trace = poutine.trace(bayes).get_trace(torch.randn(T, B, D, dtype=torch.float64))
    assert trace.nodes["weight_ih_l0"]["value"].dtype == torch.float64
    assert trace.nodes["_RETURN"]["value"][0].dtype == torch.float64


@pytest.mark.parametrize("kind", ["normal", "scale_mixture"])
def test_a_prior_called_without_a_dtype_follows_the_default_dtype(kind):
    """``Prior(...)(shape)`` builds its tensors in torch's default dtype, as ``torch.tensor`` of a
    float and Pyro's ``Normal(0., 1.)`` do (it had been float32 always); a dtype given wins."""
    old = torch.get_default_dtype()
    try:
        for default in (torch.float32, torch.float64):
            torch.set_default_dtype(default)
            assert Prior(kind)((2, 3)).sample().dtype == default
        assert Prior(kind)((2, 3), dtype=torch.float32).sample().dtype == torch.float32
    finally:
        torch.set_default_dtype(old)


def test_to_lstm_accepts_prefixed_site_names():
    class Wrapper(PyroModule):
        def __init__(self):
            super().__init__()
            self.rnn = BayesianLSTM(D, H)

        def forward(self, x):
            return self.rnn(x)[0]

    model = Wrapper()
    x = torch.randn(T, B, D)
    trace = poutine.trace(model).get_trace(x)
    sites = _sample_sites(trace)
    assert set(sites) == {f"rnn.{n}" for n in model.rnn.weight_shapes}
    torch.testing.assert_close(model.rnn.to_lstm(sites)(x)[0], trace.nodes["_RETURN"]["value"])


def _guide_loc_scale(guide: AutoNormal, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return getattr(guide.locs, name).detach(), getattr(guide.scales, name).detach()


def _mc_kl(bayes: BayesianLSTM, guide: AutoNormal, log_prior, draws: int = 20000) -> tuple[float, float]:
    """Mean and standard deviation over ``draws`` of ``sum_w log q(w) - log p(w)``, ``w ~ q``, from the
    guide's loc/scale (the per-draw quantity whose mean is ``KL(q || p)``)."""
    per_draw = 0.0
    for name in bayes.weight_shapes:
        q = dist.Normal(*_guide_loc_scale(guide, name))
        w = q.sample((draws,))
        per_draw = per_draw + (q.log_prob(w) - log_prior(w)).flatten(1).sum(-1)
    return per_draw.mean().item(), per_draw.std().item()


def test_kl_normal_prior_is_analytic_against_a_normal_guide_site():
    prior_scale = 0.5
    bayes = BayesianLSTM(D, H, 2, bidirectional=True, prior=Prior(scale=prior_scale))
    x = torch.randn(T, B, D)
    locs = {n: 0.3 * torch.randn(s) for n, s in bayes.weight_shapes.items()}
    scales = {n: torch.empty(s).uniform_(0.05, 0.6) for n, s in bayes.weight_shapes.items()}

    def mean_field_guide(x):
        for n, s in bayes.weight_shapes.items():
            pyro.sample(n, dist.Normal(locs[n], scales[n]).to_event(len(s)))

    loss = TraceMeanField_ELBO().loss(bayes, mean_field_guide, x)  # no likelihood: loss = KL(q || p)
    expected = sum(
        kl_divergence(dist.Normal(locs[n], scales[n]), dist.Normal(0.0, prior_scale)).sum().item()
        for n in bayes.weight_shapes
    )
    assert loss == pytest.approx(expected, rel=1e-5)


def test_kl_normal_prior_with_autonormal_matches_analytic_in_mean():
    # pyro's AutoNormal samples an auxiliary Normal and puts a Delta at the site, so
    # TraceMeanField_ELBO cannot use the closed form: its KL is a Monte Carlo estimate
    prior_scale = 0.5
    bayes = BayesianLSTM(2, 2, prior=Prior(scale=prior_scale))
    x = torch.randn(T, B, 2)
    guide = AutoNormal(bayes, init_loc_fn=init_to_sample, init_scale=0.2)
    guide(x)
    num_particles = 400
    loss = TraceMeanField_ELBO(num_particles=num_particles).loss(bayes, guide, x)
    analytic = sum(
        kl_divergence(dist.Normal(*_guide_loc_scale(guide, n)), dist.Normal(0.0, prior_scale)).sum().item()
        for n in bayes.weight_shapes
    )
    _, sd = _mc_kl(bayes, guide, dist.Normal(0.0, prior_scale).log_prob)
    assert abs(loss - analytic) < 5 * sd / math.sqrt(num_particles), (loss, analytic)


def test_kl_scale_mixture_prior_monte_carlo():
    prior = Prior(kind="scale_mixture")
    bayes = BayesianLSTM(2, 2, prior=prior)
    x = torch.randn(T, B, 2)
    guide = AutoNormal(bayes, init_loc_fn=init_to_sample, init_scale=0.05)
    guide(x)
    num_particles, draws = 400, 20000
    loss = TraceMeanField_ELBO(num_particles=num_particles).loss(bayes, guide, x)
    mc, sd = _mc_kl(bayes, guide, ScaleMixtureNormal(prior.pi, prior.sigma1, prior.sigma2).log_prob, draws)
    # two means of draws of the same variable: 5 standard errors of their difference
    tolerance = 5 * sd * math.sqrt(1 / num_particles + 1 / draws)
    assert abs(loss - mc) < tolerance, (loss, mc, tolerance)


def test_autodiagonalnormal_trains_and_gives_mean_lstm():
    bayes = BayesianLSTM(D, H, batch_first=True)
    x, target = torch.randn(8, T, D), torch.randn(8, T, H)

    def model(x, target):
        out, _ = bayes(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(out, 0.1).to_event(2), obs=target)

    guide = AutoDiagonalNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    losses = [svi.step(x, target) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    mean_lstm = bayes.to_lstm(guide.median())
    assert isinstance(mean_lstm, nn.LSTM) and mean_lstm(x)[0].shape == (8, T, H)


class _SumSignClassifier(PyroModule):
    """Bayesian LSTM (1 -> 8) + deterministic linear head on the last hidden state."""

    def __init__(self):
        super().__init__()
        self.lstm = BayesianLSTM(1, 8, batch_first=True)
        self.head = PyroModule[nn.Linear](8, 1)

    def forward(self, x, y=None):
        _, (h_n, _) = self.lstm(x)
        logits = self.head(h_n[-1]).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)
        return logits


def test_svi_learns_sign_of_sequence_sum():
    def data(n):
        x = torch.randn(n, 10, 1)
        return x, (x.sum((1, 2)) > 0).float()

    (x, y), (x_test, y_test) = data(512), data(512)
    net = _SumSignClassifier()
    guide = AutoNormal(net, init_scale=0.01)
    svi = SVI(net, guide, pyro.optim.Adam({"lr": 0.03}), TraceMeanField_ELBO())
    for _ in range(300):
        svi.step(x, y)
    logits = poutine.condition(net, data=guide.median())(x_test)
    accuracy = ((logits > 0).float() == y_test).float().mean().item()
    assert accuracy > 0.8  # chance is 0.5; about 0.9 with this seed


def test_embedding_lookup_uses_one_draw():
    emb = BayesianEmbedding(7, 3, prior=Prior(scale=0.5))
    idx = torch.tensor([[0, 3, 3], [6, 0, 2]])
    trace = poutine.trace(emb).get_trace(idx)
    sites = _sample_sites(trace)
    assert list(sites) == ["weight"] and sites["weight"].shape == (7, 3)
    out = trace.nodes["_RETURN"]["value"]
    torch.testing.assert_close(out, F.embedding(idx, sites["weight"]))
    assert torch.equal(out[0, 1], out[0, 2]) and torch.equal(out[0, 0], out[1, 1])  # one draw shared
    assert not torch.equal(poutine.trace(emb).get_trace(idx).nodes["weight"]["value"], sites["weight"])


def test_embedding_under_an_outer_plate_says_what_to_do():
    """A stack of table draws (an outer plate of samples) is refused with the way out, not F.embedding's
    bare "'weight' must be 2-D"."""
    emb = BayesianEmbedding(7, 3)
    with pytest.raises(RuntimeError, match=r"one draw of its table \(V x E\), got a weight of shape \(4, 1, 7, 3\)"):
        with pyro.plate("samples", 4, dim=-2):
            emb(torch.tensor([[0, 3]]))


def test_embedding_padding_idx_gives_zeros():
    emb = BayesianEmbedding(5, 2, padding_idx=-1)
    assert emb.padding_idx == 4
    idx = torch.tensor([4, 1, 4])
    trace = poutine.trace(emb).get_trace(idx)
    out, weight = trace.nodes["_RETURN"]["value"], trace.nodes["weight"]["value"]
    expected = F.embedding(idx, weight.index_fill(0, torch.tensor([4]), 0.0))
    torch.testing.assert_close(out, expected)


def test_embedding_trains_with_trace_elbo():
    emb = BayesianEmbedding(4, 2)
    idx, target = torch.arange(4), torch.tensor([[1.0, -1.0], [0.5, 0.5], [-1.0, 0.0], [0.0, 2.0]])

    def model():
        mean = emb(idx)  # outside the data plate: one table, not one per data point
        with pyro.plate("data", 4):
            pyro.sample("y", dist.Normal(mean, 0.1).to_event(1), obs=target)

    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(300):
        svi.step()
    # posterior mean ~ 0.99 * target, posterior sd ~ 0.1; SVI noise on top
    torch.testing.assert_close(guide.median()["weight"], target, atol=0.25, rtol=0.0)


@pytest.mark.parametrize("features", [D - 1, D + 4])
def test_input_features_and_dtype_are_checked_as_nn_lstm(features):
    """An input of the wrong width raises as nn.LSTM does (the fused CPU kernel ran on it, reading
    past a narrower input: NaN or varying outputs), for padded and packed input and BayesianLSTM;
    a float64 input to float32 weights names both dtypes; an hx of the wrong rank names the input's."""
    lstm = nn.LSTM(D, H, batch_first=True)
    kwargs = dict(num_layers=1, bias=True, batch_first=True, dropout=0.0, training=False, bidirectional=False)
    x = torch.randn(B, T, features)
    message = f"input.size\\(-1\\) must be equal to input_size. Expected {D}, got {features}"
    with pytest.raises(RuntimeError, match=message):
        lstm(x)  # the reference
    with pytest.raises(RuntimeError, match=message):
        lstm_forward(x, None, list(lstm.parameters()), **kwargs)
    packed = pack_padded_sequence(x, torch.full((B,), T), batch_first=True)
    with pytest.raises(RuntimeError, match=message):
        lstm_forward(packed, None, list(lstm.parameters()), **kwargs)
    with pytest.raises(RuntimeError, match=message):
        BayesianLSTM(D, H, batch_first=True)(x)
    with pytest.raises(ValueError, match="input dtype \\(torch.float64\\) does not match weight dtype \\(torch.float32\\)"):
        lstm_forward(torch.randn(B, T, D, dtype=torch.float64), None, list(lstm.parameters()), **kwargs)
    h0 = torch.zeros(B, H)
    with pytest.raises(RuntimeError, match="For batched 3-D input, hx and cx should also be 3-D"):
        lstm_forward(torch.randn(B, T, D), (h0, h0), list(lstm.parameters()), **kwargs)
