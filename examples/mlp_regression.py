"""Bayesian MLP regression on the toy curve of Blundell et al. (2015): predictive band and coverage.

    python examples/mlp_regression.py --epochs 300 --plot toy_regression.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import pyro  # noqa: E402
import torch  # noqa: E402

from bnnpyro import fit, sample_predictive  # noqa: E402
from bnnpyro.cli import output_path, positive, seed  # noqa: E402
from bnnpyro.data import toy_regression, toy_regression_curve  # noqa: E402
from bnnpyro.models import BayesianMLPRegressor  # noqa: E402
from bnnpyro.predict import gaussian_mixture_interval, picp, plot_predictive_band  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=positive(int), default=200, help="training points")
    parser.add_argument("--epochs", type=positive(int), default=300)
    parser.add_argument("--hidden", type=positive(int), nargs="+", default=[50, 50])
    parser.add_argument("--num-samples", type=positive(int), default=500)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--plot", type=output_path, default="toy_regression.png", help="output figure ('' to skip)")
    args = parser.parse_args(argv)

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)  # the initial weights too: the same --seed gives the same results
    x, y = toy_regression(n=args.n, seed=args.seed)
    xt, yt = toy_regression(n=500, seed=args.seed + 1)
    m = BayesianMLPRegressor(1, hidden=args.hidden, dataset_size=len(x))
    fit(m.model, m.guide, (x, y), epochs=args.epochs, batch_size=50, seed=args.seed, progress=False)

    grid = torch.linspace(-0.5, 1.2, 300).unsqueeze(-1)
    with torch.no_grad():
        mean, scale = m.mean_and_scale(sample_predictive(m.model, m.guide, xt, args.num_samples)["f"])
        lower, upper = gaussian_mixture_interval(mean, scale, 0.95)
        gm, gs = m.mean_and_scale(sample_predictive(m.model, m.guide, grid, args.num_samples)["f"])
        gl, gu = gaussian_mixture_interval(gm, gs, 0.95)
    inside = ((grid >= 0) & (grid <= 0.5)).squeeze(-1)
    metrics = {
        "coverage_95": picp(lower, upper, yt).item(),
        "width_inside": (gu - gl)[inside].mean().item(),
        "width_outside": (gu - gl)[~inside].mean().item(),
    }
    for k, v in metrics.items():
        print(f"{k:<14} {v:.4f}")
    if args.plot:
        ax = plot_predictive_band(x, y, gm.mean(0), gl, gu, x_test=grid, true_fn=toy_regression_curve)
        ax.figure.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {args.plot}")
    return metrics


if __name__ == "__main__":
    main()
