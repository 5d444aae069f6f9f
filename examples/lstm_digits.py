"""Bayesian LSTM classifier (Fortunato et al., 2017) on scikit-learn's 8x8 digits read row by row
(8 time steps of 8 pixels): accuracy, NLL, ECE, and the mutual information of in-distribution test
sequences vs out-of-distribution ones (rows shuffled, rows reversed, uniform noise) with its AUROC.

    python examples/lstm_digits.py --epochs 20 --plot lstm_digits.png
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
from bnnpyro.data import load_classification  # noqa: E402
from bnnpyro.distributions import Prior  # noqa: E402
from bnnpyro.models.lstm import BayesianLSTMClassifier  # noqa: E402
from bnnpyro.predict.metrics import accuracy, auroc, expected_calibration_error, nll  # noqa: E402
from bnnpyro.predict.plots import plot_uncertainty_histogram  # noqa: E402


def ood_sequences(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Out-of-distribution versions of ``B x 8 x 8`` row sequences."""
    g = torch.Generator().manual_seed(seed)
    return {
        "rows_shuffled": torch.stack([image[torch.randperm(8, generator=g)] for image in x]),
        "rows_reversed": x.flip(1),
        "uniform_noise": torch.rand(x.shape, generator=g),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive(int), default=20)
    parser.add_argument("--hidden-size", type=positive(int), default=32)
    parser.add_argument("--batch-size", type=positive(int), default=64)
    parser.add_argument("--lr", type=positive(float), default=1e-2)
    parser.add_argument("--prior", choices=["normal", "scale_mixture"], default="normal",
                        help="prior of the LSTM weights (scale_mixture: the paper's, Monte Carlo KL)")
    parser.add_argument("--num-predictions", type=positive(int), default=30, help="posterior weight draws per prediction")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--threads", type=positive(int), default=1, help="torch CPU threads")
    parser.add_argument("--plot", type=output_path, default="", help="output figure path ('' to skip)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    d = load_classification("digits", seed=args.seed)
    x_train, x_test = d.x_train.view(-1, 8, 8), d.x_test.view(-1, 8, 8)
    m = BayesianLSTMClassifier(num_classes=d.num_classes, hidden_size=args.hidden_size, dataset_size=len(x_train),
                               input_size=8, prior=Prior(kind=args.prior))
    history = fit(m.model, m.guide, (x_train, d.y_train), epochs=args.epochs, batch_size=args.batch_size,
                  optim=pyro.optim.Adam({"lr": args.lr}), seed=args.seed, progress=False)

    S = args.num_predictions
    probs = m.predict(x_test, S)
    mi_in = m.uncertainty(x_test, S)["mutual_information"]
    metrics = {
        "accuracy": accuracy(probs, d.y_test).item(),
        "nll": nll(probs, d.y_test).item(),
        "ece": expected_calibration_error(probs, d.y_test).item(),
        "mi_in": mi_in.mean().item(),
    }
    mi_ood = {}
    for name, x_ood in ood_sequences(x_test, args.seed).items():
        mi_ood[name] = m.uncertainty(x_ood, S)["mutual_information"]
        metrics[f"mi_{name}"] = mi_ood[name].mean().item()
        metrics[f"auroc_mi_{name}"] = auroc(mi_in, mi_ood[name]).item()
    for k, v in metrics.items():
        print(f"{k:<24} {v:.4f}")

    if args.plot:
        fig, axes = plt.subplots(1, 1 + len(mi_ood), figsize=(4.5 * (1 + len(mi_ood)), 3.8))
        axes[0].plot(range(1, args.epochs + 1), history.loss)
        axes[0].set(xlabel="epoch", ylabel="-ELBO per sequence", yscale="log", title="training")
        for ax, (name, mi) in zip(axes[1:], mi_ood.items()):
            plot_uncertainty_histogram(mi_in, mi, ax=ax, label=f"mutual information (OOD: {name})")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return metrics


if __name__ == "__main__":
    main()
