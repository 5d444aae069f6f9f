"""Training-step time of the Bayesian LSTM on torch's fused kernel vs nn.LSTM and a Python-loop LSTM.

(a) **The layer alone.** One training step = forward on a ``T x B x D`` batch, ``loss = output.sum()``
(+ KL for the Pyro path), backward, Adam step. Measured side by side in one run (round-robin, median
of repeats):

* ``nn.LSTM``: deterministic ``torch.nn.LSTM`` (the baseline);
* ``fused raw``: weights sampled once per step as ``mu + softplus(rho) * eps`` in plain torch, then
  :func:`bnnpyro.nn.lstm.lstm_forward` (one ``_VF.lstm`` call);
* ``fused raw+kl``: the same plus the closed-form ``KL(N(mu, softplus(rho)^2) || N(0, 1))`` in torch
  (the full Bayes-by-backprop objective with a Normal prior, without Pyro);
* ``fused pyro``: :class:`bnnpyro.nn.lstm.BayesianLSTM` + :class:`bnnpyro.infer.AnalyticAutoNormal`
  + ``TraceMeanField_ELBO``, ``svi.step`` on a model with ``pyro.factor(-output.sum())``: adds
  Pyro's tracing and per-site bookkeeping; the KL is the closed form;
* ``fused pyro noval``: the same steps (same parameters) with Pyro's argument validation off;
* ``python loop``: weights sampled once per step, then the recurrence written in Python, one
  gate matmul and gate-by-gate nonlinearities per time step (as BLiTZ / illia do);
* ``flipout raw``: :func:`bnnpyro.nn.lstm.lstm_flipout_forward` around ``mu`` with perturbation
  ``softplus(rho) * eps`` (Wen et al. 2018, signs per sequence fixed across time): a Python loop
  over time steps with two ``4H``-wide matmuls per weight per step.

(b) **The whole language model**, ``B x T`` token ids, vocabulary ``V``, embedding = hidden size:

* ``LM nn.LSTM``: deterministic ``nn.Embedding + nn.LSTM + nn.Linear``, ``F.cross_entropy``, Adam;
* ``LM fused``: :class:`bnnpyro.models.BayesianLSTMLanguageModel` (defaults), ``svi.step`` with
  ``TraceMeanField_ELBO``: embedding, LSTM and output weights drawn once per step (the paper's
  scheme, ``output_estimator="weight_space"``), fused kernel;
* ``LM fused, LR out``: the same with ``output_estimator="local_reparameterization"``: the ``V``-way
  output layer a :class:`~bnnpyro.distributions.HiddenLayer`, logits drawn per position;
* ``LM flipout, LR out``: that with ``estimator="flipout"``;
* ``LM loop, LR out``: ``LM fused, LR out`` with the guide's LSTM recurrence replaced by ``python loop``.

(c) **The output layer alone** (its ``(B*T) x (H+1)`` input, ``V`` outputs), forward + backward of
``out.sum()``: ``out nn.Linear`` (``X @ W``) vs ``out HiddenLayer`` (``X @ M`` plus noise times
``sqrt(X^2 @ softplus(rho)^2)``, softplus included) vs ``out two matmuls`` (``X @ M + sqrt(X^2 @ S^2)``
without noise, the floor of the local reparameterization) vs ``out weight space`` (one weight draw,
``X @ (M + softplus(rho) * eps)``).

The Bayesian LSTM follows Fortunato, Blundell, Vinyals (2017), "Bayesian Recurrent Neural Networks".

Usage: ``python benchmarks/lstm.py [--batch 32 --seq 35 --input 200 --hidden 200 --layers 1
--vocab 10000] [--repeats 20] [--threads 2] [--out results.json]``
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Callable

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import Tensor, nn

from _common import interleaved_median_ms, write_json

from bnnpyro.distributions import HiddenLayer
from bnnpyro.infer import AnalyticAutoNormal
from bnnpyro.models import BayesianLSTMLanguageModel
from bnnpyro.nn.activations import identity
from bnnpyro.nn.lstm import BayesianLSTM, lstm_flipout_forward, lstm_forward

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

    def step_without_validation() -> None:
        with pyro.validation_enabled(False):
            svi.step(x)

    steps["fused pyro noval"] = step_without_validation

    mus_l, rhos_l = _variational_params(shapes)
    opt = torch.optim.Adam(mus_l + rhos_l, lr=lr)
    steps["python loop"] = _train_step(
        opt, lambda: _loop_lstm(x, _sample(mus_l, rhos_l), num_layers, hidden).sum())

    mus_f, rhos_f = _variational_params(shapes)
    opt = torch.optim.Adam(mus_f + rhos_f, lr=lr)
    flipout_kwargs = dict(num_layers=num_layers, bias=True, batch_first=False)
    steps["flipout raw"] = _train_step(
        opt, lambda: lstm_flipout_forward(
            x, None, mus_f, [F.softplus(r) * torch.randn_like(r) for r in rhos_f], **flipout_kwargs)[0].sum())

    with torch.no_grad():  # the loop baseline computes the same function as the kernel
        w = _sample(mus_l, rhos_l)
        torch.testing.assert_close(_loop_lstm(x, w, num_layers, hidden), lstm_forward(x, None, w, **kwargs)[0],
                                   rtol=1e-4, atol=1e-5)
    return steps


class _LoopLanguageModel(BayesianLSTMLanguageModel):
    """:class:`BayesianLSTMLanguageModel` whose guide runs the LSTM as :func:`_loop_lstm` (one weight draw)."""

    def _guide_outputs(self, x: Tensor) -> Tensor:
        weights = self.posterior.sample()
        inputs = F.embedding(x, weights["embedding.weight"]).transpose(0, 1)
        flat = [weights[f"lstm.{name}"] for name in self.encoder.lstm.weight_shapes]
        return _loop_lstm(inputs, flat, self.encoder.lstm.num_layers, self.hidden_size).transpose(0, 1)


def build_lm_steps(x: Tensor, y: Tensor, vocab: int, embedding: int, hidden: int, num_layers: int,
                   dataset_size: int, lr: float = 1e-3) -> dict[str, Step]:
    """One training-step closure per language model, on ``B x T`` token ids ``x`` and targets ``y``."""
    steps: dict[str, Step] = {}
    emb, lstm, out = nn.Embedding(vocab, embedding), nn.LSTM(embedding, hidden, num_layers, batch_first=True), \
        nn.Linear(hidden, vocab)
    opt = torch.optim.Adam([*emb.parameters(), *lstm.parameters(), *out.parameters()], lr=lr)
    steps["LM nn.LSTM"] = _train_step(
        opt, lambda: F.cross_entropy(out(lstm(emb(x))[0]).reshape(-1, vocab), y.reshape(-1), reduction="sum"))

    for name, cls, estimator, output in (
            ("LM fused", BayesianLSTMLanguageModel, "weight_space", "weight_space"),
            ("LM fused, LR out", BayesianLSTMLanguageModel, "weight_space", "local_reparameterization"),
            ("LM flipout, LR out", BayesianLSTMLanguageModel, "flipout", "local_reparameterization"),
            ("LM loop, LR out", _LoopLanguageModel, "weight_space", "local_reparameterization")):
        m = cls(vocab, embedding, hidden, num_layers, dataset_size=dataset_size, estimator=estimator,
                output_estimator=output)
        svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": lr}), TraceMeanField_ELBO())
        steps[name] = partial(svi.step, x, y)
    return steps


def build_output_layer_steps(rows: int, hidden: int, vocab: int) -> dict[str, Step]:
    """Forward + backward of the ``vocab``-way output layer alone on ``rows x (hidden + 1)`` inputs."""
    X = torch.randn(rows, hidden + 1, requires_grad=True)
    W = (0.05 * torch.randn(hidden + 1, vocab)).requires_grad_()
    rho = torch.full((hidden + 1, vocab), -4.6, requires_grad=True)

    def linear() -> None:
        (X @ W).sum().backward()

    def hidden_layer() -> None:
        layer = HiddenLayer(X, W, F.softplus(rho), non_linearity=identity, include_hidden_bias=False)
        layer.rsample().sum().backward()

    def weight_space() -> None:
        (X @ (W + F.softplus(rho) * torch.randn_like(W))).sum().backward()

    def two_matmuls() -> None:
        scale = F.softplus(rho)
        (X @ W + ((X * X) @ (scale * scale)).sqrt()).sum().backward()

    return {"out nn.Linear": linear, "out HiddenLayer": hidden_layer, "out two matmuls": two_matmuls,
            "out weight space": weight_space}


def _print_table(title: str, ms: dict[str, float], base: str) -> None:
    print(f"\n{title}")
    print(f"{'method':<20} | {'ms/step':>8} | {'x ' + base:>16}")
    print("-" * 50)
    for name, t in ms.items():
        print(f"{name:<20} | {t:>8.2f} | {t / ms[base]:>15.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=35)
    parser.add_argument("--input", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--dataset-size", type=int, default=26_560,
                        help="N of the language model (PTB's 929k training tokens / 35)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/lstm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)

    x = torch.randn(args.seq, args.batch, args.input)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    steps = build_steps(x, args.hidden, args.layers)
    lm_steps = build_lm_steps(tokens[:, :-1], tokens[:, 1:], args.vocab, args.input, args.hidden, args.layers,
                              args.dataset_size)
    out_steps = build_output_layer_steps(args.batch * args.seq, args.hidden, args.vocab)
    ms = interleaved_median_ms({**steps, **lm_steps, **out_steps}, args.repeats, warmup=2)
    print(f"T={args.seq} B={args.batch} D=E={args.input} H={args.hidden} V={args.vocab} layers={args.layers} "
          f"threads={args.threads} repeats={args.repeats}")
    layer = {k: ms[k] for k in steps}
    lm = {k: ms[k] for k in lm_steps}
    out = {k: ms[k] for k in out_steps}
    _print_table("(a) the LSTM layer alone", layer, "nn.LSTM")
    _print_table("(b) the whole language model", lm, "LM nn.LSTM")
    _print_table("(c) the output layer alone", out, "out nn.Linear")
    write_json(args.out, {
        "config": vars(args), "torch": torch.__version__, "pyro": pyro.__version__,
        "ms_per_step": layer, "ratio_vs_nn_lstm": {k: v / layer["nn.LSTM"] for k, v in layer.items()},
        "lm_ms_per_step": lm, "lm_ratio_vs_nn_lstm": {k: v / lm["LM nn.LSTM"] for k, v in lm.items()},
        "output_layer_ms": out, "output_layer_ratio_vs_linear": {k: v / out["out nn.Linear"] for k, v in out.items()},
    })


if __name__ == "__main__":
    main()
