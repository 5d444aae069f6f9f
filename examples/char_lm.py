"""Bayesian LSTM character language model (Fortunato et al., 2017) on Tiny Shakespeare: held-out
per-character perplexity of the posterior-predictive mean, and a sample of generated text.

Trains on the first 90% of the bundled ~200 KB excerpt (``--full``: the 1.1 MB corpus from the shared
data folder) in non-overlapping sequences of ``--seq-len`` characters; the last 10% is held out.

    python examples/char_lm.py --epochs 1 --plot char_lm.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from bnnpyro import fit  # noqa: E402
from bnnpyro.cli import output_path, positive, seed  # noqa: E402
from bnnpyro.data.text import CharVocab, char_lm_batches, load_text  # noqa: E402
from bnnpyro.distributions import Prior  # noqa: E402
from bnnpyro.models.lstm import BayesianLSTMLanguageModel  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive(int), default=3)
    parser.add_argument("--max-sequences", type=positive(int), default=None,
                        help="train on the first this many training sequences only (quick runs)")
    parser.add_argument("--seq-len", type=positive(int), default=35)
    parser.add_argument("--embedding-dim", type=positive(int), default=32)
    parser.add_argument("--hidden-size", type=positive(int), default=128)
    parser.add_argument("--num-layers", type=positive(int), default=2)
    parser.add_argument("--batch-size", type=positive(int), default=32)
    parser.add_argument("--lr", type=positive(float), default=5e-3)
    parser.add_argument("--prior", choices=["normal", "scale_mixture"], default="normal",
                        help="prior of the LSTM and embedding weights (scale_mixture: the paper's, Monte Carlo KL)")
    parser.add_argument("--num-predictions", type=positive(int), default=10, help="posterior weight draws for the perplexity")
    parser.add_argument("--full", action="store_true", help="the full 1.1 MB Tiny Shakespeare from the shared data")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--generate", type=int, default=200, help="characters to generate")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--threads", type=positive(int), default=1, help="torch CPU threads")
    parser.add_argument("--plot", type=output_path, default="", help="output figure path ('' to skip)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    text = load_text(name="tinyshakespeare" if args.full else "tinyshakespeare_excerpt")
    vocab = CharVocab(text)
    x, y = char_lm_batches(text, vocab, args.seq_len, "train")
    x, y = x[: args.max_sequences], y[: args.max_sequences]
    x_val, y_val = char_lm_batches(text, vocab, args.seq_len, "valid")
    print(f"{len(vocab)} characters, {len(x)} training and {len(x_val)} held-out sequences of {args.seq_len}")

    m = BayesianLSTMLanguageModel(len(vocab), args.embedding_dim, args.hidden_size, args.num_layers,
                                  dataset_size=len(x), prior=Prior(kind=args.prior))
    S = args.num_predictions
    metrics = {"val_perplexity_init": m.perplexity(x_val, y_val, S).item()}
    history = fit(m.model, m.guide, (x, y), epochs=args.epochs, batch_size=args.batch_size,
                  optim=pyro.optim.Adam({"lr": args.lr}), seed=args.seed, progress=False,
                  validation_fn=lambda epoch: m.perplexity(x_val, y_val, S).item())
    metrics["val_perplexity"] = history.validation[-1]
    metrics["train_perplexity"] = m.perplexity(x[: len(x_val)], y[: len(x_val)], S).item()
    for k, v in metrics.items():
        print(f"{k:<20} {v:.3f}")
    generated = vocab.decode(m.generate(vocab.encode(args.prompt), args.generate))
    print(f"--- sample (one posterior draw) ---\n{args.prompt}{generated}")

    if args.plot:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        epochs = range(1, args.epochs + 1)
        a1.plot(epochs, [v / args.seq_len for v in history.loss], "o-")
        a1.set(xlabel="epoch", ylabel="-ELBO per character (incl. KL)", title="training")
        a2.plot(range(args.epochs + 1), [metrics["val_perplexity_init"], *history.validation], "o-")
        a2.set(xlabel="epoch", ylabel="held-out perplexity", yscale="log", title=f"posterior predictive, S={S}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return metrics


if __name__ == "__main__":
    main()
