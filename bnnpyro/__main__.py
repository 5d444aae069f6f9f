"""The main job: train a Bayesian MLP regressor on a bundled UCI set and report its uncertainty.

``bnnpyro`` (or ``python -m bnnpyro``) with no arguments follows the standard UCI protocol
(Hernández-Lobato & Adams 2015): split 0 of the 20 fixed 90/10 splits, inputs and target
standardized with training statistics, one hidden layer of 50 ReLU units, metrics in the
target's original units.
"""

from __future__ import annotations

import argparse
import sys
import time

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from bnnpyro.cli import level, output_path, positive, seed

DEFAULT_DATA = "concrete"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnnpyro",
        description=(
            "Train a Bayesian MLP regressor with SVI on a UCI regression set (by default the "
            "standard protocol: one hidden layer of 50 ReLU units, fixed 90/10 split, standardized "
            "data) and print test RMSE, test log-likelihood, interval coverage and mean interval "
            "width (at --level) in the target's original units; write a predicted-vs-true plot."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="UCI data set name: bundled concrete, energy, yacht; or any folder "
                             "under --root (e.g. ../shared/data/uci); or a path to a data-set folder")
    parser.add_argument("--root", default=None, help="directory holding UCI data-set folders")
    parser.add_argument("--split", type=int, default=0, help="which of the fixed splits (0-19)")
    parser.add_argument("--model", default="mlp", choices=["mlp"], help="catalogue model")
    parser.add_argument("--guide", default="hand", choices=["hand", "auto-normal", "auto-lowrank"],
                        help="hand-written local-reparameterization guide (bnnpyro.models), or an "
                             "autoguide over bnnpyro.nn.BayesianMLP: auto-normal = "
                             "bnnpyro.infer.AnalyticAutoNormal (AutoNormal with closed-form KL), "
                             "auto-lowrank = AutoLowRankMultivariateNormal")
    parser.add_argument("--hidden", type=positive(int), nargs="+", default=[50], help="hidden layer widths")
    parser.add_argument("--epochs", type=positive(int), default=400, help="passes over the training set")
    parser.add_argument("--batch-size", type=positive(int), default=32, help="minibatch size")
    parser.add_argument("--lr", type=positive(float), default=1e-2, help="Adam learning rate")
    parser.add_argument("--prior-scale", type=positive(float), default=1.0, help="std of the Normal weight prior")
    parser.add_argument("--num-samples", type=positive(int), default=500, help="posterior predictive samples")
    parser.add_argument("--level", type=level, default=0.95, help="credible interval level")
    parser.add_argument("--seed", type=seed, default=0, help="random seed, in [0, 2**32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=positive(int), default=1,
                        help="torch CPU threads: one is as fast for the default network (2.4 s per 20 epochs "
                             "either way on 2 idle cores) and does not slow down when the cores are busy "
                             "(6.0 s with two threads beside one busy process)")
    parser.add_argument("--plot", type=output_path, default="bnnpyro_predictions.png",
                        help="where to write the predicted-vs-true plot ('' to skip)")
    parser.add_argument("--save", type=output_path, default="",
                        help="write the trained model (and autoguide) with its optimizer state to this file "
                             "(bnnpyro.save; read back with bnnpyro.load, resume with bnnpyro.load_optim_state)")
    parser.add_argument("--jit", action="store_true",
                        help="compile the loss (bnnpyro.infer.JitTraceMeanField_ELBO): about half the "
                             "time per step of the default 1x50 network")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _build(args, d, N):
    """Returns (model, guide, mean_and_scale, to_save) for the chosen guide; ``to_save`` are the
    arguments of :func:`bnnpyro.save` after the path: (model object, autoguide or None)."""
    in_features = d.x_train.shape[1]
    if args.guide == "hand":
        from bnnpyro.models import BayesianMLPRegressor

        m = BayesianMLPRegressor(in_features, hidden=args.hidden, dataset_size=N,
                                 prior_scale=args.prior_scale).to(args.device)
        return m.model, m.guide, m.mean_and_scale, (m, None)
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    from bnnpyro.infer import AnalyticAutoNormal
    from bnnpyro.nn import BayesianMLP
    from bnnpyro.serialization import make_unique

    net = BayesianMLP(in_features, 1, hidden=args.hidden, dataset_size=N,
                      prior_scale=args.prior_scale).to(args.device)
    if args.guide == "auto-normal":
        guide = AnalyticAutoNormal(net, init_scale=1e-2)
    else:
        guide = AutoLowRankMultivariateNormal(net, init_scale=1e-2)
    guide = make_unique(guide)
    return net, guide, net.mean_and_scale, (net, guide)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(parser, args)
    finally:  # called in-process (tests, notebooks): the caller's setting back
        torch.set_num_threads(threads)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bnnpyro.data import load_uci
    from bnnpyro.infer import JitTraceMeanField_ELBO, fit
    from bnnpyro.predict import evaluate_regression, plot_predicted_vs_true, sample_predictive
    from bnnpyro.predict.summary import gaussian_mixture_interval

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    try:
        d = load_uci(args.data, split=args.split, root=args.root)
        dev = torch.device(args.device)
        torch.empty(0, device=dev)  # an unavailable device fails here, not after loading the data
    except (FileNotFoundError, ValueError, RuntimeError, AssertionError) as e:  # bad --data, --split, --device
        parser.error(f"{e}" if str(e) else f"device {args.device!r} is not available")
    x_train, y_train = d.x_train.to(dev), d.y_train.to(dev)
    x_test, y_test = d.x_test.to(dev), d.y_test.to(dev)
    N = len(x_train)
    print(f"bnnpyro: {d.name} split {d.split}: {N} train / {len(x_test)} test points, "
          f"{x_train.shape[1]} features; guide={args.guide}, hidden={args.hidden}, epochs={args.epochs}")
    model, guide, mean_and_scale, to_save = _build(args, d, N)
    optim = pyro.optim.Adam({"lr": args.lr})
    t0 = time.perf_counter()
    fit(model, guide, (x_train, y_train), epochs=args.epochs, batch_size=args.batch_size,
        optim=optim, loss=JitTraceMeanField_ELBO() if args.jit else TraceMeanField_ELBO(),
        seed=args.seed,
        progress=not args.no_progress)
    train_time = time.perf_counter() - t0
    if args.save:
        from bnnpyro.serialization import save

        save(args.save, *to_save, optim=optim)
    f = sample_predictive(model, guide, x_test, args.num_samples)["f"]
    with torch.no_grad():
        mean_samples, noise = mean_and_scale(f)
    metrics = evaluate_regression(mean_samples, noise, y_test, level=args.level, y_scale=d.y_scale)
    print(f"trained in {train_time:.1f} s")
    print(f"test RMSE            {metrics['rmse']:.4f}")
    print(f"test log-likelihood  {metrics['log_likelihood']:.4f}")
    print(f"{100 * args.level:g}% coverage         {metrics['coverage']:.4f}")
    print(f"mean interval width  {metrics['interval_width']:.4f}")
    if args.plot:
        lower, upper = gaussian_mixture_interval(mean_samples, noise, args.level)
        ax = plot_predicted_vs_true(
            d.y_to_original(y_test).cpu(), d.y_to_original(mean_samples.mean(0)).cpu(),
            d.y_to_original(lower).cpu(), d.y_to_original(upper).cpu(),
        )
        ax.set_title(f"{d.name} split {d.split}: RMSE {metrics['rmse']:.2f}, "
                     f"{100 * args.level:g}% coverage {metrics['coverage']:.2f}")
        ax.figure.savefig(args.plot, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        print(f"wrote {args.plot}")
    if args.save:
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
