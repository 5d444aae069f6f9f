"""save/load: exact round trip, no interference between models, clear errors, resumable."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO

import bnnpyro
from bnnpyro import fit, sample_predictive
from bnnpyro.models import BayesianMLPClassifier, BayesianMLPRegressor


def _predict(m, x, seed=7):
    pyro.set_rng_seed(seed)
    return sample_predictive(m.model, m.guide, x, 20)["f"]


def test_round_trip_reproduces_predictions_exactly(tmp_path):
    x = torch.randn(40, 3)
    m = BayesianMLPRegressor(3, hidden=(8,), dataset_size=40, prior_scale="fan_in", noise="learned")
    fit(m.model, m.guide, (x, x.sum(-1)), epochs=20, seed=0, progress=False)
    bnnpyro.save(tmp_path / "m.pt", m)
    # weights_only-compatible content
    assert torch.load(tmp_path / "m.pt", weights_only=True)["model_class"] == "BayesianMLPRegressor"
    loaded = bnnpyro.load(tmp_path / "m.pt")
    assert loaded.config == m.config and loaded._pyro_name != m._pyro_name
    torch.testing.assert_close(_predict(loaded, x), _predict(m, x), rtol=0, atol=0)


def test_two_models_saved_and_loaded_do_not_interfere(tmp_path):
    xa, xb = torch.randn(30, 3), torch.randn(30, 5)
    a = BayesianMLPRegressor(3, hidden=(8,), dataset_size=30)
    b = BayesianMLPClassifier(5, 4, hidden=(6, 6), dataset_size=30)
    fit(a.model, a.guide, (xa, xa.sum(-1)), epochs=10, seed=0, progress=False)
    fit(b.model, b.guide, (xb, torch.randint(0, 4, (30,))), epochs=10, seed=0, progress=False)
    ref_a, ref_b = _predict(a, xa), _predict(b, xb)
    bnnpyro.save(tmp_path / "a.pt", a)
    bnnpyro.save(tmp_path / "b.pt", b)
    pyro.clear_param_store()
    la, lb = bnnpyro.load(tmp_path / "a.pt"), bnnpyro.load(tmp_path / "b.pt")
    # interleave their use: each keeps its own parameters
    pb = _predict(lb, xb)
    pa = _predict(la, xa)
    torch.testing.assert_close(pa, ref_a, rtol=0, atol=0)
    torch.testing.assert_close(pb, ref_b, rtol=0, atol=0)


def test_resume_training_from_checkpoint(tmp_path):
    x = torch.randn(50, 2)
    y = x @ torch.tensor([1.0, -1.0])
    m = BayesianMLPRegressor(2, hidden=(8,), dataset_size=50)
    fit(m.model, m.guide, (x, y), epochs=5, seed=0, progress=False)
    bnnpyro.save(tmp_path / "m.pt", m)
    loaded = bnnpyro.load(tmp_path / "m.pt")
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    svi = SVI(loaded.model, loaded.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    losses = [svi.step(x, y) for _ in range(200)]
    assert sum(losses[-20:]) < sum(losses[:20])
    assert any(not torch.equal(before[k], v) for k, v in loaded.state_dict().items())
    # the original model's parameters were not touched by training the loaded one
    assert all(torch.equal(m.state_dict()[k], v) for k, v in torch.load(tmp_path / "m.pt")["model_state"].items())


def test_corrupted_or_mismatched_files_raise(tmp_path):
    m = BayesianMLPRegressor(3, hidden=(8,), dataset_size=10)
    path = tmp_path / "m.pt"
    bnnpyro.save(path, m)
    raw = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable bnnpyro checkpoint"):
        bnnpyro.load(tmp_path / "trunc.pt")
    torch.save({"hello": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a bnnpyro checkpoint"):
        bnnpyro.load(tmp_path / "other.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["hidden"] = [9]  # parameters no longer match the configuration
    torch.save(payload, tmp_path / "mismatch.pt")
    n_params = len(pyro.get_param_store())
    with pytest.raises(ValueError, match="does not match its model configuration"):
        bnnpyro.load(tmp_path / "mismatch.pt")
    assert len(pyro.get_param_store()) == n_params  # nothing half-loaded into the param store
    with pytest.raises(FileNotFoundError):
        bnnpyro.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="callable non_linearity"):
        bnnpyro.save(path, BayesianMLPRegressor(3, dataset_size=10, non_linearity=torch.tanh))


@pytest.mark.parametrize("guide_name", ["AnalyticAutoNormal", "AutoLowRankMultivariateNormal"])
def test_autoguide_round_trip(tmp_path, guide_name):
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    from bnnpyro.infer import AnalyticAutoNormal
    from bnnpyro.nn import BayesianMLP

    cls = AnalyticAutoNormal if guide_name == "AnalyticAutoNormal" else AutoLowRankMultivariateNormal
    x = torch.randn(40, 3)
    net = BayesianMLP(3, 1, hidden=(6,), dataset_size=40, prior_scale="fan_in")
    guide = cls(net, init_scale=0.1)
    fit(net, guide, (x, x.sum(-1)), epochs=10, seed=0, progress=False)
    pyro.set_rng_seed(3)
    ref = sample_predictive(net, guide, x, 10)["f"]
    bnnpyro.save(tmp_path / "g.pt", net, guide)
    saved_sigma = net.sigma.item()
    # the original keeps training in the same process (its noise scale moves in Pyro's param store)
    fit(net, guide, (x, 3 * x.sum(-1)), epochs=10, seed=1, progress=False)
    assert net.sigma.item() != pytest.approx(saved_sigma)
    net2, guide2 = bnnpyro.load(tmp_path / "g.pt")
    assert type(guide2) is cls and net2.config == net.config
    pyro.set_rng_seed(3)
    torch.testing.assert_close(sample_predictive(net2, guide2, x, 10)["f"], ref, rtol=0, atol=0)
    # the loaded model's noise scale is the saved one, under a param-store name of its own
    assert net2.sigma.item() == pytest.approx(saved_sigma)
    poutine.trace(net2).get_trace(x, x.sum(-1))
    assert pyro.param(f"{net2._param_prefix}.sigma").item() == pytest.approx(saved_sigma)
    assert net.sigma.item() != pytest.approx(saved_sigma)


def _float64_models():
    from bnnpyro.models import BayesianCNNClassifier, BayesianLSTMClassifier, BayesianLSTMLanguageModel

    return [
        lambda: BayesianMLPRegressor(3, hidden=(8,), dataset_size=10),
        lambda: BayesianMLPClassifier(3, 4, hidden=(8,), dataset_size=10),
        lambda: BayesianCNNClassifier(num_classes=3, image_size=8, channels=(2, 2), hidden=(4,), dataset_size=10),
        lambda: BayesianLSTMClassifier(num_classes=3, hidden_size=4, input_size=2, dataset_size=10),
        lambda: BayesianLSTMLanguageModel(20, 4, 5, dataset_size=10),
    ]


@pytest.mark.parametrize("make", _float64_models())
def test_float64_models_round_trip_exactly(tmp_path, make):
    """A float64 model comes back float64 with every parameter bit for bit (it was loaded into a
    default-dtype model, float32, and silently rounded)."""
    m = make().to(torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1e-12 * torch.randn_like(p))  # below float32 resolution
    bnnpyro.save(tmp_path / "m.pt", m)
    loaded = bnnpyro.load(tmp_path / "m.pt")
    state = loaded.state_dict()
    for k, v in m.state_dict().items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


def test_float64_autoguide_round_trip_reproduces_predictions(tmp_path):
    from pyro.infer.autoguide import AutoNormal

    from bnnpyro.nn import BayesianMLP

    x = torch.randn(20, 3, dtype=torch.float64)
    net = BayesianMLP(3, 1, hidden=(6,), dataset_size=20, dtype=torch.float64)
    guide = AutoNormal(net)
    fit(net, guide, (x, x.sum(-1)), epochs=3, seed=0, progress=False)
    pyro.set_rng_seed(3)
    ref = sample_predictive(net, guide, x, 10)["f"]
    bnnpyro.save(tmp_path / "g.pt", net, guide)
    net2, guide2 = bnnpyro.load(tmp_path / "g.pt")
    pyro.set_rng_seed(3)
    f = sample_predictive(net2, guide2, x, 10)["f"]
    assert f.dtype == torch.float64
    torch.testing.assert_close(f, ref, rtol=0, atol=0)


def test_checkpoints_without_a_dtype_load_as_default_dtype_and_mixed_dtypes_refuse_to_save(tmp_path):
    m = BayesianMLPRegressor(3, hidden=(8,), dataset_size=10)
    bnnpyro.save(tmp_path / "m.pt", m)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["dtype"] == "float32"
    del payload["dtype"]  # as written before the dtype was recorded
    torch.save(payload, tmp_path / "old.pt")
    loaded = bnnpyro.load(tmp_path / "old.pt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in m.state_dict().items())
    payload["dtype"] = "int64"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unknown floating-point dtype 'int64'"):
        bnnpyro.load(tmp_path / "bad.pt")
    m.A_mean[0].data = m.A_mean[0].data.double()
    with pytest.raises(ValueError, match=r"mix dtypes \['torch.float32', 'torch.float64'\]"):
        bnnpyro.save(tmp_path / "mixed.pt", m)


def _fitted_autoguide_net(seed, guide_cls, out_features=1, **guide_kwargs):
    from bnnpyro.nn import BayesianMLP

    torch.manual_seed(seed)
    x = torch.randn(20, 3)
    y = x.sum(-1) if out_features == 1 else x[:, :out_features]
    net = BayesianMLP(3, out_features, hidden=(5,), dataset_size=20)
    guide = guide_cls(net, init_scale=0.1, **guide_kwargs)
    fit(net, guide, (x, y), epochs=5, seed=seed, progress=False)
    return net, guide, x


def test_low_rank_guide_rank_is_restored(tmp_path):
    """An AutoLowRankMultivariateNormal of rank 2 (not the default rank, about sqrt(#latents) = 5 here)
    comes back with rank 2 and the same predictions."""
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    net, guide, x = _fitted_autoguide_net(0, AutoLowRankMultivariateNormal, rank=2)
    pyro.set_rng_seed(3)
    ref = sample_predictive(net, guide, x, 10)["f"]
    bnnpyro.save(tmp_path / "g.pt", net, guide)
    net2, guide2 = bnnpyro.load(tmp_path / "g.pt")
    assert guide2.rank == 2
    pyro.set_rng_seed(3)
    torch.testing.assert_close(sample_predictive(net2, guide2, x, 10)["f"], ref, rtol=0, atol=0)


def test_two_loaded_autoguides_of_one_class_do_not_share_parameters(tmp_path):
    """Two AutoNormal guides with the same site names, trained one after the other (same default
    param-store name), loaded into one process and used interleaved: each gives its own predictions."""
    from pyro.infer.autoguide import AutoNormal

    refs = []
    for seed in (0, 1):
        pyro.clear_param_store()
        net, guide, x = _fitted_autoguide_net(seed, AutoNormal)
        pyro.set_rng_seed(3)
        refs.append((x, sample_predictive(net, guide, x, 10)["f"]))
        bnnpyro.save(tmp_path / f"g{seed}.pt", net, guide)
    pyro.clear_param_store()
    loaded = [bnnpyro.load(tmp_path / f"g{seed}.pt") for seed in (0, 1)]
    assert not torch.allclose(refs[0][1], refs[1][1])
    for (net2, guide2), (x, ref) in [*zip(loaded, refs), *zip(loaded, refs)]:
        pyro.set_rng_seed(3)
        torch.testing.assert_close(sample_predictive(net2, guide2, x, 10)["f"], ref, rtol=0, atol=0)


def test_multi_output_autoguide_round_trip(tmp_path):
    """A BayesianMLP with two outputs: the guide is rebuilt from a dummy batch with y of shape 1 x 2."""
    from pyro.infer.autoguide import AutoNormal

    net, guide, x = _fitted_autoguide_net(0, AutoNormal, out_features=2)
    pyro.set_rng_seed(3)
    ref = sample_predictive(net, guide, x, 10)["f"]
    bnnpyro.save(tmp_path / "g.pt", net, guide)
    net2, guide2 = bnnpyro.load(tmp_path / "g.pt")
    pyro.set_rng_seed(3)
    torch.testing.assert_close(sample_predictive(net2, guide2, x, 10)["f"], ref, rtol=0, atol=0)


def test_tampered_checkpoints_raise_value_errors(tmp_path):
    """Each field of the checkpoint is checked: version, model and guide class, missing or misshapen
    model and guide tensors all give a ValueError naming the problem; an unrun guide refuses to save."""
    from pyro.infer.autoguide import AutoNormal

    from bnnpyro.nn import BayesianMLP

    net, guide, x = _fitted_autoguide_net(0, AutoNormal)
    path = tmp_path / "g.pt"
    bnnpyro.save(path, net, guide)

    def tampered(edit, match):
        payload = torch.load(path, weights_only=True)
        edit(payload)
        torch.save(payload, tmp_path / "t.pt")
        with pytest.raises(ValueError, match=match):
            bnnpyro.load(tmp_path / "t.pt")

    tampered(lambda p: p.update(version=2), "unsupported checkpoint version 2")
    tampered(lambda p: p.update(model_class="Sequential"), "unknown model class 'Sequential'")
    tampered(lambda p: p.update(guide_class="AutoDelta"), "unknown guide class 'AutoDelta'")
    tampered(lambda p: p.update(guide_config={"rank": 3}), "guide parameters do not match the model.*'rank'")
    first = lambda d: next(iter(d))  # noqa: E731
    tampered(lambda p: p["model_state"].pop(first(p["model_state"])), "does not match its model configuration")
    tampered(lambda p: p["guide_state"].pop(first(p["guide_state"])), "guide parameters do not match")
    tampered(lambda p: p["guide_state"].update({first(p["guide_state"]): torch.zeros(7)}),
             "guide parameters do not match")
    with pytest.raises(ValueError, match="has not been run yet"):
        bnnpyro.save(tmp_path / "unrun.pt", net, AutoNormal(BayesianMLP(3, 1, dataset_size=5)))


def test_resume_with_the_optimizer_state_is_exact(tmp_path):
    """A run saved after 3 epochs (bnnpyro.save for the model, torch.save for a torch optimizer's
    state and the RNG state, as in PyTorch) and resumed from the files for 3 more epochs ends with
    the parameters of the uninterrupted 6-epoch run, bit for bit."""
    x = torch.randn(50, 2)
    y = x @ torch.tensor([1.0, -1.0])
    kwargs = dict(epochs=3, batch_size=10, progress=False)
    pyro.set_rng_seed(0)
    m = BayesianMLPRegressor(2, hidden=(8,), dataset_size=50)
    optim = torch.optim.Adam(m.parameters(), lr=1e-2)
    fit(m.model, m.guide, (x, y), optim=optim, seed=0, **kwargs)
    bnnpyro.save(tmp_path / "m.pt", m)
    torch.save({"optim": optim.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "optim.pt")
    fit(m.model, m.guide, (x, y), optim=optim, **kwargs)  # uninterrupted: 3 more epochs

    loaded = bnnpyro.load(tmp_path / "m.pt")
    state = torch.load(tmp_path / "optim.pt", weights_only=True)
    resumed = torch.optim.Adam(loaded.parameters(), lr=1e-2)
    resumed.load_state_dict(state["optim"])
    torch.set_rng_state(state["rng"])
    fit(loaded.model, loaded.guide, (x, y), optim=resumed, **kwargs)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def _pyro_exponential_lr():
    return pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 1e-2}, "gamma": 0.7})


def _resume_case(case):
    """(make model and guide, make optimizer over them) for one kind of training run."""
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    from bnnpyro.infer import AnalyticAutoNormal
    from bnnpyro.nn import BayesianMLP

    if case == "hand, pyro Adam":
        return (lambda: (BayesianMLPRegressor(2, hidden=(8,), dataset_size=50), None),
                lambda m, g: pyro.optim.Adam({"lr": 1e-2}))
    if case == "hand, torch Adam":
        return (lambda: (BayesianMLPRegressor(2, hidden=(8,), dataset_size=50), None),
                lambda m, g: torch.optim.Adam(m.parameters(), lr=1e-2))
    guide_class = AnalyticAutoNormal if case == "AnalyticAutoNormal, pyro ExponentialLR" else AutoLowRankMultivariateNormal

    def make():
        net = BayesianMLP(2, 1, hidden=(8,), dataset_size=50)
        return net, guide_class(net, init_scale=0.1)

    return make, lambda m, g: _pyro_exponential_lr()


def _params_of(m, g) -> dict:
    return {**m.state_dict(), **({} if g is None else {f"guide.{k}": v for k, v in g.state_dict().items()})}


@pytest.mark.parametrize("case", ["hand, pyro Adam", "hand, torch Adam", "AnalyticAutoNormal, pyro ExponentialLR",
                                  "AutoLowRankMultivariateNormal, pyro ExponentialLR"])
def test_save_with_the_optimizer_and_load_optim_state_resume_exactly(tmp_path, case):
    """bnnpyro.save(..., optim=) and bnnpyro.load_optim_state carry a Pyro or torch optimizer's
    state (Adam's moments and step counts, a scheduler's epoch and rate), although a loaded model's
    parameters have new param-store names: 3 epochs, save, 3 more epochs equals 3 epochs, save,
    load, a new optimizer given the saved state, 3 more epochs, bit for bit; without the optimizer
    state it does not."""
    x = torch.randn(50, 2)
    y = x @ torch.tensor([1.0, -1.0])
    make, make_optim = _resume_case(case)
    kwargs = dict(epochs=3, batch_size=10, progress=False)

    def train(m, g, optim, **extra):
        fit(*((m.model, m.guide) if g is None else (m, g)), (x, y), optim=optim, **kwargs, **extra)

    pyro.set_rng_seed(0)
    m, g = make()
    optim = make_optim(m, g)
    train(m, g, optim, seed=0)
    bnnpyro.save(tmp_path / "m.pt", m, g, optim=optim)
    rng = torch.get_rng_state()
    train(m, g, optim)  # uninterrupted: 3 more epochs
    expected = _params_of(m, g)

    def resume(with_state: bool) -> dict:
        loaded = bnnpyro.load(tmp_path / "m.pt")
        m2, g2 = (loaded, None) if g is None else loaded
        optim = make_optim(m2, g2)
        if with_state:
            bnnpyro.load_optim_state(tmp_path / "m.pt", optim, m2, g2)
        torch.set_rng_state(rng)
        train(m2, g2, optim)
        return _params_of(m2, g2)

    resumed = resume(with_state=True)
    assert resumed.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=k)
    fresh = resume(with_state=False)
    assert any(not torch.equal(fresh[k], v) for k, v in expected.items())


def test_a_pyro_optimizers_state_is_saved_after_the_param_store_is_cleared(tmp_path):
    """The per-parameter states are found by tensor, not through param-store names, which
    pyro.clear_param_store() (e.g. fit(clear_param_store=True) for another model) removes."""
    x = torch.randn(20, 2)
    m = BayesianMLPRegressor(2, hidden=(4,), dataset_size=20)
    optim = pyro.optim.Adam({"lr": 1e-2})
    fit(m.model, m.guide, (x, x.sum(-1)), epochs=2, optim=optim, progress=False)
    expected = {k: v["state"][0]["exp_avg"].clone() for k, v in
                zip((f"model.{k}" for k, _ in m.named_parameters()),
                    (optim.optim_objs[p].state_dict() for _, p in m.named_parameters()))}
    pyro.clear_param_store()
    bnnpyro.save(tmp_path / "m.pt", m, optim=optim)
    saved = torch.load(tmp_path / "m.pt", weights_only=True)["optim"]["state"]
    assert saved.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(saved[k]["state"][0]["exp_avg"], v), k


def test_optimizer_state_errors(tmp_path):
    x = torch.randn(20, 2)
    m = BayesianMLPRegressor(2, hidden=(4,), dataset_size=20)
    other = BayesianMLPRegressor(2, hidden=(4,), dataset_size=20)
    optim = pyro.optim.Adam({"lr": 1e-2})
    with pytest.raises(ValueError, match="holds no state for the parameters of this model"):
        bnnpyro.save(tmp_path / "m.pt", m, optim=optim)  # never stepped
    fit(other.model, other.guide, (x, x.sum(-1)), epochs=1, optim=optim, progress=False)
    with pytest.raises(ValueError, match="holds no state for the parameters of this model"):
        bnnpyro.save(tmp_path / "m.pt", m, optim=optim)  # stepped another model only
    with pytest.raises(TypeError, match="optim must be a pyro.optim optimizer or a torch.optim.Optimizer"):
        bnnpyro.save(tmp_path / "m.pt", m, optim={"lr": 1e-2})
    fit(m.model, m.guide, (x, x.sum(-1)), epochs=1, optim=optim, progress=False)
    bnnpyro.save(tmp_path / "m.pt", m, optim=optim)
    saved = torch.load(tmp_path / "m.pt", weights_only=True)["optim"]
    assert saved["kind"] == "pyro Adam" and sorted(saved["state"]) == sorted(f"model.{k}" for k, _ in m.named_parameters())
    bnnpyro.save(tmp_path / "no_optim.pt", m)
    loaded = bnnpyro.load(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="holds no optimizer state"):
        bnnpyro.load_optim_state(tmp_path / "no_optim.pt", pyro.optim.Adam({"lr": 1e-2}), loaded)
    with pytest.raises(ValueError, match="state of a pyro Adam optimizer, but optim is a pyro SGD"):
        bnnpyro.load_optim_state(tmp_path / "m.pt", pyro.optim.SGD({"lr": 1e-2}), loaded)
    with pytest.raises(ValueError, match="state of a pyro Adam optimizer, but optim is a torch Adam"):
        bnnpyro.load_optim_state(tmp_path / "m.pt", torch.optim.Adam(loaded.parameters()), loaded)
    with pytest.raises(ValueError, match="saved for a BayesianMLPRegressor with configuration"):
        bnnpyro.load_optim_state(tmp_path / "m.pt", pyro.optim.Adam({"lr": 1e-2}),
                                 BayesianMLPRegressor(2, hidden=(5,), dataset_size=20))
    with pytest.raises(ValueError, match="saved with no guide"):
        bnnpyro.load_optim_state(tmp_path / "m.pt", pyro.optim.Adam({"lr": 1e-2}), loaded, guide=loaded.guide)
    # a torch optimizer over other parameters: torch's own check
    torch_optim = torch.optim.Adam(m.parameters())
    fit(m.model, m.guide, (x, x.sum(-1)), epochs=1, optim=torch_optim, progress=False)
    bnnpyro.save(tmp_path / "t.pt", m, optim=torch_optim)
    with pytest.raises(ValueError, match="parameter group"):
        bnnpyro.load_optim_state(tmp_path / "t.pt", torch.optim.Adam(list(loaded.parameters())[:1]), loaded)


@pytest.mark.parametrize("made", ["built float64", "cast to float64"])
@pytest.mark.parametrize("prior_scale", [0.2, "fan_in"])
def test_float64_model_loads_with_its_float64_prior_and_leaves_the_rng_alone(tmp_path, prior_scale, made):
    """A float64 BayesianMLP, built so or cast, has the prior's exact float64 values (they are not
    saved: as float32 buffers, cast or loaded, 0.2 had become 0.20000000298 and the loss differed),
    so the loaded model's loss is bit for bit the original's; loading draws nothing from the
    caller's RNG stream."""
    from bnnpyro.infer import AnalyticAutoNormal
    from bnnpyro.nn import BayesianMLP

    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    if made == "built float64":
        net = BayesianMLP(3, 1, hidden=(4,), prior_scale=prior_scale, dtype=torch.float64)
    else:
        net = BayesianMLP(3, 1, hidden=(4,), prior_scale=prior_scale).double()
    guide = AnalyticAutoNormal(net)
    guide(x, y)
    bnnpyro.save(tmp_path / "m.pt", net, guide)
    rng = torch.get_rng_state()
    net2, guide2 = bnnpyro.load(tmp_path / "m.pt")
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_default_dtype() == torch.float32
    exact = 0.2 if prior_scale == 0.2 else 1 / math.sqrt(3)  # the fan_in rule
    for n in (net, net2):
        assert [p.item() for p in n.layers[0]._prior_params()] == [0.0, exact]
    losses = []
    for n, g in ((net, guide), (net2, guide2)):
        pyro.set_rng_seed(0)
        losses.append(TraceMeanField_ELBO().loss(n, g, x, y))
    assert losses[0] == losses[1]


def _trains(model, guide, x, y, *modules):
    """Whether 5 SVI steps of ``model``/``guide`` change the parameters of ``modules`` (their own tensors)."""
    def params():
        return torch.cat([p.detach().reshape(-1).clone() for m in modules for p in m.parameters()])

    before = params()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(5):
        svi.step(x, y)
    return not torch.equal(before, params())


@pytest.mark.parametrize("kind", ["catalogue", "BayesianMLP"])
def test_load_state_dict_with_assign_trains_and_uses_the_assigned_tensors(kind):
    """``load_state_dict(..., assign=True)`` replaces the parameters by new tensors; the module then
    takes a new param-store name. Under the old one Pyro's store kept the replaced tensors: SVI
    stepped those (a catalogue model never trained again), or a PyroModule copied them back over
    the loaded values on its next call."""
    from bnnpyro.infer import AnalyticAutoNormal
    from bnnpyro.nn import BayesianMLP

    x, y = torch.randn(20, 3), torch.randn(20)
    if kind == "catalogue":
        m = BayesianMLPRegressor(3, hidden=(4,), dataset_size=20)
        model, guide = m.model, m.guide
    else:
        m = model = BayesianMLP(3, 1, hidden=(4,), dataset_size=20)
        guide = AnalyticAutoNormal(m)
    assert _trains(model, guide, x, y, m)
    loaded = {k: v + 1.0 for k, v in m.state_dict().items()}
    m.load_state_dict(loaded, assign=True)
    with torch.no_grad():
        poutine.trace(model).get_trace(x, y)  # a call under the new name keeps the assigned values
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded[k]), k
    assert _trains(model, guide, x, y, m)


def test_load_state_dict_with_assign_renames_submodules_and_on_errors():
    """A converted network whose submodule was assigned into first (taking a prefix of its own), then
    the whole network: every module takes a fresh name, so the parent's assign is kept; a load that
    fails part way (torch has assigned the matching keys by then) renames too."""
    from bnnpyro.nn import BayesianMLP, to_bayesian

    bnn = to_bayesian(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)),
                      prior="pretrained")
    x = torch.randn(4, 2)
    poutine.trace(bnn).get_trace(x)
    name = "2.priors.weight.scale_unconstrained"
    bnn[2].load_state_dict({k.removeprefix("2."): v.clone() for k, v in bnn.state_dict().items()
                            if k.startswith("2.")}, assign=True)
    poutine.trace(bnn).get_trace(x)
    loaded = {k: v + 1.0 for k, v in bnn.state_dict().items()}
    bnn.load_state_dict(loaded, assign=True)
    poutine.trace(bnn).get_trace(x)  # the store must not copy a stale value back
    assert torch.equal(bnn.state_dict()[name], loaded[name])
    net = BayesianMLP(3, 1, hidden=(4,), dataset_size=10)
    poutine.trace(net).get_trace(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        net.load_state_dict({"sigma_unconstrained": torch.tensor(3.0), "junk": torch.zeros(1)}, assign=True)
    poutine.trace(net).get_trace(torch.randn(4, 3))
    assert net.state_dict()["sigma_unconstrained"].item() == 3.0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_catalogue_model_trains_on_its_own_parameters(how):
    """A deep copy or an unpickled copy gets a param-store name of its own: with the original's it
    found the original's tensors in the store, SVI stepped those, and the copy never trained. A
    trained model pickles (Pyro's weak references on its parameters are dropped)."""
    import copy
    import pickle

    x = torch.randn(20, 3)
    y = x.sum(-1)
    m = BayesianMLPRegressor(3, hidden=(4,), dataset_size=20)
    assert _trains(m.model, m.guide, x, y, m)  # registered and trained: weak references on its parameters
    c = copy.deepcopy(m) if how == "deepcopy" else pickle.loads(pickle.dumps(m))
    assert c._pyro_name != m._pyro_name
    original = {k: v.clone() for k, v in m.state_dict().items()}
    assert _trains(c.model, c.guide, x, y, c)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in original.items())  # the original untouched


def test_a_copied_autoguide_model_pair_keeps_its_own_parameters():
    """BayesianMLP and AnalyticAutoNormal copied together: training the copy leaves the original's
    noise scale and guide parameters as they were (it shared them)."""
    import copy

    from bnnpyro.infer import AnalyticAutoNormal
    from bnnpyro.nn import BayesianMLP

    x = torch.randn(20, 3)
    y = x.sum(-1)
    net = BayesianMLP(3, 1, hidden=(4,), dataset_size=20)
    guide = AnalyticAutoNormal(net)
    assert _trains(net, guide, x, y, net, guide)
    net2, guide2 = copy.deepcopy((net, guide))
    assert guide._model is not None  # the original keeps its model (Pyro's AutoGuide dropped it)
    guide2._model = (net2,)  # a copy, as Pyro's, holds none
    before = [t.detach().clone() for t in (*net.parameters(), *guide.parameters())]
    assert _trains(net2, guide2, x, y, net2, guide2)
    assert all(torch.equal(a, b) for a, b in zip(before, (*net.parameters(), *guide.parameters())))
