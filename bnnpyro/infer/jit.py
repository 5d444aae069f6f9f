"""A mean-field ELBO whose loss is compiled with ``torch.jit.trace`` once per model, guide and batch shape."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

import pyro.infer
import pyro.ops.jit
import torch
from torch import Tensor


def _signature(value: Any) -> Hashable:
    """What a traced loss is specialized on: a tensor's shape, dtype, device and ``requires_grad``
    (a minibatch of another size gets its own trace: the plate's ``N / B`` scale is a constant of
    it), any other argument's value (or its identity if it is not hashable)."""
    if torch.is_tensor(value):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


class JitTraceMeanField_ELBO(pyro.infer.JitTraceMeanField_ELBO):
    r"""
    :class:`~pyro.infer.TraceMeanField_ELBO` (closed-form KL where one is registered) with the loss
    compiled by :func:`pyro.ops.jit.trace`, **once** per model, guide and signature of the
    arguments (tensor shapes, dtypes and devices; the other arguments' values). A compiled step runs
    the recorded graph without Pyro's Python-side tracing, which is most of a small network's step.

    Pyro's own :class:`pyro.infer.JitTraceMeanField_ELBO` (pyro-ppl 1.9.2) never reuses its
    compiled loss: it checks for an attribute it does not set, so every step traces the model and
    guide again (about 29 ms per step of a 13-50-1 regressor, against 2.5 ms without JIT). This
    class caches the compiled loss and also keys it by the batch's shape: Pyro's keys it by the
    number of arguments only, so a last, smaller minibatch would reuse a graph whose plate scale
    ``N / B`` and shapes are those of the first.

    Same restrictions as any traced Pyro program: the model and guide must have a static structure
    for a given signature, take their tensors as positional arguments, and read no global state but
    the param store. Python-side checks of the inputs (shapes, NaN) run while a signature is traced,
    not on every later batch; a NaN reaching the loss then shows as a NaN loss (SVI warns). Use it
    with the catalogue models and :class:`bnnpyro.nn.BayesianMLP` with an autoguide;
    ``SVI(model, guide, optim, JitTraceMeanField_ELBO())``.

    :param bool ignore_jit_warnings: silence the tracer's warnings (default ``True``: the traced
        programs convert Python numbers from tensors, which the tracer warns about).
    :param kwargs: the other :class:`~pyro.infer.ELBO` arguments (``num_particles``,
        ``vectorize_particles``, ``max_plate_nesting``, ``jit_options``, ...).
    """

    def __init__(self, *, ignore_jit_warnings: bool = True, **kwargs: Any) -> None:
        super().__init__(ignore_jit_warnings=ignore_jit_warnings, **kwargs)
        self._compiled: dict[Hashable, pyro.ops.jit.CompiledFunction] = {}

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> Tensor:
        """The negative ELBO (one estimate, differentiable), from the loss compiled for this signature."""
        key = (model, guide, tuple(_signature(a) for a in args),
               tuple(sorted((k, _signature(v)) for k, v in kwargs.items())))
        compiled = self._compiled.get(key)
        if compiled is None:
            weakself = weakref.ref(self)

            def loss(*args: Any, **kwargs: Any) -> Tensor:
                elbo = weakself()
                total = 0.0
                for model_trace, guide_trace in elbo._get_traces(model, guide, args, kwargs):
                    total = total + elbo._differentiable_loss_particle(model_trace, guide_trace)[1]
                return total / elbo.num_particles

            compiled = self._compiled[key] = pyro.ops.jit.trace(
                loss, ignore_warnings=self.ignore_jit_warnings, jit_options=self.jit_options
            )
        return compiled(*args, **kwargs)
