"""Training-step time of the Bayesian LSTM on torch's fused kernel vs nn.LSTM and a Python-loop LSTM.

One training step = forward on a ``T x B x D`` batch, ``loss = output.sum()`` (+ KL for the Pyro
path), backward, Adam step. Measured side by side in one run (round-robin, median of repeats):

* ``nn.LSTM``: deterministic ``torch.nn.LSTM`` (the baseline);
* ``fused raw``: weights sampled once per step as ``mu + softplus(rho) * eps`` in plain torch, then
  :func:`bnnpyro.nn.lstm.lstm_forward` (one ``_VF.lstm`` call);
* ``fused raw+kl``: the same plus the closed-form ``KL(N(mu, softplus(rho)^2) || N(0, 1))`` in torch
  (the full Bayes-by-backprop objective with a Normal prior, without Pyro);
* ``fused pyro``: :class:`bnnpyro.nn.lstm.BayesianLSTM` + :class:`bnnpyro.infer.AnalyticAutoNormal`
  + ``TraceMeanField_ELBO``, ``svi.step`` on a model with ``pyro.factor(-output.sum())``: adds
  Pyro's tracing and per-site bookkeeping; the KL is the closed form;
* ``python loop``: weights sampled once per step, then the recurrence written in Python, one
  gate matmul and gate-by-gate nonlinearities per time step (as BLiTZ / illia do).

The Bayesian LSTM follows Fortunato, Blundell, Vinyals (2017), "Bayesian Recurrent Neural Networks".

Usage: ``python benchmarks/lstm.py [--batch 32 --seq 35 --input 200 --hidden 200 --layers 1]
[--repeats 20] [--threads 2] [--out results.json]``
"""

from __future__ import annotations

import argparse
from typing import Callable

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import Tensor, nn

from _common import interleaved_median_ms, write_json

from bnnpyro.infer import AnalyticAutoNormal
from bnnpyro.nn.lstm import BayesianLSTM, lstm_forward

Step = Callable[[], object]


def _variational_params(shapes: list[torch.Size]) -> tuple[list[Tensor], list[Tensor]]:
    """Per weight a mean ``mu`` (small random) and ``rho`` with ``softplus(rho) = 0.01``."""
    mus = [(0.05 * torch.randn(s)).requires_grad_() for s in shapes]
    rhos = [torch.full(s, -4.6).requires_grad_() for s in shapes]
    return mus, rhos


def _sample(mus: list[Tensor], rhos: list[Tensor]) -> list[Tensor]:
    """One reparameterized draw of every weight: ``mu + softplus(rho) * eps``."""
    return [mu + F.softplus(rho) * torch.randn_like(mu) for mu, rho in zip(mus, rhos)]


def _normal_kl(mus: list[Tensor], rhos: list[Tensor]) -> Tensor:
    """``sum KL(N(mu, softplus(rho)^2) || N(0, 1))`` over all weights."""
    kl = 0.0
    for mu, rho in zip(mus, rhos):
        scale = F.softplus(rho)
        kl = kl + (0.5 * (scale**2 + mu**2 - 1.0) - scale.log()).sum()
    return kl


def _train_step(optim: torch.optim.Optimizer, loss_fn: Callable[[], Tensor]) -> Step:
    """zero grads, ``loss_fn().backward()``, optimizer step."""
    def step() -> None:
        optim.zero_grad(set_to_none=True)
        loss_fn().backward()
        optim.step()
    return step


def _loop_lstm(x: Tensor, weights: list[Tensor], num_layers: int, hidden: int) -> Tensor:
    """BLiTZ-style LSTM: ``T x B x D -> T x B x H``, a Python loop over layers and time steps."""
    for layer in range(num_layers):
        w_ih, w_hh, b_ih, b_hh = weights[4 * layer: 4 * layer + 4]
        w_ih_t, w_hh_t, b = w_ih.t(), w_hh.t(), b_ih + b_hh
        h = c = x.new_zeros(x.shape[1], hidden)
        outputs = []
        for x_t in x:
            gates = x_t @ w_ih_t + h @ w_hh_t + b
            i = torch.sigmoid(gates[:, :hidden])
            f = torch.sigmoid(gates[:, hidden:2 * hidden])
            g = torch.tanh(gates[:, 2 * hidden:3 * hidden])
            o = torch.sigmoid(gates[:, 3 * hidden:])
            c = f * c + i * g
            h = o * torch.tanh(c)
            outputs.append(h)
        x = torch.stack(outputs)
    return x


def build_steps(x: Tensor, hidden: int, num_layers: int, lr: float = 1e-3) -> dict[str, Step]:
    """One training-step closure per method, all on the same input ``x`` (``T x B x D``)."""
    steps: dict[str, Step] = {}
    kwargs = dict(num_layers=num_layers, bias=True, batch_first=False, dropout=0.0,
                  training=True, bidirectional=False)

    lstm = nn.LSTM(x.shape[-1], hidden, num_layers)
    opt = torch.optim.Adam(lstm.parameters(), lr=lr)
    steps["nn.LSTM"] = _train_step(opt, lambda: lstm(x)[0].sum())

    shapes = [p.shape for p in lstm.parameters()]
    mus, rhos = _variational_params(shapes)
    opt = torch.optim.Adam(mus + rhos, lr=lr)
    steps["fused raw"] = _train_step(
        opt, lambda: lstm_forward(x, None, _sample(mus, rhos), **kwargs)[0].sum())

    mus_kl, rhos_kl = _variational_params(shapes)
    opt = torch.optim.Adam(mus_kl + rhos_kl, lr=lr)
    steps["fused raw+kl"] = _train_step(
        opt,
        lambda: lstm_forward(x, None, _sample(mus_kl, rhos_kl), **kwargs)[0].sum() + _normal_kl(mus_kl, rhos_kl))

    pyro.clear_param_store()
    bayes = BayesianLSTM(x.shape[-1], hidden, num_layers)

    def model(x: Tensor) -> None:
        pyro.factor("objective", -bayes(x)[0].sum())

    guide = AnalyticAutoNormal(model, init_scale=0.01)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), TraceMeanField_ELBO())
    steps["fused pyro"] = lambda: svi.step(x)

    mus_l, rhos_l = _variational_params(shapes)
    opt = torch.optim.Adam(mus_l + rhos_l, lr=lr)
    steps["python loop"] = _train_step(
        opt, lambda: _loop_lstm(x, _sample(mus_l, rhos_l), num_layers, hidden).sum())

    with torch.no_grad():  # the loop baseline computes the same function as the kernel
        w = _sample(mus_l, rhos_l)
        torch.testing.assert_close(_loop_lstm(x, w, num_layers, hidden), lstm_forward(x, None, w, **kwargs)[0],
                                   rtol=1e-4, atol=1e-5)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=35)
    parser.add_argument("--input", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/lstm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)

    x = torch.randn(args.seq, args.batch, args.input)
    ms = interleaved_median_ms(build_steps(x, args.hidden, args.layers), args.repeats, warmup=2)
    base = ms["nn.LSTM"]
    print(f"T={args.seq} B={args.batch} D={args.input} H={args.hidden} layers={args.layers} "
          f"threads={args.threads} repeats={args.repeats}")
    print(f"{'method':<12} | {'ms/step':>8} | {'x nn.LSTM':>9}")
    print("-" * 36)
    for name, t in ms.items():
        print(f"{name:<12} | {t:>8.2f} | {t / base:>8.2f}x")
    write_json(args.out, {
        "config": vars(args), "torch": torch.__version__, "pyro": pyro.__version__,
        "ms_per_step": ms, "ratio_vs_nn_lstm": {k: v / base for k, v in ms.items()},
    })


if __name__ == "__main__":
    main()
