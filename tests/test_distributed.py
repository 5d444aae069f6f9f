"""Data-parallel SVI (bnnpyro.infer.distributed): 2 gloo processes vs one process.

One ``torch.multiprocessing.spawn`` of 2 ranks runs every scenario and saves its records; the tests
compare them with each other and with single-process runs. Everything runs in float64, so that
the 2-rank and 1-rank trajectories, equal in exact arithmetic, agree to rounding (rtol 1e-9).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger

import bnnpyro
from bnnpyro.infer import AnalyticAutoNormal
from bnnpyro.infer.distributed import DistributedSVI, fit_distributed, shard
from bnnpyro.models import BayesianMLPRegressor
from bnnpyro.nn import BayesianMLP, to_bayesian

WORLD = 2
N, D, H = 40, 3, 8
BATCHES = [10, 9, 10, 7, 10, 9, 10, 7, 10, 9]  # global batch sizes: even and uneven splits
RTOL, ATOL = 1e-9, 1e-12


class _FixedNoise(Messenger):
    """Draw the guide's local-reparameterization noise at site ``name`` from ``noise[name]``
    (``B x H``) instead of ``torch.randn``, so that a rank can use exactly the rows of the global
    batch's noise that belong to its shard."""

    def __init__(self, noise: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.noise = noise

    def _pyro_sample(self, msg: dict) -> None:
        eps = self.noise.get(msg["name"])
        if eps is None:
            return
        layer = msg["fn"]

        def rsample(sample_shape=torch.Size()) -> torch.Tensor:
            mean, var = layer.pre_activation_moments()
            out = layer.non_linearity(mean + eps * var.sqrt())
            if layer.include_hidden_bias:
                out = torch.cat([out, out.new_ones(out.shape[:-1] + (1,))], dim=-1)
            return out

        layer.rsample = rsample


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    return x, x.sum(-1).sin() + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)


def _schedule() -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Per step: the global batch's row indices and its noise for each layer site."""
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randperm(N, generator=g)[:b],
         {"layer0": torch.randn(b, H, generator=g, dtype=torch.float64),
          "layer1": torch.randn(b, 1, generator=g, dtype=torch.float64)})
        for b in BATCHES
    ]


def _flat_params() -> torch.Tensor:
    store = pyro.get_param_store()
    return torch.cat([store[name].detach().reshape(-1) for name in sorted(store.keys())])


def _noisy_guide(m: BayesianMLPRegressor, noise: dict[str, torch.Tensor]):
    def guide(x, y=None):
        with _FixedNoise(noise):
            return m.guide(x, y)
    return guide


class _BatchNormRegressor(PyroModule):
    """A converted network with a BatchNorm layer, and a likelihood scaled for minibatches of N rows."""

    def __init__(self) -> None:
        super().__init__()
        self.dataset_size = N
        self.net = to_bayesian(torch.nn.Sequential(torch.nn.Linear(D, 4), torch.nn.BatchNorm1d(4),
                                                   torch.nn.ReLU(), torch.nn.Linear(4, 1)))

    def forward(self, x, y=None):
        f = self.net(x).squeeze(-1)
        with pyro.plate("data", N, subsample=torch.arange(len(x))):
            pyro.sample("y", pyro.distributions.Normal(f, 1.0), obs=y)
        return f


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        record: dict = {}

        # trajectory: each rank initialises differently (rank 0's parameters must win)
        torch.manual_seed(rank)
        m = BayesianMLPRegressor(D, hidden=(H,), dataset_size=N)
        noise: dict[str, torch.Tensor] = {}
        svi = DistributedSVI(m.model, _noisy_guide(m, noise))
        losses, params = [], []
        for idx, batch_noise in _schedule():
            rows = torch.arange(len(idx))
            mine = shard(rows, rank, WORLD)
            noise.update({k: v[mine] for k, v in batch_noise.items()})
            losses.append(svi.step(x[idx[mine]], y[idx[mine]]))
            params.append(_flat_params())
        record["losses"], record["params"] = losses, params

        # KL counted once: no likelihood, lr 0 so that the KL can be read after the step
        pyro.clear_param_store()
        torch.manual_seed(10 + rank)
        m = BayesianMLPRegressor(D, hidden=(H,), dataset_size=N, init_scale=0.3)
        svi = DistributedSVI(poutine.block(m.model, hide=["y"]), m.guide, optim_args={"lr": 0.0})
        record["kl_loss"] = svi.step(x[shard(torch.arange(10), rank, WORLD)], None)
        record["kl"] = m.kl().item()

        # fit_distributed end to end, with a rank-0 checkpoint
        pyro.clear_param_store()
        torch.manual_seed(20 + rank)
        m = BayesianMLPRegressor(D, hidden=(H,), dataset_size=N)
        history = fit_distributed(m.model, m.guide, (x, y), epochs=2, batch_size=16, seed=3, progress=False,
                                  checkpoint=os.path.join(out, "model.pt"), checkpoint_model=m)
        record["history"] = (history.loss, history.nll, history.kl)
        record["fit_params"] = _flat_params()

        # fit_distributed without a likelihood and lr 0: every step's loss is the KL, which stays put
        pyro.clear_param_store()
        torch.manual_seed(30 + rank)
        m = BayesianMLPRegressor(D, hidden=(H,), dataset_size=N, init_scale=0.3)
        history = fit_distributed(poutine.block(m.model, hide=["y"]), m.guide, (x, y), epochs=2, batch_size=10,
                                  optim_args={"lr": 0.0}, seed=4, progress=False)
        record["kl_history"] = (history.loss, history.nll, history.kl)
        record["kl_fit"] = m.kl().item()
        record["after_fit_draw"] = torch.randn(4)  # seeded seed + rank; both ranks drew as many numbers

        # a loss that turns NaN on rank 1 only (its third step): every rank raises, none waits forever
        pyro.clear_param_store()
        m = BayesianMLPRegressor(D, hidden=(H,), dataset_size=N)
        calls = [0]

        def diverging_model(x, y=None):
            calls[0] += 1
            if rank == 1 and calls[0] >= 3:
                pyro.factor("diverged", x.new_tensor(float("nan")))
            return m.model(x, y)

        try:
            with pyro.validation_enabled(False):
                fit_distributed(diverging_model, m.guide, (x, y), epochs=2, batch_size=10, seed=5, progress=False)
        except FloatingPointError as e:
            record["diverged"] = str(e)

        # a parameter created on rank 1 only (at its second step): every rank raises, none waits
        pyro.clear_param_store()
        steps = [0]

        def lazy_model(x, y=None):
            loc = pyro.param("loc", torch.zeros(()))
            if rank == 1 and steps[0] >= 1:
                loc = loc + pyro.param("extra", torch.zeros(()))
            with pyro.plate("rows", len(x)):
                pyro.sample("obs", pyro.distributions.Normal(loc, 1.0), obs=y)

        svi = DistributedSVI(lazy_model, lambda x, y=None: None)
        try:
            for steps[0] in range(3):
                svi.step(x[shard(torch.arange(8), rank, WORLD)], y[shard(torch.arange(8), rank, WORLD)])
        except ValueError as e:
            record["one_rank_params"] = (steps[0], str(e))

        # a model and guide without parameters: named as such on every rank
        try:
            DistributedSVI(lambda x, y=None: None, lambda x, y=None: None).step(x[:2], y[:2])
        except ValueError as e:
            record["no_parameters"] = str(e)

        # a BayesianMLP without dataset_size cannot be scaled per rank: refused on every rank
        try:
            net = BayesianMLP(D, 1, hidden=(4,))
            DistributedSVI(net, AnalyticAutoNormal(net))
        except ValueError as e:
            record["no_dataset_size"] = str(e)

        # BatchNorm running statistics: rank 0's after every step, so the replicas stay equal
        pyro.clear_param_store()
        torch.manual_seed(40 + rank)
        bn_net = _BatchNormRegressor()
        guide = AnalyticAutoNormal(bn_net)
        fit_distributed(bn_net, guide, (x, y), epochs=2, batch_size=10, seed=6, progress=False)
        record["bn_buffers"] = {k: v.clone() for k, v in bn_net.state_dict().items() if "running" in k}
        torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], out


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_shard_partitions_the_batch():
    idx = torch.tensor([5, 1, 4, 0, 3])
    parts = [shard(idx, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts), idx) and [len(p) for p in parts] == [3, 2]
    assert len(shard(idx[:1], 1, 2)) == 0


def test_ranks_stay_identical(runs):
    (r0, r1), _ = runs
    assert r0["losses"] == r1["losses"]
    for p0, p1 in zip(r0["params"], r1["params"]):
        assert torch.equal(p0, p1)
    assert torch.equal(r0["fit_params"], r1["fit_params"])
    assert r0["history"] == r1["history"]


def test_two_ranks_match_one_process(runs, float64):
    """Same initialisation (rank 0's), same global batches, same noise rows: pyro's SVI on the
    whole global batch in one process takes the same steps as the 2 ranks on their shards."""
    (r0, _), _ = runs
    x, y = _data()
    torch.manual_seed(0)
    m = BayesianMLPRegressor(D, hidden=(H,), dataset_size=N)
    noise: dict[str, torch.Tensor] = {}
    svi = SVI(m.model, _noisy_guide(m, noise), pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for step, (idx, batch_noise) in enumerate(_schedule()):
        noise.update(batch_noise)
        loss = svi.step(x[idx], y[idx])
        assert r0["losses"][step] == pytest.approx(loss, rel=RTOL)
        torch.testing.assert_close(r0["params"][step], _flat_params(), rtol=RTOL, atol=ATOL)


def test_single_process_distributed_svi_matches_svi(float64):
    """Without a process group DistributedSVI is plain SVI with torch's Adam."""
    x, y = _data()
    schedule = _schedule()[:3]
    trajectories = []
    for use_svi in (True, False):
        pyro.clear_param_store()
        torch.manual_seed(0)
        m = BayesianMLPRegressor(D, hidden=(H,), dataset_size=N)
        noise: dict[str, torch.Tensor] = {}
        guide = _noisy_guide(m, noise)
        svi = (SVI(m.model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO()) if use_svi
               else DistributedSVI(m.model, guide))
        steps = []
        for idx, batch_noise in schedule:
            noise.update(batch_noise)
            steps.append((svi.step(x[idx], y[idx]), _flat_params()))
        trajectories.append(steps)
    for (l0, p0), (l1, p1) in zip(*trajectories):
        assert l0 == pytest.approx(l1, rel=RTOL)
        torch.testing.assert_close(p0, p1, rtol=RTOL, atol=ATOL)


def test_kl_counted_once(runs):
    """Without a likelihood the 2-rank objective is the KL itself, not 2 x KL."""
    (r0, r1), _ = runs
    assert r0["kl"] == r1["kl"] > 0
    assert r0["kl_loss"] == r1["kl_loss"] == pytest.approx(r0["kl"], rel=RTOL)


def test_fit_distributed_history_is_per_datum_and_counts_the_kl_once(runs):
    """No likelihood, lr 0: each global step's loss is the KL (of rank 0's parameters, broadcast), so
    the history's per-datum loss and KL are KL / N every epoch on both ranks (global batches of 10 rows,
    5 per rank), and the NLL is 0; the ranks, which drew as many numbers, sample independently."""
    (r0, r1), _ = runs
    kl = r0["kl_fit"]
    assert kl == r1["kl_fit"] > 0
    for r in (r0, r1):
        loss, nll, kl_history = r["kl_history"]
        assert loss == pytest.approx([kl / N] * 2, rel=1e-6)
        assert kl_history == pytest.approx([kl / N] * 2, rel=1e-6)
        assert nll == [0.0, 0.0]
    assert not torch.equal(r0["after_fit_draw"], r1["after_fit_draw"])


def test_fit_distributed_history_and_checkpoint(runs):
    (r0, _), out = runs
    loss, nll, kl = r0["history"]
    assert len(loss) == len(nll) == len(kl) == 2
    assert all(torch.isfinite(torch.tensor(v)).all() for v in (loss, nll, kl))
    loaded = bnnpyro.load(out / "model.pt")
    state = torch.cat([p.detach().reshape(-1) for _, p in sorted(loaded.named_parameters())])
    # the param store names are the module's parameter names behind a prefix: same sorted order
    torch.testing.assert_close(state.double(), r0["fit_params"], rtol=1e-6, atol=1e-7)


def test_fit_distributed_raises_on_every_rank_when_one_ranks_loss_turns_nan(runs):
    """Rank 1's third model call (its second step: the first step traces the model twice to adopt
    the new parameters) adds a NaN factor; the all-reduced loss is NaN on both ranks, so both
    raise at epoch 0, minibatch 1."""
    records, _ = runs
    for r in records:
        assert "at epoch 0, minibatch 1: training diverged on some rank" in r["diverged"]


def test_parameters_met_on_one_rank_only_raise_on_every_rank(runs):
    """Rank 1 creates a parameter at its second step, rank 0 does not: before, rank 1 broadcast it
    while rank 0 all-reduced a buffer of another length, and both waited until the gloo timeout."""
    records, _ = runs
    for r in records:
        step, message = r["one_rank_params"]
        assert step == 1 and "new parameters ['extra'] were met on some ranks only (ranks [1] differ" in message


def test_a_model_without_parameters_is_named_on_every_rank(runs):
    for r in runs[0]:
        assert "no rank met any parameter" in r["no_parameters"]


def test_a_model_without_dataset_size_is_refused_with_several_ranks(runs):
    """BayesianMLP's dataset_size=None scales each rank's likelihood by 1: the objective would have
    been NLL / W + KL, silently."""
    records, _ = runs
    for r in records:
        assert "dataset_size=None" in r["no_dataset_size"]


def test_batch_norm_statistics_are_equal_on_every_rank(runs):
    """Each rank's BatchNorm updates its running statistics from its own shard; rank 0's are
    broadcast after every step (DistributedDataParallel's broadcast_buffers), so the replicas agree."""
    records, _ = runs
    a, b = records[0]["bn_buffers"], records[1]["bn_buffers"]
    assert a.keys() == b.keys() and {"net.1.running_mean", "net.1.running_var"} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["net.1.running_mean"], torch.zeros(4))  # they were updated


def test_an_unused_parameter_keeps_its_value_as_under_svi(float64):
    """A parameter that a step's loss does not use gets no gradient, as with SVI and a torch
    optimizer (it had been given a zero gradient, and Adam's momentum moved it on)."""
    def run(step_fn_factory):
        pyro.clear_param_store()
        calls = [0]

        def model(x, y=None):
            loc = pyro.param("a", torch.tensor(0.5))
            if calls[0] < 2:
                loc = loc + pyro.param("b", torch.tensor(0.4))
            with pyro.plate("rows", len(x)):
                pyro.sample("obs", pyro.distributions.Normal(loc, 1.0), obs=y)

        step = step_fn_factory(model)
        values = []
        for calls[0] in range(5):
            step(torch.zeros(4), torch.ones(4))
            values.append(pyro.param("b").item())
        return values

    def svi(model):
        return SVI(model, lambda x, y=None: None, pyro.optim.Adam({"lr": 0.1}), TraceMeanField_ELBO()).step

    def distributed(model):
        return DistributedSVI(model, lambda x, y=None: None, optim_args={"lr": 0.1}).step

    expected, got = run(svi), run(distributed)
    assert expected[2:] == [expected[1]] * 3  # b stays put once unused
    assert got[2:] == [got[1]] * 3


def test_fit_distributed_checkpoint_needs_model():
    m = BayesianMLPRegressor(D, hidden=(H,), dataset_size=N)
    x, y = _data()
    with pytest.raises(ValueError, match="checkpoint_model"):
        fit_distributed(m.model, m.guide, (x.float(), y.float()), epochs=1, checkpoint="unused.pt")


def test_fit_distributed_checkpoint_keeps_an_autoguides_parameters(tmp_path):
    """With an autoguide the checkpoint holds the guide too (it held the model only: an autoguide's
    trained parameters were lost); one process, no process group (rank 0 of 1)."""
    from bnnpyro.infer import AnalyticAutoNormal
    from bnnpyro.nn import BayesianMLP
    from bnnpyro.serialization import make_unique

    x, y = _data()
    pyro.clear_param_store()
    net = BayesianMLP(D, 1, hidden=(H,), dataset_size=N)
    guide = make_unique(AnalyticAutoNormal(net))
    fit_distributed(net, guide, (x.float(), y.float()), epochs=2, batch_size=N, progress=False,
                    checkpoint=tmp_path / "ck.pt", checkpoint_model=net)
    _, loaded = bnnpyro.load(tmp_path / "ck.pt")
    x0 = x.float()
    loaded(x0)  # materialises its parameters
    want, got = guide.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and want
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    with pytest.raises(TypeError, match="cannot save a PyroModule guide"):
        fit_distributed(net, pyro.nn.PyroModule(), (x.float(), y.float()), epochs=1, progress=False,
                        checkpoint=tmp_path / "x.pt", checkpoint_model=net)
