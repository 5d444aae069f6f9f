"""Throughput (samples/s) of data-parallel SVI: 1 vs 2 processes, 784-400-400-10 catalogue classifier.

Each configuration is a fresh ``torch.multiprocessing.spawn`` of ``W`` ranks (``gloo`` on CPU, one
intra-op thread per rank unless ``--threads``; ``nccl`` with one GPU per rank) running
:class:`bnnpyro.infer.distributed.DistributedSVI` on random MNIST-shaped data. A step processes one
*global* batch of ``--batch`` rows (``--batch / W`` per rank), so ``samples/s = batch * steps / time``
measures strong scaling at a fixed global batch. Times are taken on rank 0 between barriers, after
``--warmup`` steps. The GPU column appears only with CUDA (2 GPU processes need 2 GPUs).

Usage: ``python benchmarks/scale.py [--batch 128] [--steps 30] [--out benchmarks/results/scale.json]``
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _common import write_json
from bnnpyro.infer.distributed import DistributedSVI, shard
from bnnpyro.models import BayesianMLPClassifier

SIZES = (784, (400, 400), 10)
DATASET = 60_000


def _worker(rank: int, world: int, port: int, device_type: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)  # as torch.distributed's docs ask for nccl
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                            **({"device_id": device} if device_type == "cuda" else {}))
    try:
        pyro.set_rng_seed(rank)
        d, hidden, classes = SIZES
        m = BayesianMLPClassifier(d, classes, hidden=hidden, dataset_size=DATASET).to(device)
        svi = DistributedSVI(m.model, m.guide, optim_args={"lr": 1e-3})
        rows = shard(torch.arange(args.batch), rank, world)
        x = torch.rand(len(rows), d, device=device)
        y = torch.randint(classes, (len(rows),), device=device)
        for _ in range(args.warmup):
            svi.step(x, y)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            svi.step(x, y)  # ends with .item() on the reduced loss: synchronises the GPU
        dist.barrier()
        elapsed = time.perf_counter() - start
        if rank == 0:
            with open(out, "w") as f:
                f.write(str(args.batch * args.steps / elapsed))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(world: int, device_type: str, args: argparse.Namespace) -> float:
    """Samples per second of ``world`` ranks on ``device_type`` (``"cpu"`` or ``"cuda"``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate")
        mp.spawn(_worker, args=(world, _free_port(), device_type, args, out), nprocs=world, join=True)
        with open(out) as f:
            return float(f.read())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="global minibatch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    args = parser.parse_args(argv)

    columns = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results: dict[str, dict[str, float | None]] = {}
    for world in (1, 2):
        results[str(world)] = {
            col: (throughput(world, col, args) if col == "cpu" or torch.cuda.device_count() >= world else None)
            for col in columns
        }
    print(f"784-400-400-10 classifier, global batch {args.batch}, {args.threads} thread(s)/rank, samples/s")
    print(f"{'processes':>9} " + " ".join(f"{c:>12} {c + ' speedup':>13}" for c in columns))
    for world, row in results.items():
        cells = []
        for c in columns:
            rate, base = row[c], results["1"][c]
            cells.append(f"{rate:12.0f} {rate / base:13.2f}" if rate is not None else f"{'-':>12} {'-':>13}")
        print(f"{world:>9} " + " ".join(cells))
    payload = {"config": {"sizes": "784-400-400-10", **vars(args)}, "samples_per_s": results}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
