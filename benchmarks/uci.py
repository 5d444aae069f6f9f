"""The standard UCI regression protocol with the bnnpyro Bayesian MLP regressor.

For each data set and each of its fixed 90/10 splits (Hernández-Lobato & Adams 2015): standardize
with training statistics, train ``BayesianMLPRegressor`` (one hidden layer of ``n_hidden.txt`` = 50
ReLU units, hand-written local-reparameterization guide, ``TraceMeanField_ELBO``), and compute test
RMSE and the average per-point test log-likelihood in the target's original units. Prints the mean
and standard error (std / sqrt(#splits)) beside the published VI (Graves 2011), PBP
(Hernández-Lobato & Adams 2015) and MC-dropout (Gal & Ghahramani 2016) numbers of Gal &
Ghahramani (2016, Table 1), and writes JSON.

Usage::

    python benchmarks/uci.py --root ../shared/data/uci --data yacht energy --splits 20
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import time

import pyro
import torch
from _common import write_json

from bnnpyro.data import list_uci, load_uci, uci_protocol
from bnnpyro.infer import fit
from bnnpyro.models import BayesianMLPRegressor
from bnnpyro.predict import evaluate_regression, sample_predictive

# Gal & Ghahramani (2016), Table 1: (mean, standard error)
PUBLISHED = {
    "bostonHousing": {"rmse": {"VI": (4.32, 0.29), "PBP": (3.01, 0.18), "Dropout": (2.97, 0.19)},
                      "ll": {"VI": (-2.90, 0.07), "PBP": (-2.57, 0.09), "Dropout": (-2.46, 0.06)}},
    "concrete": {"rmse": {"VI": (7.19, 0.12), "PBP": (5.67, 0.09), "Dropout": (5.23, 0.12)},
                 "ll": {"VI": (-3.39, 0.02), "PBP": (-3.16, 0.02), "Dropout": (-3.04, 0.02)}},
    "energy": {"rmse": {"VI": (2.65, 0.08), "PBP": (1.80, 0.05), "Dropout": (1.66, 0.04)},
               "ll": {"VI": (-2.39, 0.03), "PBP": (-2.04, 0.02), "Dropout": (-1.99, 0.02)}},
    "wine-quality-red": {"rmse": {"VI": (0.65, 0.01), "PBP": (0.64, 0.01), "Dropout": (0.62, 0.01)},
                         "ll": {"VI": (-0.98, 0.01), "PBP": (-0.97, 0.01), "Dropout": (-0.93, 0.01)}},
    "yacht": {"rmse": {"VI": (6.89, 0.67), "PBP": (1.02, 0.05), "Dropout": (1.11, 0.09)},
              "ll": {"VI": (-3.43, 0.16), "PBP": (-1.63, 0.02), "Dropout": (-1.55, 0.03)}},
}
DEFAULT_DATA = ["bostonHousing", "concrete", "energy", "wine-quality-red", "yacht"]


def run_split(name: str, split: int, args) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed + split)
    d = load_uci(name, split=split, root=args.root)
    N = len(d.x_train)
    n_hidden = uci_protocol(name, root=args.root)["n_hidden"]
    m = BayesianMLPRegressor(d.x_train.shape[1], hidden=(n_hidden,), dataset_size=N,
                             prior_scale=args.prior_scale, init_scale=args.init_scale)
    steps_per_epoch = math.ceil(N / args.batch_size)
    epochs = max(args.epochs, math.ceil(args.min_steps / steps_per_epoch))
    # Adam with the learning rate decayed by 10x over training
    gamma = 0.1 ** (1.0 / epochs)
    optim = pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": args.lr},
                                      "gamma": gamma})
    t0 = time.perf_counter()
    fit(m.model, m.guide, (d.x_train, d.y_train), epochs=epochs, batch_size=args.batch_size,
        optim=optim, progress=False)
    seconds = time.perf_counter() - t0
    f = sample_predictive(m.model, m.guide, d.x_test, args.num_samples)["f"]
    with torch.no_grad():
        mean, scale = m.mean_and_scale(f)
    metrics = evaluate_regression(mean, scale, d.y_test, y_scale=d.y_scale)
    return {"split": split, "epochs": epochs, "seconds": seconds, **metrics}


def summarize(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    # one split has no standard error: None (JSON null; a NaN would be written as invalid JSON)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return mean, se


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join("..", "shared", "data", "uci"),
                        help="directory of UCI data-set folders (bundled sets are always found)")
    parser.add_argument("--data", nargs="+", default=None, help="data sets (default: the five of Table 1)")
    parser.add_argument("--splits", type=int, default=None, help="number of splits (default: n_splits.txt)")
    parser.add_argument("--first-split", type=int, default=0, help="start at this split (resume a run)")
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--min-steps", type=int, default=8000, help="train at least this many SVI steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--prior-scale", type=float, default=1.0)
    parser.add_argument("--init-scale", type=float, default=1e-2)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/uci.json")
    parser.add_argument("--from-logs", nargs="+", default=None,
                        help="summarize the per-split lines printed by earlier runs instead of training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    available = set(list_uci(args.root))
    names = args.data or [n for n in DEFAULT_DATA if n in available]

    runs_by_name: dict[str, list[dict]] = {}
    if args.from_logs:
        runs_by_name = parse_logs(args.from_logs)
    else:
        for name in names:
            n_splits = args.splits or uci_protocol(name, root=args.root)["n_splits"]
            runs = runs_by_name.setdefault(name, [])
            for split in range(args.first_split, n_splits):
                runs.append(run_split(name, split, args))
                r = runs[-1]
                print(f"  {name} split {split}: RMSE {r['rmse']:.3f}  LL {r['log_likelihood']:.3f}  "
                      f"coverage {r['coverage']:.3f}  ({r['seconds']:.0f} s)", flush=True)
                report(runs_by_name, args, quiet=True)  # partial results survive an interruption
    report(runs_by_name, args)


LOG_LINE = re.compile(r"^\s*(\S+) split (\d+): RMSE ([\d.]+)\s+LL (-?[\d.]+)\s+coverage ([\d.]+)\s+\((\d+) s\)")


def parse_logs(paths: list[str]) -> dict[str, list[dict]]:
    """Per-split lines of earlier runs' printed output (e.g. several processes), by data set."""
    runs: dict[str, dict[int, dict]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                m = LOG_LINE.match(line)
                if m:
                    name, split = m.group(1), int(m.group(2))
                    runs.setdefault(name, {})[split] = {
                        "split": split, "rmse": float(m.group(3)), "log_likelihood": float(m.group(4)),
                        "coverage": float(m.group(5)), "seconds": float(m.group(6)),
                    }
    return {name: [by_split[k] for k in sorted(by_split)] for name, by_split in runs.items()}


def report(runs_by_name: dict[str, list[dict]], args, quiet: bool = False) -> None:
    results = {}
    for name, runs in runs_by_name.items():
        results[name] = {
            "splits": len(runs),
            "rmse": summarize([r["rmse"] for r in runs]),
            "log_likelihood": summarize([r["log_likelihood"] for r in runs]),
            "coverage": summarize([r["coverage"] for r in runs]),
            "runs": runs,
        }
    if quiet:
        write_json(args.out, {"args": vars(args), "published": PUBLISHED, "results": results}, verbose=False)
        return
    print()
    head = f"{'data set':<18}{'splits':>7} | {'RMSE bnnpyro':>15} {'VI':>6} {'PBP':>6} {'Drop':>6} | " \
           f"{'LL bnnpyro':>15} {'VI':>6} {'PBP':>6} {'Drop':>6} | LL beats VI / PBP"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        pub = PUBLISHED.get(name)
        rm, rs = r["rmse"]
        lm, ls = r["log_likelihood"]
        if pub:
            cols_r = " ".join(f"{pub['rmse'][k][0]:>6.2f}" for k in ("VI", "PBP", "Dropout"))
            cols_l = " ".join(f"{pub['ll'][k][0]:>6.2f}" for k in ("VI", "PBP", "Dropout"))
            # the published numbers have two decimals: compare at that precision
            beats = f"{'yes' if round(lm, 2) > pub['ll']['VI'][0] else 'no'} / {'yes' if round(lm, 2) >= pub['ll']['PBP'][0] else 'no'}"
            r["beats_vi_ll"] = round(lm, 2) > pub["ll"]["VI"][0]
            r["matches_or_beats_pbp_ll"] = round(lm, 2) >= pub["ll"]["PBP"][0]
        else:
            cols_r = cols_l = " ".join(f"{'-':>6}" for _ in range(3))
            beats = "-"
        rs, ls = (f"{se:>5.2f}" if se is not None else f"{'-':>5}" for se in (rs, ls))
        print(f"{name:<18}{r['splits']:>7} | {rm:>8.2f} ±{rs} {cols_r} | {lm:>8.2f} ±{ls} {cols_l} | {beats}")
    write_json(args.out, {"args": vars(args), "published": PUBLISHED, "results": results})


if __name__ == "__main__":
    main()
