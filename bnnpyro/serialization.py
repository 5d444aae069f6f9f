"""Save and load a trained model (and its autoguide) as one self-describing file."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pyro
import torch
from pyro.infer import autoguide as pyro_autoguide
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


def save(path: str | os.PathLike, model: nn.Module, guide: nn.Module | None = None) -> None:
    """
    Write ``model`` (its configuration, prior and learned parameters) and, for the autoguide
    track, ``guide`` (its class, configuration and parameters) to one file at ``path``.

    :param model: a catalogue model (:mod:`bnnpyro.models`, whose hand-written guide's parameters
        live in the model) or a :class:`bnnpyro.nn.BayesianMLP`.
    :param guide: the autoguide trained for ``model`` (``AnalyticAutoNormal``, ``AutoNormal``,
        ``AutoDiagonalNormal`` or ``AutoLowRankMultivariateNormal``), or ``None``.

    The file holds only tensors, strings, numbers and lists, so it loads with
    ``torch.load(path, weights_only=True)``. It records the model's floating-point dtype, and
    :func:`load` rebuilds the model in it (a float64 model comes back float64, bit for bit).

    :raises TypeError: ``model`` or ``guide`` is not of a supported class.
    :raises ValueError: the model was built with a callable ``non_linearity``, its tensors mix
        dtypes, or the guide has not been run yet.
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
    torch.save(payload, path)


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


def load(path: str | os.PathLike, map_location: str | torch.device | None = None):
    """
    Read a file written by :func:`save`. Returns the model, or ``(model, guide)`` when a guide was
    saved. Nothing touches Pyro's global param store until the returned objects are used (each
    gets a param-store name of its own), so loaded models never clash with each other or with
    models already in the process; training resumes with a new ``SVI`` on them. The model is rebuilt
    in its saved dtype, and loading draws nothing from the caller's random number stream.

    :raises ValueError: if the file is not a bnnpyro checkpoint, is corrupted, or its parameters
        do not match its configuration. Nothing is returned half-loaded.
    """
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
    guide = make_unique(_guide_class(payload["guide_class"])(model, **payload["guide_config"]))
    try:
        # build the guide's parameters from one dummy forward of the model, then overwrite them
        x, y = _dummy_batch(model)
        with pyro.poutine.block(), torch.no_grad(), _own_rng():
            guide._setup_prototype(x, y)
            guide(x, y)
        guide.load_state_dict(payload["guide_state"], strict=True)
    except (TypeError, RuntimeError, KeyError) as e:
        raise ValueError(f"checkpoint {os.fspath(path)!r}: guide parameters do not match the model: {e}") from e
    return model, guide
