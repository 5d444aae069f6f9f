"""Forward+backward time and peak memory of one Bayesian layer vs a deterministic layer.

Compared side by side in one run, B = 128 and D = H in {256, 1024, 2048}:

* ``linear``: deterministic ``F.linear`` (the baseline);
* ``bnnpyro``: :class:`bnnpyro.HiddenLayer` rsample (local reparameterization, two matmuls),
  with ``A_scale`` itself the trained leaf tensor;
* ``bnnpyro+softplus``: the same with the usual ``A_scale = softplus(A_rho)`` parameterization
  (one more ``D x H`` elementwise pass forward and backward);
* ``contrib``: pyro.contrib.bnn's variance formula ``((X**2)[..., None] * A_scale**2).sum(-2)``
  (a ``B x D x H`` intermediate).

Peak memory is the peak resident memory added by one forward+backward (measured in this process
after all timings, see ``benchmarks/_common.peak_memory_mib``); parameters and inputs, allocated
before, are not counted.

Usage: ``python benchmarks/hidden_layer.py [--sizes 256 1024 2048] [--out results.json]``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _common import interleaved_median_ms, peak_memory_mib, write_json

from bnnpyro import HiddenLayer


def _linear(X, A_mean, A_rho):
    return F.linear(X, A_mean.t())


def _bnnpyro(X, A_mean, A_scale):
    return HiddenLayer(X, A_mean, A_scale, non_linearity=lambda t: t,
                       include_hidden_bias=False, validate_args=False).rsample()


def _bnnpyro_softplus(X, A_mean, A_rho):
    return _bnnpyro(X, A_mean, F.softplus(A_rho))


def _contrib(X, A_mean, A_rho):
    mean = X @ A_mean
    std = ((X**2).unsqueeze(-1) * F.softplus(A_rho) ** 2).sum(-2).sqrt()
    return mean + torch.randn_like(mean) * std


METHODS = {
    "linear": _linear,
    "bnnpyro": _bnnpyro,
    "bnnpyro+softplus": _bnnpyro_softplus,
    "contrib": _contrib,
}


def _step(fn, X, A_mean, A_rho):
    A_mean.grad = A_rho.grad = None
    fn(X, A_mean, A_rho).pow(2).mean().backward()


def _memory(fn, X, A_mean, A_rho) -> float:
    """Peak memory of one step, gradients included (freed before the measurement starts)."""
    A_mean.grad = A_rho.grad = None
    return peak_memory_mib(lambda: fn(X, A_mean, A_rho).pow(2).mean().backward())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/hidden_layer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows, tensors = [], []
    for size in args.sizes:
        X = torch.randn(args.batch, size)
        A_mean = (0.01 * torch.randn(size, size)).requires_grad_()
        # the same leaf serves as A_scale (bnnpyro) or A_rho (softplus, contrib)
        A_rho = torch.full((size, size), 0.01, requires_grad=True)
        steps = {name: (lambda fn=fn: _step(fn, X, A_mean, A_rho)) for name, fn in METHODS.items()}
        rows.append({"B": args.batch, "D=H": size, "ms": interleaved_median_ms(steps, args.repeats)})
        tensors.append((X, A_mean, A_rho))
    # memory after all timings: the measurement changes the allocator's settings for the process
    for row, (X, A_mean, A_rho) in zip(rows, tensors):
        row["peak_MiB"] = {name: _memory(fn, X, A_mean, A_rho) for name, fn in METHODS.items()}

    header = f"{'B':>4} {'D=H':>5} | " + " ".join(f"{n + ' ms':>{len(n) + 3}}" for n in METHODS) + " | " + \
        " ".join(f"{n + ' MiB':>{len(n) + 4}}" for n in METHODS) + " | bnnpyro/linear time, mem (+softplus)"
    print(header)
    print("-" * len(header))
    for r in rows:
        t_ratio = r["ms"]["bnnpyro"] / r["ms"]["linear"]
        base_mem = max(r["peak_MiB"]["linear"], 1e-2)  # RSS resolution: a few pages
        m_ratio = r["peak_MiB"]["bnnpyro"] / base_mem
        t_sp = r["ms"]["bnnpyro+softplus"] / r["ms"]["linear"]
        m_sp = r["peak_MiB"]["bnnpyro+softplus"] / base_mem
        print(f"{r['B']:>4} {r['D=H']:>5} | " + " ".join(f"{r['ms'][n]:>{len(n) + 3}.2f}" for n in METHODS)
              + " | " + " ".join(f"{r['peak_MiB'][n]:>{len(n) + 4}.1f}" for n in METHODS)
              + f" | {t_ratio:.2f}x, {m_ratio:.2f}x ({t_sp:.2f}x, {m_sp:.2f}x)")
        r["time_ratio_bnnpyro_vs_linear"] = t_ratio
        r["memory_ratio_bnnpyro_vs_linear"] = m_ratio
        r["time_ratio_softplus_vs_linear"] = t_sp
        r["memory_ratio_softplus_vs_linear"] = m_sp
    write_json(args.out, {"threads": args.threads, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
