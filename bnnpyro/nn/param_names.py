r"""
Names in Pyro's param store unique to one model instance.

Pyro keeps a ``PyroModule``'s point-estimated parameters (its :class:`~pyro.nn.PyroParam` s, its
``nn.Parameter`` s and those of plain ``nn.Module`` children) in the *global* param store, keyed
by their attribute path (``sigma``, ``0.weight``). Two instances of one architecture therefore
share these entries: whichever runs second reads the first one's values, and SVI steps the tensors
registered first, so the second model's own parameters are silently never trained (and a
``state_dict`` loaded into a new instance is overridden by a stale store entry). Sample sites are
not affected: they are re-drawn on every call and their names are what guides and predictions
refer to, so they keep their plain names. :class:`UniqueParamNames` prefixes only the parameters.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping

from pyro.nn import PyroModule
from torch import nn

_prefix_counter = itertools.count()
_unique_classes: dict[type, type] = {}


class UniqueParamNames:
    """
    Mixin for a :class:`~pyro.nn.PyroModule`: with ``self._param_prefix`` set, its parameters are
    registered in Pyro's param store as ``<prefix>.<path>``; its sample sites keep ``<path>``.
    A deep copy or an unpickled instance gets a new prefix (see :class:`NewParamNameOnCopy`).
    """

    def _pyro_get_fullname(self, name: str) -> str:
        fullname = super()._pyro_get_fullname(name)
        prefix = self.__dict__.get("_param_prefix")
        if prefix is None or name in self.__dict__["_pyro_samples"]:
            return fullname
        return f"{prefix}.{fullname}"

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        old = self.__dict__.get("_param_prefix")
        if old is None:
            return
        # submodules are restored before their parent: the outermost copied module gives its new
        # prefix to every module of the copy that shared its old one
        self._prefix_before_copy = old
        new = new_param_prefix(old.rsplit("_", 1)[0])
        for module in self.modules():
            if isinstance(module, UniqueParamNames) and module.__dict__.get("_prefix_before_copy") == old:
                module._param_prefix = new

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; with ``assign=True`` the parameters are new tensors, and
        every module in this one takes a fresh prefix (modules that shared one keep sharing a new
        one): under the old names Pyro's param store holds the replaced tensors and would copy them
        back. Also when loading fails part way (torch has assigned the matching keys by then)."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            if assign:
                renamed: dict[str, str] = {}
                for module in self.modules():
                    old = module.__dict__.get("_param_prefix") if isinstance(module, UniqueParamNames) else None
                    if old is not None:
                        module._param_prefix = renamed.setdefault(old, new_param_prefix(old.rsplit("_", 1)[0]))


class NewParamNameOnCopy:
    """
    Mixin for a module whose parameters Pyro's param store keys by ``self._pyro_name`` (a
    catalogue model registered with ``pyro.module``, or a :class:`~pyro.nn.PyroModule` guide): a
    deep copy (``copy.deepcopy``) or an unpickled instance (``pickle``, ``torch.save`` of the whole
    module) gets a name of its own. With the original's name, the copy's first call found the
    original's tensors in the store: SVI then stepped those, the copy's own parameters were never
    trained (or, for a PyroModule, the copy adopted the original's). Pickling also drops the weak
    references that the param store leaves on registered parameters (unpicklable), as
    :class:`~pyro.nn.PyroModule` does for its own.
    """

    def __getstate__(self) -> dict:
        for param in self.parameters():
            param.__dict__.pop("unconstrained", None)
        return super().__getstate__()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._new_pyro_name()

    def _new_pyro_name(self) -> None:
        name = new_param_prefix(type(self).__name__)
        if not isinstance(self, PyroModule):
            self._pyro_name = name
            return
        for path, module in self.named_modules():  # a PyroModule's submodules are named after it
            if isinstance(module, PyroModule):
                module._pyro_name = f"{name}.{path}" if path else name

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; with ``assign=True`` the module's parameters are new
        tensors, which take a name of their own (under the old one, Pyro's param store holds the
        replaced tensors: SVI would step those), also when loading fails part way. Only this
        module's own ``load_state_dict`` renames: assign into the whole model, not a submodule."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            if assign:
                self._new_pyro_name()


def _reduce_made_class(self: nn.Module) -> tuple:
    """``__reduce__`` of a class made by :func:`unique_param_names_class`: pickle the recipe (the
    base class's own one for ``PyroModule[Module]``, else the importable base class), not the
    class made at run time."""
    base = type(self).__bases__[1]
    if "__reduce__" in vars(base):  # PyroModule[Module]: (factory, (Module,), state)
        factory, args, state = base.__reduce__(self)[:3]
    else:
        factory, args, state = _empty_instance, (base,), self.__getstate__()
    return _UniqueNew, (factory, args), state


def _empty_instance(cls: type) -> nn.Module:
    return cls.__new__(cls)


class _UniqueNew:
    """Unpickling helper: an empty object of the :class:`UniqueParamNames` subclass of the class
    that ``factory(*args)`` instantiates."""

    def __init__(self, factory: Callable[..., Any], args: tuple) -> None:
        self.__class__ = unique_param_names_class(type(factory(*args)))


def unique_param_names_class(cls: type) -> type:
    """``cls`` with :class:`UniqueParamNames` mixed in (made once per class)."""
    if issubclass(cls, UniqueParamNames):
        return cls
    if cls not in _unique_classes:
        namespace = {"__module__": cls.__module__, "__reduce__": _reduce_made_class}
        _unique_classes[cls] = type(cls.__name__, (UniqueParamNames, cls), namespace)
    return _unique_classes[cls]


def new_param_prefix(kind: str) -> str:
    """A fresh prefix, ``<kind>_<k>`` with ``k`` counting up in this process."""
    return f"{kind}_{next(_prefix_counter)}"


def unique_param_names_(module: nn.Module, prefix: str) -> nn.Module:
    """
    In place: every :class:`~pyro.nn.PyroModule` in ``module`` (itself included) registers its
    parameters in Pyro's param store under ``prefix``; its class becomes a subclass with
    :class:`UniqueParamNames` mixed in. Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, PyroModule):
            m.__class__ = unique_param_names_class(type(m))
            m._param_prefix = prefix
    return module
