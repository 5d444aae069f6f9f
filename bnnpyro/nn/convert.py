r"""
Turning a trained (or untrained) ``torch.nn.Module`` into a Bayesian :class:`~pyro.nn.PyroModule`
in one call, for Pyro's autoguides (as TyXe's ``VariationalBNN`` or bayesian-torch's
``dnn_to_bnn``, but returning a plain Pyro model: any guide, any ELBO, ``Predictive``).
"""

from __future__ import annotations

import copy
import math
from fnmatch import fnmatchcase
from functools import partial
from typing import Callable, Iterable, Optional, Union

from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn

from bnnpyro.distributions.priors import NormalPrior, ParameterPrior, Prior, parameter_prior
from bnnpyro.nn.embedding import BayesianEmbedding
from bnnpyro.nn.estimators import ESTIMATORS, estimator
from bnnpyro.nn.linear import BayesianLinear
from bnnpyro.nn.lstm import BayesianLSTM
from bnnpyro.nn.param_names import new_param_prefix, unique_param_names_

PriorChoice = Union[Prior, str, Callable[[str, Tensor], Union[Prior, ParameterPrior]]]

PRIOR_RULES = ("fan_in", "pretrained")


def _fan_in(name: str, params: dict[str, Tensor]) -> int:
    """``weight.shape[1:].numel()`` of parameter ``name``, or for a bias of its layer's weight
    (``bias`` -> ``weight``, ``bias_ih_l0`` -> ``weight_ih_l0``)."""
    param = params[name]
    if param.dim() < 2:
        weight = params.get(name.replace("bias", "weight", 1))
        if weight is None or weight.dim() < 2:
            raise ValueError(f"cannot find the weight of bias {name!r} for the fan_in prior")
        param = weight
    return param.shape[1:].numel()


def _make_prior(prior: PriorChoice, path: str, name: str, params: dict[str, Tensor],
                pretrained_scale: float, learn_prior_scale: bool = True) -> ParameterPrior:
    """The prior module of parameter ``name`` (full path ``path``) of a layer with ``params``."""
    value = params[name]
    if isinstance(prior, Prior):
        return parameter_prior(prior, value.shape)
    if prior == "fan_in":
        return NormalPrior(value.shape, 0.0, 1.0 / math.sqrt(_fan_in(name, params)))
    if prior == "pretrained":
        return NormalPrior(value.shape, value, pretrained_scale, learn_scale=learn_prior_scale)
    result = prior(path, value)
    if isinstance(result, Prior):
        return parameter_prior(result, value.shape)
    if not isinstance(result, ParameterPrior) or result.shape != value.shape:
        raise ValueError(f"prior({path!r}, param) must return a Prior or a ParameterPrior of shape "
                         f"{tuple(value.shape)}, got {result!r}")
    return result


def _draw(layer: PyroModule, name: str) -> TorchDistribution:
    """The prior of ``layer``'s parameter ``name`` (a partial, not a lambda: modules stay picklable)."""
    return layer.priors[name]()


def _bayesian_layer(layer: nn.Module, path: str) -> Optional[PyroModule]:
    """The Bayesian version of ``layer`` (new, or ``layer`` converted in place), None if it has none."""
    t = type(layer)
    if isinstance(layer, nn.Embedding) and layer.max_norm is not None:
        raise ValueError(f"{path or 'module'}: nn.Embedding with max_norm renormalises its weight in place "
                         "and cannot be converted; exclude it")
    if isinstance(layer, nn.Embedding) and layer.sparse:
        raise ValueError(f"{path or 'module'}: nn.Embedding with sparse=True: a sampled table's gradient "
                         "reaches its dense posterior parameters; exclude it, or convert it with sparse=False")
    if t is nn.Linear:
        w = layer.weight
        return BayesianLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device=w.device, dtype=w.dtype)
    if t is nn.Embedding:
        w = layer.weight
        return BayesianEmbedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx,
                                 scale_grad_by_freq=layer.scale_grad_by_freq, device=w.device, dtype=w.dtype)
    if t is nn.LSTM:
        return BayesianLSTM.from_lstm(layer)
    if isinstance(layer, nn.LSTM):
        raise TypeError(f"{path or 'module'}: cannot convert {t.__name__}, a subclass of nn.LSTM; exclude it")
    if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)):
        to_pyro_module_(layer, recurse=False)  # keeps the class's own forward
        return layer
    return None


class _Converter:
    def __init__(self, root: nn.Module, prior: PriorChoice, exclude: tuple[str, ...], pretrained_scale: float,
                 learn_prior_scale: bool) -> None:
        # every path of every module: a module used at several paths is excluded if any of them is
        self.paths: dict[int, list[str]] = {}
        for path, module in root.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(module), []).append(path)
        self.prior = prior
        self.exclude = exclude
        self.pretrained_scale = pretrained_scale
        self.learn_prior_scale = learn_prior_scale
        self.converted: dict[int, PyroModule] = {}  # a module used at several paths is converted once

    def excluded(self, paths: list[str], name: str = "") -> bool:
        """Whether ``exclude`` matches one of ``paths`` (a module's) or one of their ancestors (a
        shared module inside an excluded one), or ``name`` under one of them."""
        names = set()
        for path in paths:
            parts = (_join(path, name) if name else path).split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return any(fnmatchcase(full, pattern) for full in names for pattern in self.exclude)

    def module(self, module: nn.Module, path: str) -> PyroModule:
        """``module`` (already copied) as a PyroModule, its layers Bayesian unless excluded."""
        key = id(module)
        if key not in self.converted:
            self.converted[key] = self._convert(module, path)
        return self.converted[key]

    def _convert(self, module: nn.Module, path: str) -> PyroModule:
        paths = self.paths.get(id(module), [path])
        if self.excluded(paths):
            to_pyro_module_(module)
            return module
        originals = dict(module.named_parameters(recurse=False))
        layer = _bayesian_layer(module, path)
        if layer is not None:
            layer.train(module.training)  # a new layer (a BayesianLSTM's dropout) starts in training mode
            # the weights and biases of an nn.LSTM; of a Linear, convolution or Embedding (or a subclass,
            # converted in place) its weight and bias only: a subclass's own parameters stay as they are
            names = originals if isinstance(layer, BayesianLSTM) else [n for n in ("weight", "bias") if n in originals]
            params = {name: originals[name].detach().clone() for name in names}
            return self.layer(layer, path, paths, params, originals)
        to_pyro_module_(module, recurse=False)
        for name, child in list(module._modules.items()):
            if child is not None:
                setattr(module, name, self.module(child, _join(path, name)))
        return module

    def layer(self, layer: PyroModule, path: str, paths: list[str], params: dict[str, Tensor],
              originals: dict[str, nn.Parameter]) -> PyroModule:
        """``layer`` with a prior and a sample site for each of ``params`` (copies of the original
        module's ``originals``) that is not excluded; an excluded one keeps its original
        parameter (so a weight tied to another module's stays tied)."""
        priors = {}
        for name, value in params.items():
            full = _join(path, name)
            if self.excluded(paths, name):
                setattr(layer, name, originals[name])
                continue
            # in the parameter's dtype and on its device (a Prior or the fan_in rule builds its tensors
            # in the default dtype on the CPU), so that the weight draws are too
            priors[name] = _make_prior(self.prior, full, name, params, self.pretrained_scale,
                                       self.learn_prior_scale).to(device=value.device, dtype=value.dtype)
            layer.register_buffer(f"{name}_pretrained", value, persistent=False)
        if isinstance(layer, (BayesianLinear, BayesianLSTM, BayesianEmbedding)):
            layer.prior = None  # the layer's own i.i.d. prior is replaced by `priors`
        layer.bayesian_parameters = tuple(priors)
        if priors:
            layer.priors = PyroModule[nn.ModuleDict](priors)
            for name in priors:
                setattr(layer, name, PyroSample(partial(_draw, name=name)))
        return layer


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def to_bayesian(
    module: nn.Module,
    prior: PriorChoice = "fan_in",
    *,
    estimator: Optional[str] = None,
    exclude: Union[str, Iterable[str]] = (),
    pretrained_scale: float = 0.1,
    learn_prior_scale: bool = True,
) -> PyroModule:
    r"""
    A Bayesian copy of ``module``: a :class:`~pyro.nn.PyroModule` with the same ``forward`` in
    which the parameters of the ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding`` and
    ``nn.LSTM`` layers (inside any containers) are sample sites, named by their paths in
    ``module`` (``features.0.weight``, ``lstm.weight_hh_l0``, or ``weight`` for a bare layer).
    ``module`` itself is not modified (it is deep-copied).

    - ``nn.Linear`` becomes :class:`~bnnpyro.nn.BayesianLinear` (which also takes stacked weight
      draws, e.g. ``Predictive(..., parallel=True)``), ``nn.Embedding``
      :class:`~bnnpyro.nn.BayesianEmbedding` (the ``padding_idx`` row is zero in every draw;
      ``scale_grad_by_freq`` is kept; ``max_norm`` and ``sparse`` are not supported), ``nn.LSTM``
      :class:`~bnnpyro.nn.BayesianLSTM`.
      ``nn.Conv1d``/``nn.Conv2d`` (and subclasses of ``nn.Linear``/``nn.Embedding``) keep their
      class and ``forward``, their ``weight`` and ``bias`` turned into :class:`~pyro.nn.PyroSample` s
      (one weight draw per call; no stacked draws). Converted layers keep the module's
      training/eval mode.
    - A module used at several places stays one module (one set of sites); a parameter shared
      by two converted layers (tied weights) becomes two independent sample sites, and stays one
      parameter where both are excluded.
    - Every other parameter (BatchNorm, LayerNorm, GRU, custom parameters, ...) stays
      deterministic: a Pyro param, point-estimated by SVI. So do all parameters of the layers
      matched by ``exclude``. In Pyro's param store these are named ``<prefix>.<path>`` with a
      prefix unique to the converted model (``<class name>_<k>``), so that two converted models
      in one process never share them; sample sites keep their plain paths
      (:mod:`bnnpyro.nn.param_names`).
    - Each converted layer holds its priors in ``layer.priors`` (parameter name ->
      :class:`~bnnpyro.distributions.ParameterPrior`), lists its sample sites in
      ``layer.bayesian_parameters`` and keeps ``module``'s values of them (non-persistent
      buffers ``<name>_pretrained``) for :func:`pretrained_values`.

    **Priors** (``prior``), per parameter tensor:

    - a :class:`~bnnpyro.distributions.Prior`: that i.i.d. prior everywhere (Normal or the scale
      mixture of Blundell et al., 2015);
    - ``"fan_in"`` (default): :math:`\mathcal N(0, 1/\text{fan\_in})`, ``fan_in =
      weight.shape[1:].numel()`` (``in_features``; ``in_channels/groups * kernel size``; for an
      embedding ``embedding_dim``), a bias taking its weight's; keeps the pre-activations of
      every layer of order one whatever its width;
    - ``"pretrained"``: :math:`\mathcal N(w_0, s^2)` centred on ``module``'s values :math:`w_0`
      with a learnable scale :math:`s` (a positive :class:`~pyro.nn.PyroParam`
      ``<path>.priors.<name>.scale``, one per parameter tensor, initially ``pretrained_scale``)
      fitted by SVI through the ELBO: empirical Bayes, as MOPED (Krishnan et al., 2020). With a
      guide started at :math:`w_0` on the same data, the learned :math:`s` tends to follow the
      posterior's own width (the KL then constrains little); ``learn_prior_scale=False`` keeps
      :math:`s` = ``pretrained_scale`` fixed (a buffer);
    - a callable ``prior(name, param)`` (full parameter name, ``module``'s tensor) returning a
      :class:`~bnnpyro.distributions.Prior` or a
      :class:`~bnnpyro.distributions.ParameterPrior` of the parameter's shape, e.g.
      ``NormalPrior(param.shape, 0.0, scale)`` with a per-layer or per-element ``scale``.

    **Starting the guide at the trained weights**::

        bnn = to_bayesian(net)
        guide = AutoNormal(bnn, init_loc_fn=init_to_value(values=pretrained_values(bnn)), init_scale=1e-3)

    **Estimator.** ``estimator`` (``"weight_space"``, ``"local_reparameterization"``,
    ``"flipout"`` or None) is recorded as ``bnn.estimator`` (a module with an attribute of that
    name is refused); :func:`estimator_for` returns the
    handler, which must wrap the SVI step (``with estimator_for(bnn): svi.step(x, y)``), not the
    model alone: the handlers sample pre-activations from the *guide's* Normal over the weights,
    which they learn when the guide draws them; a forward pass of the model only sees the drawn
    values (and the prior). So the returned module's ``forward`` is not wrapped.

    :param module: the network; its ``forward`` signature is kept.
    :param prior: see above.
    :param estimator: recorded for :func:`estimator_for`.
    :param exclude: names (``fnmatch`` patterns) of modules or parameters to keep deterministic,
        e.g. ``"bn*"``, ``"features.*"``, ``"head.bias"``; a module's match covers all its
        parameters and submodules, and a module used at several paths is excluded if one of
        them matches.
    :param pretrained_scale: initial (or, with ``learn_prior_scale=False``, fixed) :math:`s` of the
        ``"pretrained"`` prior.
    :param learn_prior_scale: learn the ``"pretrained"`` prior's scale (default) or keep it fixed.
    :return: the Bayesian PyroModule (``module``'s class wrapped by ``PyroModule``, or the
        Bayesian layer if ``module`` is itself a convertible layer).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``; it contains a subclass of ``nn.LSTM``
            (not excluded).
        ValueError: unknown ``estimator`` or ``prior``; a pattern of ``exclude`` matches no
            module or parameter name; ``pretrained_scale`` not positive; an ``nn.Embedding``
            with ``max_norm``; a callable prior returning something else than a prior of the
            parameter's shape.

    Reference: Krishnan, R., Subedar, M., Tickoo, O. (2020). Specifying weight priors in Bayesian
    deep neural networks with empirical Bayes. AAAI.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if estimator is not None and estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be None or one of {ESTIMATORS}, got {estimator!r}")
    valid = prior in PRIOR_RULES if isinstance(prior, str) else isinstance(prior, Prior) or callable(prior)
    if not valid:
        raise ValueError(f"prior must be a Prior, one of {PRIOR_RULES} or a callable (name, param) -> prior, "
                         f"got {prior!r}")
    if isinstance(pretrained_scale, bool) or not isinstance(pretrained_scale, (int, float)) or not pretrained_scale > 0:
        raise ValueError(f"pretrained_scale must be a positive number, got {pretrained_scale!r}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    names = [name for name, _ in module.named_modules(remove_duplicate=False)]
    names += [name for name, _ in module.named_parameters(remove_duplicate=False)]
    unmatched = [pattern for pattern in exclude if not any(fnmatchcase(n, pattern) for n in names)]
    if unmatched:
        raise ValueError(f"exclude patterns {unmatched} match no module or parameter name of the module")
    root = copy.deepcopy(module)
    bnn = _Converter(root, prior, exclude, float(pretrained_scale), bool(learn_prior_scale)).module(root, "")
    if hasattr(bnn, "estimator"):  # setting it would replace (or, with None, delete) the module's own
        raise ValueError(f"the module has an attribute 'estimator' ({type(bnn.estimator).__name__}), where "
                         "to_bayesian records the estimator: rename it")
    bnn.estimator = estimator
    # its point-estimated parameters get param-store names of this model's own (sample sites keep theirs)
    return unique_param_names_(bnn, new_param_prefix(type(module).__name__))


def pretrained_values(module: nn.Module) -> dict[str, Tensor]:
    """
    Site name -> the converted network's original value, for every sample site made by
    :func:`to_bayesian`: pass it to ``init_to_value(values=...)`` to start a guide's locations
    at the trained weights (the mean network then computes exactly what ``module`` computed).
    """
    values = {}
    for layer in module.modules():
        for name in getattr(layer, "bayesian_parameters", ()):
            values[_join(layer._pyro_name, name)] = getattr(layer, f"{name}_pretrained").clone()
    return values


def estimator_for(module: nn.Module) -> Messenger:
    """
    A new handler of the estimator recorded on ``module`` by :func:`to_bayesian` (weight-space
    sampling if None), to wrap each SVI step: ``with estimator_for(bnn): svi.step(x, y)``.
    """
    name = getattr(module, "estimator", None)
    return estimator(name if name is not None else "weight_space")
