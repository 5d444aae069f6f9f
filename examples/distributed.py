"""Data-parallel training of the Bayesian MLP classifier on scikit-learn's 8x8 digits.

    torchrun --nproc_per_node=2 examples/distributed.py     # 2 processes (gloo on CPU, nccl on GPUs)
    python examples/distributed.py                          # 1 process, same result up to noise

Every rank loads the data and trains on its shard of each global minibatch with
:func:`bnnpyro.infer.distributed.fit_distributed`; rank 0 evaluates and prints the test accuracy.
"""

from __future__ import annotations

import argparse
import os

import pyro
import torch
import torch.distributed as dist

from bnnpyro import sample_predictive
from bnnpyro.cli import output_path, positive, seed
from bnnpyro.data import load_classification
from bnnpyro.infer.distributed import fit_distributed
from bnnpyro.models import BayesianMLPClassifier
from bnnpyro.predict import accuracy, mean_probs


def main(argv: list[str] | None = None) -> dict[str, float] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive(int), default=30)
    parser.add_argument("--batch-size", type=positive(int), default=64, help="global minibatch, split over the ranks")
    parser.add_argument("--hidden", type=positive(int), nargs="+", default=[100])
    parser.add_argument("--num-samples", type=positive(int), default=100)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--checkpoint", type=output_path, default="", help="file rank 0 saves the model to ('' to skip)")
    args = parser.parse_args(argv)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device("cpu")
    if distributed:
        torch.set_num_threads(1)
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    try:
        pyro.clear_param_store()
        d = load_classification("digits", seed=args.seed)
        torch.manual_seed(args.seed)  # rank 0's initialisation is broadcast anyway
        m = BayesianMLPClassifier(d.x_train.shape[1], d.num_classes, hidden=args.hidden,
                                  dataset_size=len(d.x_train)).to(device)
        fit_distributed(m.model, m.guide, (d.x_train, d.y_train), epochs=args.epochs, batch_size=args.batch_size,
                        seed=args.seed, progress=rank == 0, device=device,
                        checkpoint=args.checkpoint or None, checkpoint_model=m)
        if rank != 0:
            return None
        with torch.no_grad():
            f = sample_predictive(m.model, m.guide, d.x_test.to(device), args.num_samples)["f"]
        metrics = {"accuracy": accuracy(mean_probs(f.softmax(-1)).cpu(), d.y_test).item()}
        print(f"accuracy {metrics['accuracy']:.4f}")
        return metrics
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
