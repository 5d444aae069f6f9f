"""Bayesian CNN classifier on scikit-learn's 8x8 digits: accuracy, NLL, ECE, reliability diagram, and
epistemic uncertainty (mutual information) of in- vs out-of-distribution images, for a chosen estimator.

    python examples/cnn_digits.py --epochs 30 --estimator flipout --plot cnn_digits.png
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
from bnnpyro.models import BayesianCNNClassifier  # noqa: E402
from bnnpyro.predict import (  # noqa: E402
    evaluate_classification,
    mean_probs,
    mutual_information,
    plot_reliability_diagram,
    plot_uncertainty_histogram,
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive(int), default=30)
    parser.add_argument("--channels", type=positive(int), nargs="+", default=[8, 16])
    parser.add_argument("--hidden", type=positive(int), nargs="+", default=[64])
    parser.add_argument("--estimator", default="local_reparameterization",
                        choices=["local_reparameterization", "flipout", "weight_space"])
    parser.add_argument("--num-samples", type=positive(int), default=100)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--plot", type=output_path, default="cnn_digits.png", help="output figure ('' to skip)")
    args = parser.parse_args(argv)

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)  # the initial weights too: the same --seed gives the same results
    d = load_classification("digits", seed=args.seed)
    x, x_test = d.x_train.reshape(-1, 1, 8, 8), d.x_test.reshape(-1, 1, 8, 8)
    m = BayesianCNNClassifier(num_classes=d.num_classes, dataset_size=len(x), image_size=8,
                              channels=args.channels, hidden=args.hidden, estimator=args.estimator)
    fit(m.model, m.guide, (x, d.y_train), epochs=args.epochs, batch_size=64, seed=args.seed,
        optim=pyro.optim.Adam({"lr": 1e-2}), progress=False)
    # out-of-distribution: the test images with their pixels shuffled by one fixed permutation
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(args.seed))
    x_ood = x_test.flatten(1)[:, perm].reshape(-1, 1, 8, 8)
    with torch.no_grad():
        p_in = sample_predictive(m.model, m.guide, x_test, args.num_samples)["f"].softmax(-1)
        p_out = sample_predictive(m.model, m.guide, x_ood, args.num_samples)["f"].softmax(-1)
    metrics = evaluate_classification(p_in, d.y_test, p_out)
    for k, v in metrics.items():
        print(f"{k:<9} {v:.4f}")
    if args.plot:
        probs = mean_probs(p_in)
        mi_in, mi_out = mutual_information(p_in), mutual_information(p_out)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        plot_reliability_diagram(probs, d.y_test, ax=a1)
        plot_uncertainty_histogram(mi_in, mi_out, ax=a2, label="mutual information")
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {args.plot}")
    return metrics


if __name__ == "__main__":
    main()
