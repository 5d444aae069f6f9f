"""
to_bayesian on a small CNN and an MLP trained deterministically on scikit-learn's digits, and on
an Embedding-LSTM tagger: training with AutoNormal, the mean network, exclude, priors, errors.
"""

import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from torch import nn

from bnnpyro.data import load_classification
from bnnpyro.distributions.priors import NormalPrior, Prior, ScaleMixtureNormal
from bnnpyro.infer import AnalyticAutoNormal
from bnnpyro.nn import (BayesianEmbedding, BayesianLinear, BayesianLSTM, Flipout, LocalReparameterization,
                        WeightSpace, estimator_for, pretrained_values, to_bayesian)


def _cnn(batch_norm: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(1, 8, 3, padding=1)] + ([nn.BatchNorm2d(8)] if batch_norm else [])
    return nn.Sequential(*layers, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits():
    data = load_classification("digits")
    return data.x_train, data.y_train, data.x_test, data.y_test


def _inputs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1, 8, 8) if isinstance(net[0], nn.Conv2d) else x


@pytest.fixture(scope="module")
def trained(digits):
    """The CNN (with a BatchNorm, in eval mode) and the MLP after 50 full-batch Adam steps
    (test accuracy about 0.94 each)."""
    x, y, _, _ = digits
    torch.manual_seed(0)
    nets = {"cnn": _cnn(batch_norm=True), "mlp": _mlp()}
    for net in nets.values():
        optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
        for _ in range(50):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(_inputs(net, x)), y).backward()
            optimizer.step()
        net.eval()
    return nets


def _classifier(bnn: nn.Module, dataset_size: int):
    def model(x, y=None):
        logits = bnn(x)
        with pyro.plate("data", dataset_size, subsample=torch.arange(x.shape[0])):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits
    return model


def _sites(model, *args) -> dict:
    trace = poutine.trace(model).get_trace(*args)
    return {name: site for name, site in trace.nodes.items() if site["type"] in ("sample", "param")}


def _sample_sites(model, *args) -> set:
    return {n for n, s in _sites(model, *args).items() if s["type"] == "sample" and not s["is_observed"]}


@pytest.mark.parametrize("name, estimator", [("cnn", None), ("cnn", "local_reparameterization"),
                                             ("mlp", "flipout")])
def test_converted_models_train_with_autonormal(trained, digits, name, estimator):
    """From AutoNormal's default start (locs 0): 120 steps of 128 points. Over seeds 0-2 the last
    10 losses summed to 0.18-0.32 of the first 10, test accuracies were 0.80-0.93; chance is 0.1."""
    x, y, x_test, y_test = digits
    net = trained[name]
    bnn = to_bayesian(net, estimator=estimator)
    model = _classifier(bnn, len(x))
    guide = AutoNormal(model, init_scale=0.01)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), TraceMeanField_ELBO())
    x = _inputs(net, x)
    losses = []
    for _ in range(120):
        idx = torch.randint(0, len(x), (128,))
        with estimator_for(bnn):
            losses.append(svi.step(x[idx], y[idx]))
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    x_test = _inputs(net, x_test)
    with torch.no_grad():
        probs = torch.stack([poutine.replay(model, poutine.trace(guide).get_trace(x_test))(x_test).softmax(-1)
                             for _ in range(8)]).mean(0)
    assert (probs.argmax(-1) == y_test).float().mean() > 0.75


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_mean_network_equals_the_original(trained, digits, name):
    """A guide started at pretrained_values: conditioning on its medians (the posterior means)
    reproduces the trained network exactly (BatchNorm parameters and statistics carried over)."""
    net = trained[name]
    x = _inputs(net, digits[2])
    bnn = to_bayesian(net)
    guide = AutoNormal(bnn, init_loc_fn=init_to_value(values=pretrained_values(bnn)))
    guide(x)
    with torch.no_grad():
        assert (poutine.condition(bnn, data=guide.median())(x) - net(x)).abs().max() <= 1e-6
    assert set(pretrained_values(bnn)) == _sample_sites(bnn, x)


def test_input_module_is_untouched(trained):
    net = trained["cnn"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bnn = to_bayesian(net, prior="pretrained")
    with torch.no_grad():
        pretrained_values(bnn)["0.weight"].add_(1.0)  # a copy
        getattr(bnn, "1").weight.add_(1.0)  # the converted BatchNorm is a copy too
    assert type(net) is nn.Sequential and type(net[0]) is nn.Conv2d
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(pretrained_values(bnn)["0.weight"], net[0].weight)


def test_layers_become_bayesian_modules(trained):
    bnn = to_bayesian(trained["mlp"])
    assert isinstance(bnn[0], BayesianLinear) and bnn[0].bayesian_parameters == ("weight", "bias")
    x = torch.randn(4, 64)
    assert bnn(x).shape == (4, 10)
    stacked = {k: v.expand(3, *v.shape) for k, v in pretrained_values(bnn).items()}  # S stacked draws
    assert torch.allclose(poutine.condition(bnn, data=stacked)(x), trained["mlp"](x).expand(3, 4, 10), atol=1e-6)


@pytest.mark.parametrize("exclude, sampled", [
    ("0", {"5.weight", "5.bias"}),
    (["5.bias"], {"0.weight", "0.bias", "5.weight"}),
    ("*.bias", {"0.weight", "5.weight"}),
    (["0", "5"], set()),
])
def test_exclude_keeps_parameters_deterministic(trained, exclude, sampled):
    """Excluded parameters (and BatchNorm's, never converted) are Pyro params with the trained
    values, not sample sites; the mean network is still the original."""
    net = trained["cnn"]
    x = torch.randn(3, 1, 8, 8)
    bnn = to_bayesian(net, exclude=exclude)
    sites = _sites(bnn, x)
    assert _sample_sites(bnn, x) == sampled
    params = dict(net.named_parameters())
    for name in set(params) - sampled:  # in the param store under the converted model's own prefix
        site = sites[f"{bnn._param_prefix}.{name}"]
        assert site["type"] == "param" and torch.equal(site["value"], params[name])
    with torch.no_grad():
        assert (poutine.condition(bnn, data=pretrained_values(bnn))(x) - net(x)).abs().max() <= 1e-6


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.lstm(self.emb(tokens))[0])


def test_embedding_and_lstm_convert_and_train():
    torch.manual_seed(0)
    net = Tagger().eval()
    bnn = to_bayesian(net)
    assert isinstance(bnn.emb, BayesianEmbedding) and isinstance(bnn.lstm, BayesianLSTM)
    tokens, tags = torch.randint(0, 20, (5, 7)), torch.randint(0, 3, (5, 7))
    tokens[:, -1] = 0  # padding
    assert _sample_sites(bnn, tokens) == {"emb.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0",
                                          "lstm.bias_hh_l0", "head.weight", "head.bias"}
    with torch.no_grad():
        assert (poutine.condition(bnn, data=pretrained_values(bnn))(tokens) - net(tokens)).abs().max() <= 1e-6

    def model(tokens, tags=None):
        logits = bnn(tokens)
        with pyro.plate("seqs", tokens.shape[0], dim=-2), pyro.plate("steps", tokens.shape[1], dim=-1):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=tags)

    guide = AutoNormal(model, init_loc_fn=init_to_value(values=pretrained_values(bnn)), init_scale=0.01)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(tokens, tags) for _ in range(60)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])  # 5 x 7 random tags memorised: 0.19-0.20 over seeds 0-2


def _prior_of(site):
    fn = site["fn"]
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def test_fan_in_prior_scales(trained):
    """N(0, 1/fan_in), fan_in = weight.shape[1:].numel(), biases taking their weight's."""
    bnn = to_bayesian(trained["cnn"])
    sites = _sites(bnn, torch.randn(2, 1, 8, 8))
    for name, fan_in in [("0.weight", 9), ("0.bias", 9), ("5.weight", 128), ("5.bias", 128)]:
        prior = _prior_of(sites[name])
        assert torch.allclose(prior.scale, torch.tensor(1 / math.sqrt(fan_in))) and (prior.loc == 0).all()
    sites = _sites(to_bayesian(Tagger()), torch.randint(0, 20, (2, 3)))
    for name, fan_in in [("emb.weight", 6), ("lstm.weight_ih_l0", 6), ("lstm.bias_ih_l0", 6),
                         ("lstm.weight_hh_l0", 8), ("lstm.bias_hh_l0", 8), ("head.weight", 8)]:
        assert torch.allclose(_prior_of(sites[name]).scale, torch.tensor(1 / math.sqrt(fan_in)))


def test_prior_instances_and_callables(trained):
    net = trained["mlp"]
    x = torch.randn(2, 64)
    sites = _sites(to_bayesian(net, prior=Prior("normal", 0.5, 2.0)), x)
    assert torch.allclose(_prior_of(sites["2.weight"]).loc, torch.tensor(0.5))
    assert isinstance(_prior_of(_sites(to_bayesian(net, prior=Prior("scale_mixture")), x)["0.bias"]),
                      ScaleMixtureNormal)
    per_element = torch.rand(10, 32) + 0.1

    def prior(name, param):  # per-parameter scales on the head, a per-layer Prior elsewhere
        return NormalPrior(param.shape, 0.0, per_element) if name == "2.weight" else Prior(scale=0.3)

    sites = _sites(to_bayesian(net, prior=prior), x)
    assert torch.equal(_prior_of(sites["2.weight"]).scale, per_element)
    assert torch.allclose(_prior_of(sites["0.weight"]).scale, torch.tensor(0.3))


@pytest.mark.parametrize("guide_cls, elbo", [(AnalyticAutoNormal, TraceMeanField_ELBO()), (AutoNormal, Trace_ELBO())])
def test_pretrained_prior_scale_is_learned(trained, digits, guide_cls, elbo):
    """Prior N(w_trained, s^2), s a positive PyroParam per parameter tensor: SVI moves it (through
    the analytic KL or log p(w)); the guide starts at the trained weights with scale 0.01, so the
    ELBO's optimum s is far below the initial 0.5: after 30 steps 0.11-0.13 over seeds 0-2."""
    x, y, _, _ = digits
    net = trained["mlp"]
    bnn = to_bayesian(net, prior="pretrained", pretrained_scale=0.5)
    model = _classifier(bnn, len(x))
    sites = _sites(model, x[:2], y[:2])
    assert torch.equal(_prior_of(sites["0.weight"]).loc, net[0].weight)
    assert torch.allclose(_prior_of(sites["0.weight"]).scale, torch.tensor(0.5))
    guide = guide_cls(model, init_loc_fn=init_to_value(values=pretrained_values(bnn)), init_scale=0.01)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(30):
        svi.step(x[:128], y[:128])
    for name in ("0.priors.weight.scale", "0.priors.bias.scale", "2.priors.weight.scale"):
        scale = pyro.param(f"{bnn._param_prefix}.{name}").item()
        assert 0 < scale < 0.3, name
    assert bnn[0].priors["weight"].scale.item() == pytest.approx(
        pyro.param(f"{bnn._param_prefix}.0.priors.weight.scale").item())


def test_pretrained_prior_scale_can_be_fixed(trained, digits):
    """``learn_prior_scale=False``: the prior scale is a buffer at ``pretrained_scale``, no Pyro
    param, unchanged by SVI."""
    x, y, _, _ = digits
    bnn = to_bayesian(trained["mlp"], prior="pretrained", pretrained_scale=0.5, learn_prior_scale=False)
    model = _classifier(bnn, len(x))
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=pretrained_values(bnn)), init_scale=0.01)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        svi.step(x[:128], y[:128])
    assert not [k for k in pyro.get_param_store().keys() if "priors" in k]
    assert torch.equal(bnn[0].priors["weight"].scale, torch.tensor(0.5))


def test_estimator_is_recorded_and_the_module_pickles(trained):
    assert isinstance(estimator_for(to_bayesian(trained["mlp"])), WeightSpace)
    bnn = to_bayesian(trained["cnn"], estimator="local_reparameterization")
    assert bnn.estimator == "local_reparameterization" and isinstance(estimator_for(bnn), LocalReparameterization)
    assert isinstance(estimator_for(to_bayesian(trained["mlp"], estimator="flipout")), Flipout)
    copy = pickle.loads(pickle.dumps(bnn))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(poutine.condition(copy, data=pretrained_values(bnn))(x), trained["cnn"](x))


def test_bare_layer_converts():
    layer = nn.Linear(3, 2)
    bnn = to_bayesian(layer, prior=Prior(scale=0.2))
    assert isinstance(bnn, BayesianLinear)
    assert _sample_sites(bnn, torch.randn(4, 3)) == {"weight", "bias"}
    x = torch.randn(3)  # an unbatched input, as nn.Linear takes
    assert torch.allclose(poutine.condition(bnn, data=pretrained_values(bnn))(x), layer(x))


@pytest.mark.parametrize("args, kwargs, error, match", [
    (("not a module",), {}, TypeError, "module must be a torch.nn.Module"),
    ((_mlp(),), {"estimator": "reparameterization"}, ValueError, "estimator must be"),
    ((_mlp(),), {"exclude": ["0", "head"]}, ValueError, r"\['head'\] match no module"),
    ((_mlp(),), {"prior": "xavier"}, ValueError, "prior must be"),
    ((_mlp(),), {"prior": "pretrained", "pretrained_scale": 0.0}, ValueError, "pretrained_scale"),
    ((_mlp(),), {"prior": lambda name, p: NormalPrior((3,), 0.0, 1.0)}, ValueError, "of shape"),
    ((nn.Embedding(5, 2, max_norm=1.0),), {}, ValueError, "max_norm"),
])
def test_bad_arguments_raise(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        to_bayesian(*args, **kwargs)


def test_a_shared_module_stays_shared():
    shared = nn.Linear(4, 4)
    bnn = to_bayesian(nn.Sequential(shared, nn.Tanh(), shared))
    assert bnn[0] is bnn[2] and isinstance(bnn[0], BayesianLinear)
    assert len(_sample_sites(bnn, torch.randn(3, 4))) == 2


def test_two_converted_models_in_one_process_train_their_own_parameters():
    """The deterministic (excluded) parameters of two conversions of one architecture are distinct
    Pyro params: training the second moves its own, not the first one's (whose names they would
    share in Pyro's global param store), and a pickled copy gets a name of its own."""
    x, y = torch.randn(64, 3), torch.randn(64)

    def converted():
        return to_bayesian(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)), exclude="0")

    def regression(net):
        def model(x, y=None):
            f = net(x).squeeze(-1)  # the weights drawn outside the data plate
            with pyro.plate("data", len(x)):
                pyro.sample("y", dist.Normal(f, 1.0), obs=y)
        return model

    a, b = converted(), converted()
    for net in (a, b):
        before_a, before_b = a[0].weight.detach().clone(), b[0].weight.detach().clone()
        model = regression(net)
        svi = SVI(model, AnalyticAutoNormal(model), pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
        for _ in range(20):
            svi.step(x, y)
        trained, other = (a, b) if net is a else (b, a)
        assert not torch.equal(trained[0].weight, before_a if net is a else before_b)
        assert torch.equal(other[0].weight, before_b if net is a else before_a)
    copy = pickle.loads(pickle.dumps(b))
    # a name of its own, one for all its modules (with b's it adopted b's parameters in the store)
    assert copy._param_prefix != b._param_prefix and copy[0]._param_prefix == copy._param_prefix
    assert type(copy[0]) is type(b[0])
    assert f"{copy._param_prefix}.0.weight" in poutine.trace(copy).get_trace(x).nodes
    assert "2.weight" in poutine.trace(copy).get_trace(x).nodes  # a sample site, plain name


@pytest.mark.parametrize("prior", ["fan_in", "pretrained", Prior(scale=0.5), Prior("scale_mixture"),
                                   lambda name, p: NormalPrior(p.shape, 0.0, 0.3)])
def test_a_float64_module_draws_float64_weights(prior):
    """The priors take each parameter's dtype: a float64 network's converted layers drew float32
    weights from a Prior or the fan_in rule (built in the default dtype), and then failed on its
    float64 inputs (or computed in float32 on float32 ones)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Conv1d(1, 2, 3)).double()

    def forward(x):
        return net_b[2](net_b[1](net_b[0](x)).unsqueeze(-2))

    net_b = to_bayesian(net, prior=prior)
    sites = _sites(forward, torch.randn(5, 3, dtype=torch.float64))
    values = {name: site["value"] for name, site in sites.items() if site["type"] == "sample"}
    assert set(values) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(v.dtype == torch.float64 for v in values.values())
    assert all(p.dtype == torch.float64 for p in net_b.buffers() if p.is_floating_point())


def test_normal_prior_with_integer_tensors_is_floating_point():
    """An integer loc or scale tensor (torch.tensor(0)) is a number, as a Python int is: the prior is
    in the default float dtype (it kept int64: a scale of 0, a ZeroDivisionError in log_prob)."""
    p = NormalPrior((2, 3), loc=torch.tensor(0), scale=0.5)
    q = NormalPrior((2, 3), loc=torch.zeros((), dtype=torch.float64), scale=torch.tensor(2))
    assert p.loc.dtype == p.scale.dtype == torch.float32 and q.loc.dtype == q.scale.dtype == torch.float64
    w = torch.randn(2, 3)
    torch.testing.assert_close(p().log_prob(w), torch.distributions.Normal(0.0, 0.5).log_prob(w).sum())
    assert q.scale.eq(2).all()


@pytest.mark.parametrize("exclude", ["a", "b", "b.weight"])
def test_exclude_matches_any_path_of_a_shared_module(exclude):
    """One nn.Linear at paths a and b is one layer (one set of sites): excluded by a pattern on
    either path (only the first path used to count: exclude="b" did nothing)."""
    lin = nn.Linear(2, 2)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = lin, lin

        def forward(self, x):
            return self.b(self.a(x))

    tr = poutine.trace(to_bayesian(Shared(), exclude=exclude)).get_trace(torch.randn(3, 2))
    sites = [site["name"].rsplit(".", 1)[-1] for site in tr.nodes.values() if site["type"] == "sample"]
    assert sites == (["bias"] if exclude == "b.weight" else [])


def test_exclude_covers_a_shared_module_inside_an_excluded_one():
    """The same nn.Linear at a.0 and b, exclude="a": it is inside the excluded a, so it stays
    deterministic at b too (it was converted when reached at b first)."""
    lin = nn.Linear(2, 2)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.b, self.a = lin, nn.Sequential(lin)

        def forward(self, x):
            return self.a(self.b(x))

    tr = poutine.trace(to_bayesian(Shared(), exclude="a")).get_trace(torch.randn(3, 2))
    assert not [name for name, site in tr.nodes.items() if site["type"] == "sample"]


def test_a_converted_lstm_keeps_the_modules_eval_mode():
    """BayesianLSTM.from_lstm builds a new module, which started in training mode: converted from a
    model in eval mode, its inter-layer dropout stayed on, and the mean network differed from the
    original (0.036) and between calls."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.LSTM(3, 4, num_layers=2, dropout=0.5)).eval()
    bnn = to_bayesian(net)
    assert not bnn[0].training
    x = torch.randn(5, 2, 3)
    mean_net = poutine.condition(bnn, data=pretrained_values(bnn))
    with torch.no_grad():
        expected = net(x)[0]
        for _ in range(2):
            torch.testing.assert_close(mean_net(x)[0], expected)


def test_excluded_tied_parameters_stay_tied():
    """A weight tied between two modules, excluded by parameter name: the excluded parameter is the
    original (it had been a fresh copy per module: two independent point estimates)."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(6, 4), nn.Linear(4, 6, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.emb(x))

    for exclude in (["emb.weight", "out.weight"], ["*weight"], ["emb", "out.weight"]):
        bnn = to_bayesian(Tied(), exclude=exclude)
        assert bnn.emb.weight is bnn.out.weight, exclude
        assert [n for n, _ in bnn.named_parameters()] == ["emb.weight"]


def test_a_subclass_keeps_its_own_parameters_deterministic():
    """Of an nn.Linear subclass converted in place, only weight and bias become sample sites (its
    own parameters had too, and the fan_in prior failed on them calling them a bias)."""
    class GainLinear(nn.Linear):
        def __init__(self, *args):
            super().__init__(*args)
            self.gain = nn.Parameter(torch.ones(self.out_features))

        def forward(self, x):
            return super().forward(x) * self.gain

    for prior in ("fan_in", "pretrained"):
        bnn = to_bayesian(nn.Sequential(GainLinear(3, 2)), prior=prior)
        trace = poutine.trace(bnn).get_trace(torch.randn(4, 3))
        sites = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
        assert sites == ["0.weight", "0.bias"] and "0.gain" in dict(bnn.named_parameters())


def test_a_module_attribute_named_estimator_is_refused_not_replaced():
    """to_bayesian records the estimator as ``bnn.estimator``: setting it had deleted a submodule of
    that name (None) or failed with torch's message (a string)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.estimator = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.estimator(self.body(x))

    with pytest.raises(ValueError, match="has an attribute 'estimator'.*rename it"):
        to_bayesian(Net())


def test_a_reassigned_prior_is_used():
    """``.prior`` is a public attribute (repr shows it): the layers' cached prior tensors or
    distributions follow a new one (they had been keyed by device and dtype only)."""
    torch.manual_seed(0)
    for layer, x in ((BayesianLSTM(3, 4), torch.randn(5, 2, 3)), (BayesianEmbedding(50, 40), torch.arange(50)),
                     (BayesianLinear(30, 40), torch.randn(2, 30))):
        layer(x)  # builds the cache under the default N(0, 1)
        layer.prior = Prior(scale=100.0)
        draws = [site["value"] for site in poutine.trace(layer).get_trace(x).nodes.values() if site["type"] == "sample"]
        assert 50 < torch.cat([d.reshape(-1) for d in draws]).std() < 200, type(layer).__name__


def test_to_lstm_takes_excluded_parameters_from_the_module():
    """A converted LSTM whose biases were excluded: to_lstm(pretrained_values(...)) builds the nn.LSTM
    from the sites and the module's own biases (it had raised KeyError for them)."""
    net = nn.Sequential(nn.LSTM(3, 4))
    bnn = to_bayesian(net, exclude="0.bias_*")
    lstm = bnn[0].to_lstm(pretrained_values(bnn))
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(lstm(x)[0], net(x)[0])


def test_embedding_options_are_kept_or_refused():
    """scale_grad_by_freq is kept (it had been dropped: a 3-times-used row got 3x the gradient);
    sparse is refused like max_norm."""
    net = nn.Embedding(6, 3, scale_grad_by_freq=True)
    bnn = to_bayesian(net)
    x = torch.tensor([5, 5, 5, 1])
    weight = net.weight.detach().clone().requires_grad_(True)
    poutine.condition(bnn, data={"weight": weight})(x).sum().backward()
    net(x).sum().backward()
    torch.testing.assert_close(weight.grad, net.weight.grad)
    with pytest.raises(ValueError, match="sparse=True"):
        to_bayesian(nn.Embedding(6, 3, sparse=True))
