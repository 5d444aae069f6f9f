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
sampling). ``JitTraceMeanField_ELBO`` was tried and was 8-100x *slower* here (it re-traces), so it is
not listed.

Usage: ``python benchmarks/svi_step.py [--threads 1 2] [--repeats 30] [--out ...json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import _common  # noqa: F401  (warns when OMP_WAIT_POLICY=PASSIVE skews the timings)
import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

from bnnpyro.infer import AnalyticAutoNormal
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
            for fn in steps.values():  # warm-up (and JIT compilation)
                for _ in range(3):
                    fn(x, y)
            for _ in range(args.repeats):
                for k, fn in steps.items():
                    t0 = time.perf_counter()
                    fn(x, y)
                    times[k].append(time.perf_counter() - t0)
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            rows.append({"threads": threads, "config": label, "batch": batch, "ms": ms,
                         "ratio": {k: ms[k] / ms["torch"] for k in ms}})
            print(f"threads={threads} {label:<28} batch {batch:>3}: " + "  ".join(
                f"{k} {ms[k]:7.2f} ms ({ms[k] / ms['torch']:.1f}x)" for k in ms), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "pyro": pyro.__version__, "rows": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
