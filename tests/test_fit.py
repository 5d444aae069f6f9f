"""fit and elbo_terms: posterior recovery, NLL/KL split, bookkeeping, seeding, early stopping, errors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from bnnpyro.distributions import HiddenLayer, normal_kl
from bnnpyro.infer.elbo_terms import elbo_terms
from bnnpyro.infer.fit import FitHistory, fit


# ------------------------------------------------ Bayesian linear regression

N, D, SIGMA, PRIOR_SCALE = 200, 3, 0.5, 1.0


def _regression_data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + SIGMA * torch.randn(n, generator=g)
    return x, y


def _exact_posterior(x, y):
    """Posterior precision and mean of w under w ~ N(0, s^2 I), y ~ N(x w, sigma^2)."""
    precision = x.T @ x / SIGMA**2 + torch.eye(D) / PRIOR_SCALE**2
    mean = torch.linalg.solve(precision, x.T @ y / SIGMA**2)
    return precision, mean


def make_regression(num_data):
    """Model/guide pair receiving a minibatch of a data set of size ``num_data``."""

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(D), PRIOR_SCALE).to_event(1))
        with pyro.plate("data", num_data, subsample=torch.arange(len(x))):
            pyro.sample("y", dist.Normal(x @ w, SIGMA), obs=y)

    def guide(x, y=None):
        loc = pyro.param("loc", torch.zeros(D))
        scale = pyro.param("scale", torch.full((D,), 0.05), constraint=dist.constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))

    return model, guide


def _decaying_adam(steps, lr=0.05, final_lr=2.5e-4):
    return pyro.optim.ClippedAdam({"lr": lr, "lrd": (final_lr / lr) ** (1 / steps)})


@pytest.mark.parametrize("batch_size, epochs", [(None, 600), (40, 120)], ids=["full-batch", "minibatch"])
def test_recovers_exact_posterior_mean(batch_size, epochs):
    x, y = _regression_data()
    precision, mean = _exact_posterior(x, y)
    sd = precision.inverse().diag().sqrt()
    model, guide = make_regression(N)
    steps = epochs * (1 if batch_size is None else N // batch_size)
    optim = _decaying_adam(steps)
    history = fit(model, guide, (x, y), epochs, batch_size, optim=optim, seed=1, progress=False)
    assert isinstance(history, FitHistory) and len(history.loss) == epochs
    # Gaussian target: the mean-field optimum has the exact posterior mean; allow half a posterior sd
    # (prior mean 0 is ~50 sd away)
    loc = pyro.param("loc").detach()
    assert ((loc - mean).abs() <= 0.5 * sd).all(), ((loc - mean) / sd)
    # ... and scales 1 / sqrt(diag precision); a likelihood scaled for B instead of N points
    # would be off by sqrt(N / B) = 2.2
    ratio = pyro.param("scale").detach() * precision.diag().sqrt()
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio


def test_recovers_exact_posterior_mean_from_dataloader():
    x, y = _regression_data()
    precision, mean = _exact_posterior(x, y)
    sd = precision.inverse().diag().sqrt()
    model, guide = make_regression(N)
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True)
    history = fit(model, guide, loader, 150, optim=_decaying_adam(600), seed=2, progress=False, device="cpu")
    assert len(history.loss) == 150
    loc = pyro.param("loc").detach()
    assert ((loc - mean).abs() <= 0.5 * sd).all(), ((loc - mean) / sd)
    # the per-datum -ELBO settles near its split nll + kl
    assert history.loss[-1] == pytest.approx(history.nll[-1] + history.kl[-1], rel=0.2)


# ------------------------------------------------------------- elbo_terms


def test_elbo_terms_conjugate_matches_analytic_expected_nll_and_kl():
    x, y = _regression_data(n=30)
    model, guide = make_regression(num_data=30)
    m = torch.tensor([0.9, -1.8, 0.4])
    s = torch.tensor([0.1, 0.2, 0.05])
    pyro.param("loc", m)
    pyro.param("scale", s, constraint=dist.constraints.positive)
    # E_q[-log N(y | x w, sigma^2)] for w ~ N(m, diag s^2)
    expected_nll = (
        0.5 * math.log(2 * math.pi * SIGMA**2) * len(x)
        + (((y - x @ m) ** 2).sum() + (x**2 @ s**2).sum()) / (2 * SIGMA**2)
    )
    expected_kl = normal_kl(m, s, 0.0, PRIOR_SCALE).sum()
    with torch.no_grad():
        draws = torch.stack([torch.stack(elbo_terms(model, guide, x, y)) for _ in range(2000)])
    nll, kl = draws.unbind(-1)
    # the KL is in closed form: exact every time
    torch.testing.assert_close(kl, expected_kl.expand(2000))
    # the NLL is a one-sample Monte Carlo estimate: within 5 standard errors
    assert abs(nll.mean() - expected_nll) < 5 * nll.std() / math.sqrt(len(nll))


def test_elbo_terms_minibatch_scales_nll_and_counts_kl_once():
    x, y = _regression_data(n=40)
    model, guide = make_regression(num_data=40)
    pyro.param("loc", torch.zeros(D))
    with torch.no_grad():
        pyro.set_rng_seed(3)
        nll_batch, kl_batch = elbo_terms(model, guide, x[:10], y[:10])
        pyro.set_rng_seed(3)
        nll_full, kl_full = elbo_terms(make_regression(num_data=10)[0], guide, x[:10], y[:10])
    torch.testing.assert_close(nll_batch, 4 * nll_full)
    torch.testing.assert_close(kl_batch, kl_full)


def test_elbo_terms_sum_equals_mean_field_loss_with_and_without_registered_kl():
    x, y = _regression_data(n=20)

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        nu = pyro.sample("nu", dist.Cauchy(0.0, 1.0))  # kl(Normal, Cauchy) is not registered
        with pyro.plate("data", 100, subsample=torch.arange(len(x))):
            pyro.sample("y", dist.Normal(x @ w + nu, SIGMA), obs=y)

    def guide(x, y=None):
        pyro.sample("w", dist.Normal(pyro.param("w_loc", torch.ones(D)), 0.3).to_event(1))
        pyro.sample("nu", dist.Normal(pyro.param("nu_loc", torch.tensor(0.2)), 0.5))

    pyro.set_rng_seed(5)
    with torch.no_grad():
        nll, kl = elbo_terms(model, guide, x, y)
    pyro.set_rng_seed(5)
    assert float(nll + kl) == pytest.approx(TraceMeanField_ELBO().loss(model, guide, x, y), rel=1e-6)
    # w has a closed-form KL, nu a one-sample log q - log p: replay the guide's draws by hand
    pyro.set_rng_seed(5)
    w = dist.Normal(pyro.param("w_loc"), 0.3).rsample()
    nu = dist.Normal(pyro.param("nu_loc"), 0.5).rsample()
    nu_term = dist.Normal(pyro.param("nu_loc"), 0.5).log_prob(nu) - dist.Cauchy(0.0, 1.0).log_prob(nu)
    w_term = normal_kl(pyro.param("w_loc"), torch.tensor(0.3), 0.0, 1.0).sum()
    expected_nll = -5 * dist.Normal(x @ w + nu, SIGMA).log_prob(y).sum()
    torch.testing.assert_close(kl, (w_term + nu_term).detach())
    torch.testing.assert_close(nll, expected_nll.detach())


def test_elbo_terms_with_hidden_layer_counts_folded_kl_once():
    x, y = _regression_data(n=8)
    A_prior_mean, A_prior_scale = torch.zeros(D, 2), torch.ones(D, 2)
    A_mean, A_scale = torch.randn(D, 2), torch.full((D, 2), 0.3)

    def model(x, y=None):
        with pyro.plate("data", 32, subsample=torch.arange(len(x))):
            prior = HiddenLayer(x, A_prior_mean, A_prior_scale, include_hidden_bias=False, dataset_size=32)
            h = pyro.sample("h", prior)
            pyro.sample("y", dist.Normal(h.sum(-1), SIGMA), obs=y)

    def guide(x, y=None):
        with pyro.plate("data", 32, subsample=torch.arange(len(x))):
            pyro.sample("h", HiddenLayer(x, A_mean, A_scale, include_hidden_bias=False, dataset_size=32))

    with torch.no_grad():
        _, kl = elbo_terms(model, guide, x, y)
    torch.testing.assert_close(kl, normal_kl(A_mean, A_scale, A_prior_mean, A_prior_scale).sum())


def test_elbo_terms_rejects_unguided_latent_site():
    def model(x, y=None):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'z'"):
        elbo_terms(model, lambda x, y=None: None, torch.zeros(2), torch.zeros(2))


# ------------------------------------------------------------- bookkeeping


def _fixed_param_model(num_data):
    """No latent variables and a frozen parameter: the loss is an exact, deterministic NLL."""

    def model(x, y=None):
        theta = pyro.param("theta", torch.tensor(0.3))
        with pyro.plate("data", num_data, subsample=torch.arange(len(x))):
            pyro.sample("y", dist.Normal(theta * x, 1.0), obs=y)

    return model, lambda x, y=None: None


class _Stream(IterableDataset):
    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self):
        yield from zip(self.x.split(self.batch_size), self.y.split(self.batch_size))


def test_loss_is_exact_per_datum_nll_with_uneven_minibatches():
    x, y = torch.linspace(-1, 1, 10), torch.linspace(0, 2, 10)
    mean_nll = -dist.Normal(0.3 * x, 1.0).log_prob(y).mean().item()
    last_nll = -10 / 2 * dist.Normal(0.3 * x[8:], 1.0).log_prob(y[8:]).sum().item() / 10
    model, guide = _fixed_param_model(10)
    frozen = pyro.optim.Adam({"lr": 0.0})
    runs = {
        "tensors": dict(data=(x, y), batch_size=4, shuffle=False),
        "map-style loader": dict(data=DataLoader(TensorDataset(x, y), batch_size=4)),
        "iterable loader": dict(data=DataLoader(_Stream(x, y, 4), batch_size=None)),
    }
    for name, kwargs in runs.items():
        history = fit(model, guide, epochs=2, optim=frozen, progress=False, **kwargs)
        assert history.loss == pytest.approx([mean_nll] * 2, rel=1e-6), name
        assert history.nll == pytest.approx([last_nll] * 2, rel=1e-6), name
        assert history.kl == [0.0, 0.0], name
        assert history.validation == [] and history.best_epoch is None and not history.stopped_early


def test_progress_bar_shows_per_datum_terms(capsys):
    x, y = torch.linspace(-1, 1, 10), torch.linspace(0, 2, 10)
    model, guide = _fixed_param_model(10)
    fit(model, guide, (x, y), epochs=3, progress=True, validation_fn=lambda epoch: 1.0)
    err = capsys.readouterr().err
    assert "3/3" in err and all(f"{key}=" in err for key in ("elbo", "nll", "kl", "val"))


def test_seed_makes_runs_identical():
    x, y = _regression_data()
    model, guide = make_regression(N)

    def run(seed):
        history = fit(model, guide, (x, y), 5, 32, seed=seed, progress=False, clear_param_store=True)
        return history, pyro.param("loc").detach().clone()

    (h1, loc1), (h2, loc2), (h3, loc3) = run(11), run(11), run(12)
    assert h1 == h2
    assert torch.equal(loc1, loc2)
    assert h1.loss != h3.loss and not torch.equal(loc1, loc3)


# ---------------------------------------------------------- early stopping


def _scripted_validation(values):
    """validation_fn returning ``values`` in turn and recording the guide's loc at each call."""
    seen = {}

    def validation_fn(epoch):
        seen[epoch] = pyro.param("loc").detach().clone()
        return values[len(seen) - 1]

    return validation_fn, seen


def test_early_stopping_stops_and_restores_best_params():
    x, y = _regression_data()
    model, guide = make_regression(N)
    validation_fn, seen = _scripted_validation([5.0, 3.0, 4.0, 3.0, 6.0, 1.0])
    history = fit(model, guide, (x, y), 20, validation_fn=validation_fn, patience=3, progress=False)
    assert history.stopped_early
    assert len(history.loss) == 5 and history.validation == [5.0, 3.0, 4.0, 3.0, 6.0]
    assert history.best_epoch == 1
    torch.testing.assert_close(pyro.param("loc"), seen[1], rtol=0, atol=0)
    assert not torch.equal(seen[1], seen[4])


def test_validate_every_and_restore_best_when_all_epochs_ran():
    x, y = _regression_data()
    model, guide = make_regression(N)
    validation_fn, seen = _scripted_validation([4.0, 2.0, 3.0])
    history = fit(
        model, guide, (x, y), 7, validation_fn=validation_fn, validate_every=2, patience=2, progress=False
    )
    assert sorted(seen) == [1, 3, 5]
    assert not history.stopped_early and len(history.loss) == 7
    assert history.best_epoch == 3
    torch.testing.assert_close(pyro.param("loc"), seen[3], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["catalogue", "autoguide"])
def test_restoring_the_best_params_reaches_the_modules(kind):
    """The best parameters are written into the modules' own tensors: a catalogue model's guide
    computes with its module's parameters, which the restore (replacing the store's tensors) left
    at their last values, and so did save; an autoguide's state_dict likewise."""
    from pyro.infer.autoguide import AutoNormal

    from bnnpyro.models import BayesianMLPRegressor
    from bnnpyro.nn import BayesianMLP

    x, y = _regression_data(n=40)
    if kind == "catalogue":
        module = BayesianMLPRegressor(D, hidden=(4,), dataset_size=40)
        model, guide = module.model, module.guide
    else:
        model = BayesianMLP(D, 1, hidden=(4,), dataset_size=40)
        guide = module = AutoNormal(model)
    values, seen = iter([2.0, 1.0, 3.0, 4.0]), {}

    def validation_fn(epoch):
        seen[epoch] = {k: v.clone() for k, v in module.state_dict().items()}
        return next(values)

    history = fit(model, guide, (x, y), 6, validation_fn=validation_fn, patience=2, progress=False,
                  clear_param_store=True)
    assert history.stopped_early and history.best_epoch == 1
    state = module.state_dict()
    assert not all(torch.equal(seen[3][k], seen[1][k]) for k in state)
    assert all(torch.equal(state[k], seen[1][k]) for k in state)
    with torch.no_grad():
        guide(x[:5])  # the guide runs on them, and the store holds the same tensors
    assert all(torch.equal(module.state_dict()[k], seen[1][k]) for k in state)


def test_restoring_the_best_params_restores_the_modules_buffers():
    """Early stopping restores the buffers of a model that is a bound method of a module too: a
    converted network's BatchNorm running statistics are the best epoch's, not the last one's,
    like its weights."""
    from pyro.infer import Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    from bnnpyro.nn import to_bayesian
    from bnnpyro.serialization import make_unique

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = to_bayesian(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                                                       torch.nn.ReLU(), torch.nn.Linear(4, 2)))

        def model(self, x, y=None):
            logits = self.net(x)
            with pyro.plate("data", 32, subsample=torch.arange(len(x))):
                pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    c = Classifier()
    guide = make_unique(AutoNormal(c.model))
    seen = {}

    def validation_fn(epoch):
        seen[epoch] = {k: v.clone() for k, v in c.state_dict().items()}
        return float(epoch)  # epoch 0 is the best

    history = fit(c.model, guide, (x, y), 5, batch_size=8, loss=Trace_ELBO(), validation_fn=validation_fn,
                  patience=2, progress=False, seed=0)
    assert history.stopped_early and history.best_epoch == 0
    state = c.state_dict()
    assert {"net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"} <= state.keys()
    assert not torch.equal(seen[2]["net.1.running_mean"], seen[0]["net.1.running_mean"])
    for k, v in state.items():
        torch.testing.assert_close(v, seen[0][k], rtol=0, atol=0, msg=k)


def test_the_snapshot_for_early_stopping_copies_persistent_buffers_only():
    """Non-persistent buffers (a converted network's copies of its pretrained weights, prior
    parameters) are constants: only the state_dict's buffers are copied at each improvement."""
    from bnnpyro.infer.fit import _snapshot_param_store
    from bnnpyro.nn import to_bayesian

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    bnn = to_bayesian(net, prior="pretrained")
    buffers = _snapshot_param_store([bnn, bnn])["buffers"]  # reached twice: copied once
    params = {id(p) for p in bnn.parameters()}
    persistent = [v for v in bnn.state_dict(keep_vars=True).values() if id(v) not in params]
    assert [id(b) for b, _ in buffers] == [id(b) for b in persistent]
    assert len(list(bnn.buffers())) == len(persistent) + 6  # the anchors and the pretrained copies

    class WithExtraState(torch.nn.Linear):  # a module's extra state is in its state_dict, not a tensor
        def get_extra_state(self):
            return {"version": 1}

        def set_extra_state(self, state):
            pass

    assert _snapshot_param_store([WithExtraState(2, 2)])["buffers"] == []


def test_validation_without_patience_only_records():
    x, y = _regression_data()
    model, guide = make_regression(N)
    validation_fn, seen = _scripted_validation([2.0, 1.0, 3.0])
    history = fit(model, guide, (x, y), 3, validation_fn=validation_fn, progress=False)
    assert history.validation == [2.0, 1.0, 3.0] and history.best_epoch == 1 and not history.stopped_early
    assert not torch.equal(pyro.param("loc").detach(), seen[1])


def test_a_first_infinite_validation_is_the_best_so_far():
    """An infinite first value is the best so far (inf < inf is false: it stopped with patience=1
    after epoch 0 with best_epoch None, restoring nothing); later finite values improve on it."""
    x, y = _regression_data()
    model, guide = make_regression(N)
    validation_fn, seen = _scripted_validation([float("inf"), float("inf"), 3.0])
    history = fit(model, guide, (x, y), 3, validation_fn=validation_fn, patience=1, progress=False)
    assert history.best_epoch == 0 and history.stopped_early and len(history.loss) == 2
    validation_fn, seen = _scripted_validation([float("inf"), 3.0, 4.0])
    history = fit(model, guide, (x, y), 3, validation_fn=validation_fn, patience=2, progress=False)
    assert history.best_epoch == 1 and not history.stopped_early


def test_a_nan_validation_warns_and_never_improves():
    x, y = _regression_data()
    model, guide = make_regression(N)
    validation_fn, seen = _scripted_validation([2.0, float("nan"), 1.0, float("nan"), float("nan"), 0.5])
    with pytest.warns(RuntimeWarning, match="validation_fn returned NaN after epoch [134]:") as record:
        history = fit(model, guide, (x, y), 6, validation_fn=validation_fn, patience=2, progress=False)
    assert [str(w.message)[:40] for w in record] == [f"validation_fn returned NaN after epoch {e}" for e in (1, 3, 4)]
    assert history.stopped_early  # two NaNs in a row are two validations without improvement
    assert history.best_epoch == 2 and len(history.loss) == 5  # the NaNs count as stale validations
    torch.testing.assert_close(pyro.param("loc"), seen[2], rtol=0, atol=0)


# -------------------------------------------------------------- bad inputs

_x, _y = torch.zeros(5), torch.zeros(5)


def _nan_y():
    y = _y.clone()
    y[2] = float("nan")
    return y


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(data=[[0.0, 1.0], [0.0, 1.0]]), TypeError, "x in data must be a torch.Tensor"),
        (dict(data=(_x, [0.0] * 5)), TypeError, "y in data must be a torch.Tensor"),
        (dict(data=_x), TypeError, "data must be a pair"),
        (dict(data=(_x, _y[:4])), ValueError, "same length.*5 and 4"),
        (dict(data=(_x, _nan_y())), ValueError, "y in data contains NaN"),
        (dict(data=(torch.full((5,), math.inf), _y)), ValueError, "x in data contains NaN or infinite"),
        (dict(data=(_x, _y), batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(data=(_x, _y), batch_size=2.5), ValueError, "batch_size must be a positive int"),
        (dict(data=(_x, _y), epochs=0), ValueError, "epochs must be a positive int"),
        (dict(data=(_x, _y), validate_every=0), ValueError, "validate_every must be a positive int"),
        (dict(data=(_x, _y), patience=2), ValueError, "patience requires a validation_fn"),
        (dict(data=DataLoader(TensorDataset(_x, _y)), batch_size=2), ValueError, "batch_size must be None"),
        (dict(data=DataLoader(TensorDataset(_x, _nan_y()), batch_size=2)), ValueError, "y in batch 1 .* NaN"),
        (dict(data=DataLoader(_x, batch_size=2)), TypeError, "batches must be pairs"),
    ],
)
def test_bad_inputs_raise(kwargs, error, match):
    model, guide = _fixed_param_model(5)
    with pytest.raises(error, match=match):
        fit(model, guide, **{"epochs": 1, "progress": False, **kwargs})


def test_lr_scheduler_steps_once_per_epoch_not_per_batch():
    """A PyroLRScheduler optim advances at the end of every epoch: ExponentialLR(gamma=0.5) from lr 1
    is at 0.5**3 after 3 epochs of 2 minibatches each."""
    from bnnpyro.models import BayesianMLPRegressor

    x = torch.randn(10, 2)
    m = BayesianMLPRegressor(2, hidden=(3,), dataset_size=10)
    optim = pyro.optim.ExponentialLR({"optimizer": torch.optim.SGD, "optim_args": {"lr": 1e-3}, "gamma": 0.5})
    fit(m.model, m.guide, (x, x.sum(-1)), epochs=3, batch_size=5, optim=optim, seed=0, progress=False)
    lrs = [group["lr"] for sched in optim.optim_objs.values() for group in sched.optimizer.param_groups]
    assert lrs and lrs == pytest.approx([1e-3 * 0.5**3] * len(lrs))


@pytest.mark.parametrize("values, factor", [([3.0, 2.0, 1.0], 1.0), ([1.0, 1.0, 1.0], 0.25)])
def test_reduce_lr_on_plateau_steps_with_the_validation_value(values, factor):
    """ReduceLROnPlateau(patience=0, factor=0.5) is stepped with the epoch's validation value: a
    decreasing one keeps lr, a flat one halves it after epochs 1 and 2 (it was stepped without a
    metric: TypeError after the first epoch); without validation_fn, with the epoch's loss."""
    from bnnpyro.models import BayesianMLPRegressor

    x = torch.randn(10, 2)
    m = BayesianMLPRegressor(2, hidden=(3,), dataset_size=10)

    def optim():
        return pyro.optim.ReduceLROnPlateau({"optimizer": torch.optim.SGD, "optim_args": {"lr": 1e-3},
                                             "patience": 0, "factor": 0.5})

    def lrs(o):
        return [group["lr"] for sched in o.optim_objs.values() for group in sched.optimizer.param_groups]

    o = optim()
    fit(m.model, m.guide, (x, x.sum(-1)), epochs=3, optim=o, seed=0, progress=False,
        validation_fn=lambda epoch: values[epoch])
    assert lrs(o) and lrs(o) == pytest.approx([1e-3 * factor] * len(lrs(o)))
    # without validation_fn, stepped with the epoch's loss; with validate_every=2, only after the
    # validations, with their values (not the loss, on another scale, in between)
    for kwargs, expected in (({}, "loss"), ({"validation_fn": lambda epoch: 10.0 - epoch, "validate_every": 2}, "val")):
        o = optim()
        fit(m.model, m.guide, (x, x.sum(-1)), epochs=4, optim=o, seed=0, progress=False)  # builds the schedulers
        metrics = []
        for sched in o.optim_objs.values():
            sched.step = lambda metric, _record=metrics: _record.append(metric)
        history = fit(m.model, m.guide, (x, x.sum(-1)), epochs=4, optim=o, seed=0, progress=False, **kwargs)
        want = history.loss if expected == "loss" else [9.0, 7.0]
        n = len(o.optim_objs)
        assert metrics == pytest.approx([v for v in want for _ in range(n)])


def test_dataloader_n_is_the_dataset_length_with_drop_last(monkeypatch):
    """N is len(loader.dataset), not the rows seen: with drop_last a loader of 10 rows in batches of 3
    trains on 9, and the per-datum loss is the sum of the step losses x 3 / 9 / 10."""
    from torch.utils.data import DataLoader, TensorDataset

    from bnnpyro.models import BayesianMLPRegressor

    x = torch.randn(10, 2)
    m = BayesianMLPRegressor(2, hidden=(3,), dataset_size=10)
    loader = DataLoader(TensorDataset(x, x.sum(-1)), batch_size=3, drop_last=True)
    steps = []
    step = pyro.infer.SVI.step
    monkeypatch.setattr(pyro.infer.SVI, "step", lambda self, *a, **k: steps.append(step(self, *a, **k)) or steps[-1])
    history = fit(m.model, m.guide, loader, epochs=1, seed=0, progress=False)
    assert len(steps) == 3
    assert history.loss[0] == pytest.approx(sum(steps) * 3 / 9 / 10, rel=1e-6)


# ------------------------------------------------ a torch optimizer instead of SVI


def _fit_twice(build, x, y, loss_class, **kwargs):
    """``fit`` from the same initial state with ``pyro.optim.Adam`` and with ``torch.optim.Adam`` over
    the parameters ``build`` returns: (history, parameters) for each."""
    results = []
    for use_torch in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(5)
        model, guide, params = build()
        optim = torch.optim.Adam(params(), lr=1e-2) if use_torch else pyro.optim.Adam({"lr": 1e-2})
        history = fit(model, guide, (x, y), optim=optim, loss=loss_class(), seed=1, progress=False, **kwargs)
        results.append((history, [p.detach().clone() for p in params()]))
    return results


@pytest.mark.parametrize("loss_class", ["TraceMeanField_ELBO", "JitTraceMeanField_ELBO"])
@pytest.mark.parametrize("kind", ["catalogue", "param-store guide"])
def test_a_torch_optimizer_makes_the_updates_of_svi(kind, loss_class):
    """Adam is elementwise: one torch.optim.Adam over all parameters and Pyro's Adam per parameter make
    the same updates, and with the same seed the same draws, so both fits end bit for bit equal (with
    minibatches of unequal size, 16 and then 12); a learning rate 10% higher moves them apart."""
    from bnnpyro.infer import JitTraceMeanField_ELBO
    from bnnpyro.models import BayesianMLPRegressor

    loss_class = {"TraceMeanField_ELBO": TraceMeanField_ELBO, "JitTraceMeanField_ELBO": JitTraceMeanField_ELBO}[loss_class]
    x, y = _regression_data(n=60)

    def build():
        if kind == "catalogue":
            m = BayesianMLPRegressor(D, hidden=(8,), dataset_size=60)
            return m.model, m.guide, m.parameters
        model, guide = make_regression(60)
        guide(x)  # creates the parameters
        return model, guide, lambda: [pyro.param("loc").unconstrained(), pyro.param("scale").unconstrained()]

    (h_svi, p_svi), (h_torch, p_torch) = _fit_twice(build, x, y, loss_class, epochs=3, batch_size=16)
    assert h_torch.loss == pytest.approx(h_svi.loss, rel=1e-6) and h_torch.nll == pytest.approx(h_svi.nll, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(p_svi, p_torch))
    pyro.clear_param_store()
    torch.manual_seed(5)
    model, guide, params = build()
    fit(model, guide, (x, y), 3, 16, optim=torch.optim.Adam(params(), lr=1.1e-2), loss=loss_class(), seed=1,
        progress=False)
    assert max((a - b.detach()).abs().max().item() for a, b in zip(p_svi, params())) > 1e-3


def test_a_torch_optimizer_missing_a_parameter_is_named():
    from bnnpyro.models import BayesianMLPRegressor

    x, y = _regression_data(n=40)
    m = BayesianMLPRegressor(D, hidden=(4,), dataset_size=40)
    before = m.A_mean[0].detach().clone()
    optim = torch.optim.Adam([p for name, p in m.named_parameters() if name != "noise_rho"], lr=1e-2)
    with pytest.raises(ValueError, match=r"optim does not update the parameters \[.*noise_rho'\]"):
        fit(m.model, m.guide, (x, y), 2, optim=optim, progress=False)
    assert torch.equal(m.A_mean[0], before)  # raised before the first update


def test_optim_of_another_type_raises():
    x, y = _regression_data(n=40)
    model, guide = make_regression(40)
    with pytest.raises(TypeError, match="optim must be a pyro.optim optimizer or a torch.optim.Optimizer, got dict"):
        fit(model, guide, (x, y), 1, optim={"lr": 1e-2}, progress=False)


def test_a_diverging_loss_raises_naming_the_step():
    """With Pyro's validation off (the README's advice for speed) lr=1e3 made every later loss NaN
    and fit returned normally; it raises instead, naming the epoch and minibatch."""
    from bnnpyro.models import BayesianMLPRegressor

    x = torch.randn(40, 2)
    m = BayesianMLPRegressor(2, hidden=(8,), dataset_size=40)
    with pyro.validation_enabled(False), pytest.raises(FloatingPointError, match=r"at epoch \d+, minibatch \d+: training diverged"):
        fit(m.model, m.guide, (x, 1e3 * x.sum(-1)), epochs=50, batch_size=10, seed=0, progress=False,
            optim=pyro.optim.Adam({"lr": 1e3}))
