"""Save and load a trained model (and its autoguide) as one self-describing file."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pyro
import torch
from pyro.infer import autoguide as pyro_autoguide
from pyro.optim import PyroLRScheduler, PyroOptim
from torch import nn

from bnnpyro.nn.param_names import new_param_prefix

FORMAT_VERSION = 1
_MAGIC = "bnnpyro-checkpoint"
_GUIDE_CLASSES = ("AnalyticAutoNormal", "AutoNormal", "AutoDiagonalNormal", "AutoLowRankMultivariateNormal")


def _model_classes() -> dict[str, type]:
    from bnnpyro import models, nn as bnn

    classes = {name: getattr(models, name) for name in models.__all__}
    for name in ("BayesianMLP",):
        if hasattr(bnn, name):
            classes[name] = getattr(bnn, name)
    return classes


def _guide_class(name: str) -> type:
    from bnnpyro.infer import AnalyticAutoNormal

    if name == "AnalyticAutoNormal":
        return AnalyticAutoNormal
    return getattr(pyro_autoguide, name)


def _guide_config(guide: nn.Module) -> dict[str, Any]:
    if type(guide).__name__ == "AutoLowRankMultivariateNormal":
        return {"rank": int(guide.rank)}
    return {}


def make_unique(guide: nn.Module) -> nn.Module:
    """Give an (uninitialised) autoguide a name of its own in Pyro's param store, so that several
    guides with the same site names can live in one process without sharing parameters."""
    if getattr(guide, "prototype_trace", None) is not None:
        raise ValueError("make_unique must be called before the guide is first run")
    guide._pyro_name = new_param_prefix(type(guide).__name__)
    return guide


def _floating_tensors(model: nn.Module) -> list[torch.Tensor]:
    """``model``'s floating-point parameters and buffers."""
    return [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]


def _reference_tensor(model: nn.Module) -> torch.Tensor:
    """A floating-point parameter or buffer of ``model``: its dtype and device are the model's."""
    tensors = _floating_tensors(model)
    if not tensors:
        raise TypeError(f"{type(model).__name__} has no floating-point parameters or buffers")
    return tensors[0]


def _dtype_name(model: nn.Module) -> str:
    """The floating-point dtype of ``model``'s parameters and buffers, e.g. ``"float64"``."""
    dtypes = {t.dtype for t in _floating_tensors(model)}
    if len(dtypes) > 1:
        raise ValueError(f"cannot save a model whose tensors mix dtypes {sorted(map(str, dtypes))}: give it one dtype")
    return str(dtypes.pop() if dtypes else torch.get_default_dtype()).removeprefix("torch.")


def _dtype(name: object) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"the checkpoint names an unknown floating-point dtype {name!r}")
    return dtype


def _dummy_batch(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """One observed data point of the right shapes, dtype and device, to build an autoguide's parameters."""
    like = _reference_tensor(model)
    x = like.new_zeros(1, model.in_features)
    if model.likelihood == "classification":
        return x, torch.zeros(1, dtype=torch.long, device=like.device)
    return x, like.new_zeros(1) if model.out_features == 1 else like.new_zeros(1, model.out_features)


def _optim_kind(optim: object) -> str:
    """``optim`` named by its kind and classes, e.g. ``"pyro Adam"``, ``"pyro ExponentialLR(SGD)"``,
    ``"torch Adam"``."""
    if isinstance(optim, PyroLRScheduler):
        return f"pyro {optim.pt_scheduler_constructor.__name__}({optim.pt_optim_constructor.__name__})"
    if isinstance(optim, PyroOptim):
        return f"pyro {getattr(optim.pt_optim_constructor, '__name__', type(optim).__name__)}"
    if isinstance(optim, torch.optim.Optimizer):
        return f"torch {type(optim).__name__}"
    raise TypeError(f"optim must be a pyro.optim optimizer or a torch.optim.Optimizer, got {type(optim).__name__}")


def _named_parameters(model: nn.Module, guide: nn.Module | None) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` and ``guide``, keyed ``"model.<path>"`` and ``"guide.<path>"``:
    names that do not depend on the param-store names a process gives them."""
    named = {f"model.{k}": p for k, p in model.named_parameters()}
    if guide is not None:
        named.update({f"guide.{k}": p for k, p in guide.named_parameters()})
    return named


def _optim_state(optim: object, model: nn.Module, guide: nn.Module | None) -> dict[str, Any]:
    """
    ``optim``'s state for the parameters of ``model`` and ``guide``. A torch optimizer's
    ``state_dict()`` as is (it refers to the parameters by position). A Pyro optimizer holds one
    torch optimizer per parameter, keyed by the parameter's name in Pyro's param store, which a
    loaded model does not keep (each instance gets a name of its own): its states are re-keyed by
    the parameters' paths in the model and guide (:func:`_named_parameters`).
    """
    kind = _optim_kind(optim)
    if isinstance(optim, torch.optim.Optimizer):
        return {"kind": kind, "state": optim.state_dict()}
    # by tensor (optim_objs is keyed by the unconstrained parameter, the module's own), not through
    # param-store names: those are gone after pyro.clear_param_store(), the states are not
    by_path = {path: _per_parameter_state(optim.optim_objs[p])
               for path, p in _named_parameters(model, guide).items() if p in optim.optim_objs}
    if not by_path:
        raise ValueError("optim holds no state for the parameters of this model and guide: pass the optimizer "
                         "that trained them (after at least one step)")
    return {"kind": kind, "state": by_path}


def _per_parameter_state(optimizer: Any) -> dict[str, Any]:
    """The state of one of a Pyro optimizer's per-parameter torch optimizers (or learning-rate
    schedulers, with their optimizer's), in the form ``PyroOptim.get_state`` gives it."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer.state_dict()
    return {"scheduler": optimizer.state_dict(), "optimizer": optimizer.optimizer.state_dict()}


def _register_in_param_store(model: nn.Module, guide: nn.Module | None) -> None:
    """Make Pyro's param store name every parameter of ``model`` and ``guide``, as their first use
    in training does: a catalogue model registers itself with ``pyro.module``; a
    :class:`~pyro.nn.PyroModule` (a BayesianMLP, an autoguide: already run) on one forward."""
    if not isinstance(model, pyro.nn.PyroModule):
        pyro.module(model._pyro_name, model)
        return
    x, y = _dummy_batch(model)
    with pyro.poutine.block(), torch.no_grad(), _own_rng():
        if guide is None:
            model(x, y)
        else:
            pyro.poutine.replay(model, trace=pyro.poutine.trace(guide).get_trace(x, y))(x, y)


def save(path: str | os.PathLike, model: nn.Module, guide: nn.Module | None = None, *, optim: object = None) -> None:
    """
    Write ``model`` (its configuration, prior and learned parameters) and, for the autoguide
    track, ``guide`` (its class, configuration and parameters) to one file at ``path``.

    :param model: a catalogue model (:mod:`bnnpyro.models`, whose hand-written guide's parameters
        live in the model) or a :class:`bnnpyro.nn.BayesianMLP`.
    :param guide: the autoguide trained for ``model`` (``AnalyticAutoNormal``, ``AutoNormal``,
        ``AutoDiagonalNormal`` or ``AutoLowRankMultivariateNormal``), or ``None``.
    :param optim: the optimizer training them, to resume training exactly
        (:func:`load_optim_state`): a Pyro optimizer (``pyro.optim.Adam``, a ``pyro.optim`` learning-rate
        scheduler, ...; its state for these parameters only) or a ``torch.optim.Optimizer``.

    The file holds only tensors, strings, numbers and lists, so it loads with
    ``torch.load(path, weights_only=True)``. It records the model's floating-point dtype, and
    :func:`load` rebuilds the model in it (a float64 model comes back float64, bit for bit).

    :raises TypeError: ``model``, ``guide`` or ``optim`` is not of a supported class.
    :raises ValueError: the model was built with a callable ``non_linearity``, its tensors mix
        dtypes, the guide has not been run yet, or a Pyro ``optim`` holds no state for them.
    """
    name = type(model).__name__
    if name not in _model_classes() or not hasattr(model, "config"):
        raise TypeError(f"model must be a bnnpyro catalogue model or bnnpyro.nn.BayesianMLP, got {name}")
    if model.config.get("non_linearity", "") is None:
        raise ValueError("cannot save a model built with a callable non_linearity: pass its name, e.g. 'relu'")
    payload: dict[str, Any] = {
        "format": _MAGIC,
        "version": FORMAT_VERSION,
        "model_class": name,
        "config": dict(model.config),
        "dtype": _dtype_name(model),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "guide_class": None,
        "guide_config": {},
        "guide_state": {},
    }
    if guide is not None:
        guide_name = type(guide).__name__
        if guide_name not in _GUIDE_CLASSES:
            raise TypeError(f"guide must be one of {_GUIDE_CLASSES} or None, got {guide_name}")
        if getattr(guide, "prototype_trace", None) is None:
            raise ValueError("the guide has not been run yet: there are no parameters to save")
        payload["guide_class"] = guide_name
        payload["guide_config"] = _guide_config(guide)
        payload["guide_state"] = {k: v.detach().cpu() for k, v in guide.state_dict().items()}
    if optim is not None:
        payload["optim"] = _to_cpu(_optim_state(optim, model, guide))
    torch.save(payload, path)


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples detached and moved to the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _own_rng() -> contextlib.AbstractContextManager:
    """The CPU and every CUDA generator's states restored on leaving (a guide set up on the GPU
    draws from the CUDA generator)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=cuda)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    """``torch``'s default dtype set to ``dtype`` (a float32/float64 one) inside the block."""
    previous = torch.get_default_dtype()
    if dtype in (torch.float32, torch.float64):
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _read(path: str | os.PathLike, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """The checked payload of a file written by :func:`save`."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises several types for unreadable files
        raise ValueError(f"{os.fspath(path)!r} is not a readable bnnpyro checkpoint: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != _MAGIC:
        raise ValueError(f"{os.fspath(path)!r} is not a bnnpyro checkpoint")
    if payload.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint version {payload.get('version')!r}; expected {FORMAT_VERSION}")
    return payload


def load(path: str | os.PathLike, map_location: str | torch.device | None = None):
    """
    Read a file written by :func:`save`. Returns the model, or ``(model, guide)`` when a guide was
    saved. Each gets a param-store name of its own, so loaded models never clash with each other or with
    models already in the process; training resumes with a new ``SVI`` on them. (Building an
    autoguide's parameters runs the model and guide once on a dummy batch, which registers their
    parameters in the param store under those fresh names.) The model is rebuilt
    in its saved dtype, and loading draws nothing from the caller's random number stream.

    To resume training exactly, save the optimizer too (:func:`save`'s ``optim``) and restore
    it with :func:`load_optim_state`.

    :raises ValueError: if the file is not a bnnpyro checkpoint, is corrupted, or its parameters
        do not match its configuration. Nothing is returned half-loaded.
    """
    payload = _read(path, map_location)
    classes = _model_classes()
    if payload.get("model_class") not in classes:
        raise ValueError(f"unknown model class {payload.get('model_class')!r} in {os.fspath(path)!r}")
    try:
        # built in the saved dtype (not built, then cast: buffers that are not saved, such as a
        # BayesianMLP's prior scale, would keep their float32 rounding), without drawing from the
        # caller's RNG stream (the constructor's initial weights are overwritten anyway)
        dtype = _dtype(payload["dtype"]) if "dtype" in payload else None  # earlier: default dtype
        with _own_rng(), _default_dtype(dtype):
            model = classes[payload["model_class"]](**payload["config"])
        if dtype is not None:
            model = model.to(dtype)
        model.load_state_dict(payload["model_state"], strict=True)
    except (TypeError, RuntimeError, KeyError) as e:
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not match its model configuration: {e}") from e
    if map_location is not None:
        model = model.to(map_location)
    if payload.get("guide_class") is None:
        return model
    if payload["guide_class"] not in _GUIDE_CLASSES:
        raise ValueError(f"unknown guide class {payload['guide_class']!r}")
    try:
        guide = make_unique(_guide_class(payload["guide_class"])(model, **payload["guide_config"]))
        # build the guide's parameters from one dummy forward of the model, then overwrite them
        x, y = _dummy_batch(model)
        with pyro.poutine.block(), torch.no_grad(), _own_rng():
            guide._setup_prototype(x, y)
            guide(x, y)
        guide.load_state_dict(payload["guide_state"], strict=True)
    except (TypeError, RuntimeError, KeyError) as e:
        raise ValueError(f"checkpoint {os.fspath(path)!r}: guide parameters do not match the model: {e}") from e
    return model, guide


def load_optim_state(path: str | os.PathLike, optim: object, model: nn.Module, guide: nn.Module | None = None) -> None:
    """
    Load the optimizer state saved with :func:`save`'s ``optim`` into ``optim``, a new optimizer
    of the same kind for ``model`` and ``guide`` as :func:`load` returned them, so that training
    continues as the uninterrupted run would (bit for bit when the RNG state is restored too:
    save ``torch.get_rng_state()`` beside the checkpoint)::

        bnnpyro.save("m.pt", m, optim=optim)          # optim = pyro.optim.Adam({"lr": 1e-2})
        # later, in any process
        m = bnnpyro.load("m.pt")
        optim = pyro.optim.Adam({"lr": 1e-2})
        bnnpyro.load_optim_state("m.pt", optim, m)
        fit(m.model, m.guide, (x, y), optim=optim)    # or SVI(m.model, m.guide, optim, loss)

    A Pyro optimizer keeps each parameter's state under its name in Pyro's param store, and a
    loaded model's parameters have new names: the states are handed over under the new ones
    (``optim.set_state``), which registers the parameters in the param store, and each is taken
    when ``optim`` first steps its parameter. A torch optimizer must be built over the loaded
    ``model.parameters()`` (and then ``guide.parameters()``) in the original's order.

    :raises ValueError: if the file holds no optimizer state, one of another kind than ``optim``,
        or one for another model (class or configuration), or ``guide`` is missing or extra.
    :raises TypeError: if ``optim`` is neither a Pyro nor a torch optimizer.
    """
    kind = _optim_kind(optim)
    payload, where = _read(path), os.fspath(path)
    saved = payload.get("optim")
    if saved is None:
        raise ValueError(f"checkpoint {where!r} holds no optimizer state: save it with bnnpyro.save(..., optim=optim)")
    if kind != saved["kind"]:
        raise ValueError(f"checkpoint {where!r} holds the state of a {saved['kind']} optimizer, but optim is a {kind}")
    if type(model).__name__ != payload["model_class"] or getattr(model, "config", None) != payload["config"]:
        raise ValueError(f"checkpoint {where!r} was saved for a {payload['model_class']} with configuration "
                         f"{payload['config']}: load that model with bnnpyro.load and pass it")
    if (guide is None) != (payload.get("guide_class") is None):
        expected = "no guide" if payload.get("guide_class") is None else f"its {payload['guide_class']} guide"
        raise ValueError(f"checkpoint {where!r} was saved with {expected}: pass guide accordingly")
    if isinstance(optim, torch.optim.Optimizer):
        optim.load_state_dict(saved["state"])
        return
    named = _named_parameters(model, guide)
    unknown = sorted(set(saved["state"]) - set(named))
    if unknown:
        raise ValueError(f"checkpoint {where!r}: optimizer state for parameters {unknown} that the model and guide lack")
    _register_in_param_store(model, guide)
    store = pyro.get_param_store()
    optim.set_state({store.param_name(named[k]): state for k, state in saved["state"].items()})
