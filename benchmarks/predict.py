"""Posterior predictive: one vectorized pass vs a Python loop vs ``pyro.infer.Predictive``.

S = 100 posterior samples over 10,000 inputs, for the 13-50-1 regressor and the 784-400-400-10
classifier of the catalogue (hand-written local-reparameterization guides). Measured side by side
in one run (interleaved, median of repeats), with peak memory:

* ``vectorized``: ``bnnpyro.sample_predictive`` (one pass under an outer plate of size S, in
  cache-sized chunks of rows; each layer samples with the cheaper exact sampler: local
  reparameterization with moments computed once for all S samples when its inputs are shared and
  wide, one weight draw per sample otherwise);
* ``loop``: a Python loop of S single-sample passes with the same per-pass code
  (``sample_predictive(..., 1)``);
* ``loop (as trained)``: S single-sample passes sampling as in training (``estimator=None``: local
  reparameterization in every layer), what a hand-written prediction loop over the guide does;
* ``Predictive``: ``pyro.infer.Predictive(model, guide=guide, num_samples=S, parallel=False)``.

Usage: ``python benchmarks/predict.py [--num-samples 100] [--inputs 10000] [--chunk-size 500 1000]
[--models regressor classifier] [--repeats 3]``
"""

from __future__ import annotations

import argparse

import pyro
import torch
from _common import interleaved_median_ms, peak_memory_mib, write_json
from pyro.infer import Predictive

from bnnpyro import sample_predictive
from bnnpyro.models import BayesianMLPClassifier, BayesianMLPRegressor


def _passes(m, x: torch.Tensor, S: int, chunk_size, predictive: Predictive) -> dict:
    """The four ways of drawing S predictive samples of ``m``'s output over ``x``."""
    return {
        "vectorized": lambda: sample_predictive(m.model, m.guide, x, S, chunk_size=chunk_size),
        "loop": lambda: [sample_predictive(m.model, m.guide, x, 1) for _ in range(S)],
        "loop (as trained)": lambda: [sample_predictive(m.model, m.guide, x, 1, estimator=None) for _ in range(S)],
        "Predictive": lambda: predictive(x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--chunk-size", type=int, nargs=2, default=[0, 0],
                        help="rows per vectorized pass for the regressor and the classifier "
                             "(0: sample_predictive's default, chunk_size='auto')")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=["regressor", "classifier"], default=["regressor", "classifier"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/predict.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    S, B = args.num_samples, args.inputs
    models = {
        "13-50-1 regressor": (BayesianMLPRegressor(13, hidden=(50,), dataset_size=B), 13, args.chunk_size[0]),
        "784-400-400-10 classifier": (BayesianMLPClassifier(784, 10, hidden=(400, 400), dataset_size=B),
                                      784, args.chunk_size[1]),
    }
    models = {label: spec for label, spec in models.items() if label.split()[-1] in args.models}
    rows, measured = [], []
    for label, (m, d, chunk) in models.items():
        pyro.clear_param_store()
        x = torch.randn(B, d)
        predictive = Predictive(m.model, guide=m.guide, num_samples=S, parallel=False,
                                return_sites=[m.output_site])
        fns = _passes(m, x, S, chunk or "auto", predictive)
        with torch.no_grad():
            ms = interleaved_median_ms(fns, args.repeats)
        row = {"model": label, "S": S, "inputs": B, "chunk_size": chunk or "auto", "ms": ms,
               "speedup_vs_loop": ms["loop"] / ms["vectorized"],
               "speedup_vs_loop_as_trained": ms["loop (as trained)"] / ms["vectorized"],
               "speedup_vs_Predictive": ms["Predictive"] / ms["vectorized"]}
        rows.append(row)
        measured.append(fns)
        print(f"{label:<26} " + "  ".join(f"{k} {ms[k]:8.0f} ms" for k in fns)
              + f"  | vectorized {row['speedup_vs_loop']:.1f}x faster than loop, "
                f"{row['speedup_vs_loop_as_trained']:.1f}x than loop (as trained), "
                f"{row['speedup_vs_Predictive']:.1f}x than Predictive", flush=True)
    # memory after all timings: the measurement changes the allocator's settings for the process
    # (every allocation then mmap-ed, with its page faults), which would slow the later timings
    for row, fns in zip(rows, measured):
        with torch.no_grad():
            row["peak_MiB"] = mem = {k: peak_memory_mib(fn) for k, fn in fns.items()}
        print(f"{row['model']:<26} peak MiB " + "  ".join(f"{k} {mem[k]:.0f}" for k in fns), flush=True)
    write_json(args.out, {"threads": args.threads, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
