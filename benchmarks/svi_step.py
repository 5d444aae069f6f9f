"""Milliseconds per SVI step of the catalogue models vs a deterministic torch MLP.

One step = one ELBO particle, backward, Adam update. Configurations (side by side in one run,
interleaved, median of repeats), for each thread count:

* 13-50-1 regressor, batch 32;
* 784-400-400-10 classifier, batch 128;
* 784-1200-1200-10 classifier, batch 128.

Columns: ``torch`` (deterministic ``nn.Sequential`` + ``torch.optim.Adam``, MSE/cross-entropy),
``hand`` (catalogue model, hand-written local-reparameterization guide, ``TraceMeanField_ELBO``),
``hand-noval`` (the same with Pyro's argument validation off, ``pyro.enable_validation(False)``),
``autonormal`` (``bnnpyro.nn.BayesianMLP`` with ``bnnpyro.infer.AnalyticAutoNormal``, weight-space
sampling), and ``pyro-floor``: Pyro's own per-step cost for the catalogue model's structure with no
network (the same subsampled plate, one latent ``Normal`` site per layer, the same likelihood family
and the same number of parameters, all scalars; ``TraceMeanField_ELBO``, analytic KL, Adam), what no
trimming of the network can remove. ``hand-jit`` and ``autonormal-jit``: the same models with
``bnnpyro.infer.JitTraceMeanField_ELBO``, the loss compiled once by ``torch.jit.trace`` (Pyro's own
``JitTraceMeanField_ELBO`` traces again at every step and is 10x slower than no JIT here); they
run the recorded graph without Pyro's per-step tracing, so they can go below ``pyro-floor``.
``hand-jit-torchopt`` and ``autonormal-jit-torchopt``: the same compiled losses in the plain PyTorch
loop that Pyro's docs give for custom training (``loss = elbo.differentiable_loss(model, guide, x,
y)``, ``loss.backward()``, ``opt.step()``), with one ``torch.optim.Adam`` over all the model's and
guide's parameters, as in the ``torch`` column. ``SVI.step`` with ``pyro.optim.Adam`` computes the
same update (``tests/test_torch_optim.py``), but through one Adam instance per parameter and a
``param_only`` trace to collect them, and it zeroes each gradient by allocating a new tensor.

Each column also reports the minor page faults per step (``getrusage``): glibc returns freed
memory above its thresholds to the OS and faults it back in on the next allocation, which can cost
a large step several milliseconds; set ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
(or use jemalloc/tcmalloc, as PyTorch's CPU tuning guide advises) to measure without them.

Usage: ``python benchmarks/svi_step.py [--threads 1 2] [--repeats 30] [--out ...json]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import warnings

import _common  # noqa: F401  (warns when OMP_WAIT_POLICY=PASSIVE skews the timings)
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

from bnnpyro.infer import AnalyticAutoNormal, JitTraceMeanField_ELBO
from bnnpyro.models import BayesianMLPClassifier, BayesianMLPRegressor
from bnnpyro.nn import BayesianMLP

CONFIGS = [
    ("13-50-1 regressor", 13, (50,), 1, 32),
    ("784-400-400-10 classifier", 784, (400, 400), 10, 128),
    ("784-1200-1200-10 classifier", 784, (1200, 1200), 10, 128),
]


def _torch_step(sizes, regression):
    layers = []
    for d, h in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(d, h), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.MSELoss() if regression else nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad()
        out = net(x)
        loss = loss_fn(out.squeeze(-1), y) if regression else loss_fn(out, y)
        loss.backward()
        opt.step()

    return step


def _svi_step(model, guide, elbo):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    return lambda x, y: svi.step(x, y)


def _torch_optim_step(model, guide, elbo, modules):
    """``elbo.differentiable_loss`` + ``backward`` + one ``torch.optim.Adam`` over the parameters of
    ``modules``, created at the first step (an autoguide creates its parameters on its first call)."""
    opt = None

    def step(x, y):
        nonlocal opt
        if opt is None:
            elbo.differentiable_loss(model, guide, x, y)
            opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=1e-3)
        opt.zero_grad()
        elbo.differentiable_loss(model, guide, x, y).backward()
        opt.step()

    return step


def _pyro_floor(num_layers: int, num_params: int, regression: bool, num_classes: int, N: int):
    """Model and guide with the catalogue model's sites and parameter count but no network."""

    def model(x, y):
        with pyro.plate("data", N, subsample=torch.arange(x.size(0))):
            for layer in range(num_layers):
                pyro.sample(f"layer{layer}", dist.Normal(x.new_zeros(x.size(0)), 1.0))
            likelihood = (dist.Normal(x.new_zeros(x.size(0)), 1.0) if regression
                          else dist.Categorical(logits=x.new_zeros(x.size(0), num_classes)))
            pyro.sample("y", likelihood, obs=y)

    def guide(x, y):
        params = [pyro.param(f"floor_{i}", torch.zeros(())) for i in range(num_params)]
        with pyro.plate("data", N, subsample=torch.arange(x.size(0))):
            for layer in range(num_layers):
                loc, rho = params[(2 * layer) % num_params], params[(2 * layer + 1) % num_params]
                pyro.sample(f"layer{layer}", dist.Normal(loc.expand(x.size(0)), F.softplus(rho).expand(x.size(0))))

    return model, guide


def make_steps(in_features, hidden, out, regression, N=60000):
    sizes = (in_features, *hidden, out)
    steps = {"torch": _torch_step(sizes, regression)}
    cls = BayesianMLPRegressor if regression else BayesianMLPClassifier
    m = cls(in_features, out, hidden=hidden, dataset_size=N)
    steps["hand"] = _svi_step(m.model, m.guide, TraceMeanField_ELBO())
    m = cls(in_features, out, hidden=hidden, dataset_size=N)
    step = _svi_step(m.model, m.guide, TraceMeanField_ELBO())

    def step_no_validation(x, y, step=step):
        with pyro.validation_enabled(False):
            return step(x, y)

    steps["hand-noval"] = step_no_validation
    net = BayesianMLP(in_features, out, hidden=hidden, dataset_size=N,
                      likelihood="regression" if regression else "classification")
    steps["autonormal"] = _svi_step(net, AnalyticAutoNormal(net), TraceMeanField_ELBO())
    m_jit = cls(in_features, out, hidden=hidden, dataset_size=N)
    steps["hand-jit"] = _svi_step(m_jit.model, m_jit.guide, JitTraceMeanField_ELBO())
    net = BayesianMLP(in_features, out, hidden=hidden, dataset_size=N,
                      likelihood="regression" if regression else "classification")
    steps["autonormal-jit"] = _svi_step(net, AnalyticAutoNormal(net), JitTraceMeanField_ELBO())
    m_opt = cls(in_features, out, hidden=hidden, dataset_size=N)
    steps["hand-jit-torchopt"] = _torch_optim_step(m_opt.model, m_opt.guide, JitTraceMeanField_ELBO(), [m_opt])
    net = BayesianMLP(in_features, out, hidden=hidden, dataset_size=N,
                      likelihood="regression" if regression else "classification")
    guide = AnalyticAutoNormal(net)
    steps["autonormal-jit-torchopt"] = _torch_optim_step(net, guide, JitTraceMeanField_ELBO(), [net, guide])
    num_params = sum(1 for _ in m.parameters())
    steps["pyro-floor"] = _svi_step(*_pyro_floor(m.num_layers, num_params, regression, out, N), TraceMeanField_ELBO())
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/svi_step.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, d, hidden, out, batch in CONFIGS:
            pyro.clear_param_store()
            regression = out == 1
            x = torch.randn(batch, d)
            y = torch.randn(batch) if regression else torch.randint(0, out, (batch,))
            steps = make_steps(d, hidden, out, regression)
            times = {k: [] for k in steps}
            faults = dict.fromkeys(steps, 0)
            for fn in steps.values():  # warm-up (a compiled graph is optimized after its first runs)
                for _ in range(5):
                    fn(x, y)
            for _ in range(args.repeats):
                for k, fn in steps.items():
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = time.perf_counter()
                    fn(x, y)
                    times[k].append(time.perf_counter() - t0)
                    faults[k] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            faults = {k: v / args.repeats for k, v in faults.items()}
            rows.append({"threads": threads, "config": label, "batch": batch, "ms": ms,
                         "ratio": {k: ms[k] / ms["torch"] for k in ms}, "page_faults_per_step": faults})
            print(f"threads={threads} {label:<28} batch {batch:>3}: " + "  ".join(
                f"{k} {ms[k]:6.2f} ms ({ms[k] / ms['torch']:.1f}x, {faults[k]:.0f} pf)" for k in ms), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
            json.dump({"torch": torch.__version__, "pyro": pyro.__version__, "malloc_env": malloc, "rows": rows},
                      f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
