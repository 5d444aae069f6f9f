r"""
Data-parallel SVI over several processes with :mod:`torch.distributed`.

Run one process per worker (``torchrun --nproc_per_node=W script.py``, or
:func:`torch.multiprocessing.spawn`) after
``torch.distributed.init_process_group("gloo")`` (CPU) or ``"nccl"`` (one GPU
per rank). Without an initialised process group everything runs as one process
(``W = 1``), so the same script also runs as plain ``python script.py``.

**The objective.** A catalogue model (:mod:`bnnpyro.models`) given a minibatch
of ``B`` rows and ``dataset_size=N`` scales its likelihood by ``N/B`` and counts
the KL once:

.. math:: L(\text{batch}) = \frac{N}{B}\,\mathrm{NLL}(\text{batch}) + \mathrm{KL}.

A global minibatch of ``B`` rows is split into ``W`` shards of ``B_r`` rows,
``\sum_r B_r = B``, one per rank. Rank ``r`` runs the model on its shard only,
so its loss is ``L_r = (N/B_r) NLL_r + KL``: *summing* the ``L_r`` would give the
likelihood ``W`` times (for equal shards) and the KL ``W`` times. Weighting each
rank by its share of the batch instead,

.. math::

    \sum_r \frac{B_r}{B} L_r
    = \frac{N}{B}\sum_r \mathrm{NLL}_r + \mathrm{KL}\sum_r \frac{B_r}{B}
    = \frac{N}{B}\,\mathrm{NLL}(\text{batch}) + \mathrm{KL},

which is the single-process objective on the whole global batch. Its gradient
is therefore the all-reduce-**sum** of ``(B_r/B) \nabla L_r``; for equal shards
``B_r = B/W`` this is the all-reduce-*average* of the per-rank gradients, what
:class:`~torch.nn.parallel.DistributedDataParallel` does. The weights also keep
the objective exact for uneven shards (``B`` not a multiple of ``W``, the last
partial batch of an epoch); a rank with an empty shard contributes zero.

**One step** (:meth:`DistributedSVI.step`): ``loss = elbo.differentiable_loss``
on the local shard (under ``poutine.trace(param_only=True)``, which collects the
parameters), backward, then *one* all-reduce of a flat buffer holding
``B_r * grad`` of every parameter (in sorted param-store name order, the same
on every rank), ``B_r * loss`` and ``B_r``; dividing by the reduced ``B`` gives
the global gradient and the global loss. Every rank then takes the same
:class:`torch.optim.Adam` step on the same gradient, so the replicas stay
identical. Parameters met for the first time are broadcast from rank 0 before
their first gradient is taken (the local loss is then recomputed), so all
ranks start equal whatever their initialisation; the ranks first agree that
they met the same new parameters (one small all-reduce per step), and all raise
if not. The flat buffer also holds, per parameter, the share of the global
batch whose loss used it: a parameter no rank used gets no gradient (``SVI``
leaves it alone too).
BatchNorm running statistics of the model and guide modules (each rank updates
them from its own rows) are broadcast from rank 0 after every step, as
:class:`~torch.nn.parallel.DistributedDataParallel` does with its buffers.

**Randomness.** :func:`fit_distributed` draws the order of the data from a
generator seeded with ``seed`` on every rank (all ranks agree on the global
batches; rank ``r`` takes the ``r``-th of the ``W`` contiguous pieces of each,
:func:`shard`), and seeds Pyro's sampling with ``seed + rank`` so that the
ranks draw independent noise for their rows.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable

import pyro
import torch
import torch.distributed as dist
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.elbo import ELBO
from torch import Tensor, nn
from tqdm.auto import tqdm

from bnnpyro.infer.elbo_terms import elbo_terms
from bnnpyro.infer.fit import FitHistory, _check_pair, _check_positive_int, _modules_of
from bnnpyro.serialization import _GUIDE_CLASSES, save


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """
    Rank ``rank``'s part of a global batch of ``indices``: the ``rank``-th of
    ``world_size`` contiguous pieces whose sizes differ by at most one (some may
    be empty when ``len(indices) < world_size``).
    """
    return indices.tensor_split(world_size)[rank]


class DistributedSVI:
    r"""
    SVI whose gradient is the single-process gradient of the global minibatch,
    computed from one shard per rank (see the module docstring for the
    derivation). Use it like :class:`pyro.infer.SVI`, passing each rank its
    own shard::

        svi = DistributedSVI(m.model, m.guide)
        for idx in global_batches:
            rows = shard(idx, rank, world_size)
            loss = svi.step(x[rows], y[rows])   # the global -ELBO estimate, same on all ranks

    :param callable model: Pyro model ``model(x, y)`` that scales its
        likelihood by ``N / len(x)`` and counts the KL once.
    :param callable guide: Pyro guide ``guide(x, y)``.
    :param dict optim_args: keyword arguments of :class:`torch.optim.Adam`
        (default ``{"lr": 1e-2}``), the same on every rank.
    :param loss: an ELBO with ``differentiable_loss``; default
        :class:`~pyro.infer.TraceMeanField_ELBO`.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        optim_args: dict[str, Any] | None = None,
        loss: ELBO | None = None,
    ) -> None:
        self.model = model
        self.guide = guide
        self.loss = TraceMeanField_ELBO() if loss is None else loss
        self.optim_args = {"lr": 1e-2} if optim_args is None else dict(optim_args)
        self.params: dict[str, Tensor] = {}
        self.optimizer: torch.optim.Adam | None = None
        modules = _modules_of(model, guide)
        if _world()[1] > 1 and any(getattr(m, "dataset_size", 0) is None for m in modules):
            # it scales each rank's likelihood by B_r / B_r = 1: the objective would be NLL / W + KL
            raise ValueError("the model has dataset_size=None (no minibatch scaling): with several ranks give it "
                             "dataset_size=N, the number of training points")
        # BatchNorm running statistics, updated from each rank's own shard: kept equal by broadcasting
        # rank 0's after every step, as DistributedDataParallel does (broadcast_buffers)
        self.batch_norms = [b for m in modules for b in m.modules()
                            if isinstance(b, nn.modules.batchnorm._BatchNorm) and b.track_running_stats]

    def _traced_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with poutine.trace(param_only=True) as capture:
            loss = self.loss.differentiable_loss(self.model, self.guide, x, y)
        params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
        return loss, params

    def _adopt(self, params: dict[str, Tensor]) -> None:
        """Broadcast new parameters from rank 0 and hand them to the optimizer."""
        new = {name: params[name] for name in sorted(params) if name not in self.params}
        if _world()[1] > 1:
            for p in new.values():
                with torch.no_grad():
                    dist.broadcast(p, src=0)
        self.params.update(new)
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(list(new.values()), **self.optim_args)
        else:
            self.optimizer.add_param_group({"params": list(new.values())})

    def _new_parameters(self, params: dict[str, Tensor], rows: int, device: torch.device) -> list[str]:
        """The names of ``params`` not adopted yet, agreed by every rank (collective with several):
        a rank that met new parameters, while another did not (an empty shard, or parameters that
        depend on the rows), makes every rank raise, instead of leaving them waiting in mismatched
        collectives."""
        world_size = _world()[1]
        new = sorted(set(params) - set(self.params))
        if world_size == 1:
            if not rows:
                raise ValueError("x has no rows: a single process needs the whole (non-empty) batch")
            return new
        if self.params:  # the device collectives use: the parameters' (nccl: this rank's GPU)
            device = next(iter(self.params.values())).device
        flag = torch.tensor([float(bool(new) or not self.params)], device=device)
        dist.all_reduce(flag)
        if flag.item() == 0:
            return new
        found: list[list[str] | None] = [None] * world_size
        # all_gather_object stages its data on the *current* CUDA device: make it this rank's
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            dist.all_gather_object(found, new)
        if not any(found):
            raise ValueError("no rank met any parameter (an empty batch, or a model and guide without parameters)")
        if any(f != found[0] for f in found):
            ranks = [r for r, f in enumerate(found) if f != found[0]]
            raise ValueError(
                f"new parameters {sorted(set().union(*found))} were met on some ranks only (ranks {ranks} differ; "
                "an empty shard, or parameters created by some rows only): every rank must create the same "
                "parameters at the same step; use larger batches, or create them on the first step"
            )
        return new

    def step(self, x: Tensor, y: Tensor) -> float:
        """
        One optimizer step on the global batch made of every rank's ``(x, y)``.
        Collective: every rank must call it. Returns the global ``-ELBO``
        estimate ``(N/B) NLL(global batch) + KL``, the same on every rank.
        A parameter that no rank's loss used keeps its value (no gradient, as with ``SVI``).
        """
        world_size = _world()[1]
        rows = len(x)
        loss, params = self._traced_loss(x, y) if rows else (None, {})
        if self._new_parameters(params, rows, x.device):
            self._adopt(params)
            loss, params = self._traced_loss(x, y)
        if rows:
            loss.backward()
        names = sorted(self.params)
        ref = self.params[names[0]]
        grads = [self.params[n].grad if self.params[n].grad is not None else torch.zeros_like(self.params[n])
                 for n in names]
        used = ref.new_tensor([float(self.params[n].grad is not None) for n in names])
        value = ref.new_zeros(1) if loss is None else loss.detach().reshape(1).to(ref)
        flat = torch.cat([g.reshape(-1) for g in grads] + [used, value, ref.new_ones(1)])
        flat.mul_(rows)
        if world_size > 1:
            dist.all_reduce(flat)
        flat.div_(flat[-1].item())
        offset = 0
        used = flat[-2 - len(names): -2].tolist()
        for n, in_use in zip(names, used):
            p = self.params[n]
            p.grad = flat[offset: offset + p.numel()].view_as(p) if in_use > 0 else None
            offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.broadcast_batch_norms()
        return flat[-2].item()

    def broadcast_batch_norms(self) -> None:
        """Rank 0's BatchNorm running statistics to every rank (collective; after each step, and
        after any other pass in training mode, which updates them from each rank's own rows)."""
        if _world()[1] > 1:
            for bn in self.batch_norms:
                for buffer in bn.buffers():
                    dist.broadcast(buffer, src=0)


def _reduce_terms(model: Callable[..., Any], guide: Callable[..., Any], x: Tensor, y: Tensor, batch: int) -> Tensor:
    """``[NLL, KL]`` of the global batch from the ranks' shards, weighted ``B_r / B``."""
    terms = torch.zeros(2, dtype=torch.float64, device=x.device)
    if len(x):
        with torch.no_grad():
            nll, kl = elbo_terms(model, guide, x, y)
        terms = torch.stack([nll, kl]).to(terms) * (len(x) / batch)
    if _world()[1] > 1:
        dist.all_reduce(terms)
    return terms


def fit_distributed(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    data: tuple[Tensor, Tensor],
    epochs: int = 100,
    batch_size: int | None = None,
    *,
    optim_args: dict[str, Any] | None = None,
    loss: ELBO | None = None,
    seed: int = 0,
    shuffle: bool = True,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_model: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> FitHistory:
    r"""
    Data-parallel counterpart of :func:`~bnnpyro.infer.fit` for tensor data:
    every rank holds the full ``data``, all ranks walk the same global batches of
    ``batch_size`` rows (a permutation drawn from ``seed``), rank ``r`` trains on
    :func:`shard` ``r`` of each, and :class:`DistributedSVI` makes every step
    the single-process step on the global batch. Call it on every rank.

    The returned :class:`~bnnpyro.infer.FitHistory` (identical on all ranks)
    holds per datum the epoch's global loss (step losses weighted by global
    batch size) and the NLL/KL split of the epoch's last global batch, reduced
    from the shards; ``validation`` is empty. Only rank 0 shows the progress bar
    and writes ``checkpoint`` after every epoch: ``bnnpyro.save(checkpoint, checkpoint_model)``,
    with ``guide`` too when it is an autoguide (a module; a catalogue model's hand-written guide
    keeps its parameters in the model).

    :param data: ``(x, y)`` tensors of equal length, the same on every rank.
    :param int epochs: passes over ``data``.
    :param batch_size: the *global* minibatch size ``B`` (split over the ranks);
        ``None`` for the full batch. Must be at least the number of ranks.
    :param dict optim_args: :class:`torch.optim.Adam` arguments, default ``{"lr": 1e-2}``.
    :param loss: an ELBO, default :class:`~pyro.infer.TraceMeanField_ELBO`.
    :param int seed: seeds the data order (same on all ranks) and, as
        ``seed + rank``, Pyro's sampling.
    :param bool shuffle: reshuffle every epoch (default True).
    :param bool progress: tqdm bar on rank 0.
    :param checkpoint: path written by rank 0 after every epoch; needs ``checkpoint_model``.
    :param checkpoint_model: the catalogue model or :class:`bnnpyro.nn.BayesianMLP` to save.
    :param device: every shard is moved to it (e.g. ``f"cuda:{local_rank}"`` with nccl).
    :raises FloatingPointError: on every rank at once, when a step's global loss (all-reduced, so
        the same on all ranks) is NaN or infinite, naming the epoch and minibatch.
    """
    _check_positive_int("epochs", epochs)
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"data must be a pair (x, y) of tensors, got {type(data).__name__}")
    x, y = data
    _check_pair(x, y, "in data")
    rank, world_size = _world()
    batch = len(x) if batch_size is None else min(batch_size, len(x))
    if batch_size is not None:
        _check_positive_int("batch_size", batch_size)
    if batch < world_size:
        raise ValueError(f"the global batch ({batch} rows) must have at least one row per rank ({world_size})")
    if checkpoint is not None and checkpoint_model is None:
        raise ValueError("checkpoint needs checkpoint_model, the model to save")
    checkpoint_guide = guide if isinstance(guide, nn.Module) else None
    if checkpoint is not None and checkpoint_guide is not None and type(guide).__name__ not in _GUIDE_CLASSES:
        raise TypeError(f"checkpoint: cannot save a {type(guide).__name__} guide; bnnpyro.save takes {_GUIDE_CLASSES}")

    generator = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed + rank)
    svi = DistributedSVI(model, guide, optim_args, loss)
    history = FitHistory()
    with tqdm(range(epochs), desc="fit_distributed", unit="epoch", disable=not progress or rank != 0) as bar:
        for epoch in bar:
            order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
            weighted = 0.0
            for minibatch, idx in enumerate(order.split(batch)):
                rows = shard(idx, rank, world_size)
                xs, ys = x[rows], y[rows]
                if device is not None:
                    xs, ys = xs.to(device), ys.to(device)
                loss_value = svi.step(xs, ys)
                if not math.isfinite(loss_value):  # the all-reduced loss: every rank raises here together
                    raise FloatingPointError(
                        f"fit_distributed: the global loss is {loss_value} at epoch {epoch}, minibatch {minibatch}: "
                        "training diverged on some rank (that step's update may have made parameters non-finite); "
                        "lower the learning rate, or check the data and the initial scales"
                    )
                weighted += loss_value * len(idx)
            nll, kl = (_reduce_terms(model, guide, xs, ys, len(idx)) / len(x)).tolist()
            svi.broadcast_batch_norms()  # that pass updated them from each rank's shard
            history.loss.append(weighted / len(x) / len(x))
            history.nll.append(nll)
            history.kl.append(kl)
            bar.set_postfix({"elbo": -history.loss[-1], "nll": nll, "kl": kl})
            if checkpoint is not None and rank == 0:
                save(checkpoint, checkpoint_model, checkpoint_guide)
    return history
