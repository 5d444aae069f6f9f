"""Bayesian MLP classifier on scikit-learn's 8x8 digits: accuracy, NLL, ECE, reliability diagram,
and epistemic uncertainty (mutual information) of in- vs out-of-distribution inputs.

    python examples/mlp_classification.py --epochs 50 --plot digits_reliability.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from bnnpyro import fit, sample_predictive  # noqa: E402
from bnnpyro.cli import output_path, positive, seed  # noqa: E402
from bnnpyro.data import load_classification  # noqa: E402
from bnnpyro.models import BayesianMLPClassifier  # noqa: E402
from bnnpyro.predict import (  # noqa: E402
    evaluate_classification,
    mean_probs,
    mutual_information,
    plot_reliability_diagram,
    plot_uncertainty_histogram,
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive(int), default=50)
    parser.add_argument("--hidden", type=positive(int), nargs="+", default=[100])
    parser.add_argument("--num-samples", type=positive(int), default=200)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--plot", type=output_path, default="digits_reliability.png", help="output figure ('' to skip)")
    args = parser.parse_args(argv)

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)  # the initial weights too: the same --seed gives the same results
    d = load_classification("digits", seed=args.seed)
    m = BayesianMLPClassifier(d.x_train.shape[1], d.num_classes, hidden=args.hidden, dataset_size=len(d.x_train))
    fit(m.model, m.guide, (d.x_train, d.y_train), epochs=args.epochs, batch_size=64, seed=args.seed,
        progress=False)
    # out-of-distribution: the test images with their pixels shuffled
    g = torch.Generator().manual_seed(args.seed)
    x_ood = d.x_test[:, torch.randperm(d.x_test.shape[1], generator=g)]
    with torch.no_grad():
        f_in = sample_predictive(m.model, m.guide, d.x_test, args.num_samples)["f"].softmax(-1)
        f_out = sample_predictive(m.model, m.guide, x_ood, args.num_samples)["f"].softmax(-1)
    metrics = evaluate_classification(f_in, d.y_test, f_out)
    for k, v in metrics.items():
        print(f"{k:<9} {v:.4f}")
    if args.plot:
        probs = mean_probs(f_in)
        mi_in, mi_out = mutual_information(f_in), mutual_information(f_out)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        plot_reliability_diagram(probs, d.y_test, ax=a1)
        plot_uncertainty_histogram(mi_in, mi_out, ax=a2, label="mutual information")
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {args.plot}")
    return metrics


if __name__ == "__main__":
    main()
