r"""
Gradient estimators for PyroModules as Pyro effect handlers: weight-space sampling, local
reparameterization (Kingma et al., 2015) and flipout (Wen et al., 2018).

A Bayesian network written as a :class:`~pyro.nn.PyroModule` (``nn.Linear`` / ``nn.Conv1d`` /
``nn.Conv2d`` layers, or :class:`~bnnpyro.nn.BayesianLinear`, whose weights are
:class:`~pyro.nn.PyroSample` sites) draws one weight matrix per call and applies it to every
example of the mini-batch: the examples share one weight draw, and the ELBO gradient's
variance does not shrink with the batch size. The handlers here change how the layer's output
is sampled, not the model or the guide:

- the handler **records** every sample site whose distribution is a Normal (possibly wrapped in
  ``Independent``, expanded or masked), mapping the sampled tensor (by identity, through weak
  references: a record lives exactly as long as its tensor) to the Normal's ``loc`` and
  ``scale``. Pyro's :class:`~pyro.infer.autoguide.AutoNormal` samples an auxiliary
  ``<name>_unconstrained`` Normal and puts a ``Delta`` on it at the site; for real-support sites
  the Delta holds the auxiliary tensor itself, and its site value inherits the record.
- while the handler is active, a :class:`torch.overrides.TorchFunctionMode` intercepts
  ``F.linear``, ``F.conv1d`` and ``F.conv2d``: when the weight is a recorded Normal draw of the
  layer's own shape (not a batch of draws), the layer's output is sampled from the distribution
  that weight induces, instead of being computed from the weight draw.

Sites whose values are replayed from a trace (the model under SVI) or observed are never
recorded: the model sees the guide's draws, so **the guide must run under the handler too**.
Wrap the whole step, ``with LocalReparameterization(): svi.step(x, y)``, or wrap model and
guide with one instance, ``lr = LocalReparameterization(); SVI(lr(model), lr(guide), ...)``.
Anything else (weights not recorded, e.g. drawn by ``AutoDiagonalNormal``'s joint latent,
batched weights under ``vectorize_particles``, other ops such as the LSTM kernel or
``F.embedding``) runs unchanged, i.e. with weight-space sampling.

Flipout is exact: every example sees one full weight draw (the mean plus the shared perturbation
with its rows and columns sign-flipped), so the expected ELBO is that of weight-space sampling and
only the correlation between examples (and so the gradient variance) differs. Local
reparameterization is exact for ``F.linear``: each output unit of an example has its exact
marginal and the units are independent under a mean-field posterior. For convolutions it samples
every output *position* independently, while under one weight draw the positions of an example
are correlated through the shared filter; layers that then combine positions (pooling,
flattening into a linear layer) see a different joint distribution, so the objective is the
usual approximation of Kingma et al. (2015) and Molchanov et al. (2017), not the weight-space
ELBO. The weight draw itself is still
used by the ELBO's ``log q(w) - log p(w)`` term (or replaced by the analytic KL).

A weight draw used by several calls in one forward pass (a module applied twice, a cell in a loop
over time steps) is one draw for all of them under weight-space sampling. :class:`Flipout` keeps
each example's signs across the calls, so it stays exact; :class:`LocalReparameterization`, whose
noise is per call, raises ``ValueError`` rather than train another model.

References:
    Kingma, D. P., Salimans, T., Welling, M. (2015). Variational dropout and the local
    reparameterization trick. NeurIPS.
    Wen, Y., Vicol, P., Ba, J., Tran, D., Grosse, R. (2018). Flipout: Efficient pseudo-independent
    weight perturbations on mini-batches. ICLR.
    Molchanov, D., Ashukha, A., Vetrov, D. (2017). Variational dropout sparsifies deep neural
    networks. ICML.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from pyro.distributions import Delta, ExpandedDistribution, MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.runtime import _PYRO_STACK, Message
from torch import Tensor
from torch.distributions import Independent, Normal
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from bnnpyro.distributions.factorized_normal import FactorizedNormal
from bnnpyro.distributions.hidden_layer import random_signs

ESTIMATORS = ("weight_space", "local_reparameterization", "flipout")

# the intercepted ops and the number of spatial dims of their inputs (weight dims = 2 + spatial)
_OPS: dict[Callable, int] = {F.linear: 0, F.conv1d: 1, F.conv2d: 2}

_Record = Optional[tuple[Tensor, Tensor]]


def _normal_loc_scale(fn: Any, value: Tensor) -> _Record:
    """``(loc, scale)`` expanded to ``value``'s shape if ``fn`` is an elementwise Normal (or a
    :class:`~bnnpyro.distributions.FactorizedNormal`), else None."""
    while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    if not isinstance(fn, (Normal, FactorizedNormal)):
        return None
    try:
        shape = torch.broadcast_shapes(fn.loc.shape, fn.scale.shape, value.shape)
    except RuntimeError:
        return None
    if shape != value.shape:
        return None
    return fn.loc.expand(shape), fn.scale.expand(shape)


def _is_replayed(name: str) -> bool:
    """Whether a replay handler on the stack supplies the value of site ``name``."""
    return any(
        isinstance(m, ReplayMessenger) and m.trace is not None and name in m.trace.nodes for m in _PYRO_STACK
    )


def _split_args(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Optional[Tensor], tuple, dict]:
    """``(input, weight, bias, other positional args, other kwargs)`` of a linear/conv call."""
    kwargs = dict(kwargs)
    values = list(args[:3])
    for name in ("input", "weight", "bias")[len(values):]:
        values.append(kwargs.pop(name, None))
    return values[0], values[1], values[2], tuple(args[3:]), kwargs


class _InterceptMode(TorchFunctionMode):
    """Routes the intercepted ops to the estimator's :meth:`_Estimator._apply`."""

    def __init__(self, estimator: "_Estimator") -> None:
        super().__init__()
        self.estimator = estimator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spatial = _OPS.get(func)
        if spatial is None:
            return func(*args, **kwargs)
        return self.estimator._apply(func, spatial, args, kwargs)


class _Estimator(Messenger):
    r"""
    Base of the pre-activation estimators: records Normal sample sites and intercepts
    ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` while active (see the module docstring).
    Subclasses implement :meth:`_sample` for a weight of recorded ``(loc, scale)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._records: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # weight draws already used by an intercepted op in the current pass over them (a replay of
        # the draw starts a new one) -> what the estimator keeps for a reuse
        self._uses: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._mode: Optional[_InterceptMode] = None

    def __enter__(self):
        result = super().__enter__()
        self._mode = _InterceptMode(self)
        self._mode.__enter__()
        return result

    def __exit__(self, exc_type, exc_value, traceback):
        mode, self._mode = self._mode, None
        mode.__exit__(exc_type, exc_value, traceback)
        return super().__exit__(exc_type, exc_value, traceback)

    def _pyro_post_sample(self, msg: Message) -> None:
        value = msg["value"]
        if msg["is_observed"] or not isinstance(value, Tensor):
            return
        if _is_replayed(msg["name"]):
            # a replay of a draw starts another pass over it (the model's pass, a later chunk's):
            # the calls it served so far were another pass's
            self._uses.pop(value, None)
            return
        if value in self._records:
            return
        fn = msg["fn"]
        if isinstance(fn, Delta) and fn.v in self._records and fn.v.shape == value.shape:
            self._records[value] = self._records[fn.v]  # AutoNormal: the site's Delta on its auxiliary Normal
        else:
            self._records[value] = _normal_loc_scale(fn, value)

    def _apply(self, op: Callable, spatial: int, args: tuple, kwargs: dict) -> Tensor:
        x, weight, bias, rest, options = _split_args(args, kwargs)
        record = self._records.get(weight) if isinstance(weight, Tensor) else None
        if record is None or weight.dim() != 2 + spatial or not isinstance(x, Tensor):
            return op(*args, **kwargs)  # not a recorded Normal draw of the layer's shape: unchanged
        bias_record = self._records.get(bias) if isinstance(bias, Tensor) else None
        return self._sample(lambda inp, w, b: op(inp, w, b, *rest, **options),
                            spatial, x, weight, bias, record, bias_record)

    def _sample(self, op, spatial, x, weight, bias, record, bias_record) -> Tensor:
        raise NotImplementedError


class WeightSpace(Messenger):
    """Weight-space sampling, Pyro's default (one weight draw per call shared by the mini-batch):
    a handler that does nothing, for symmetry with :class:`LocalReparameterization` and :class:`Flipout`."""


def _reuse_error(name: str, weight: Tensor, why: str) -> ValueError:
    return ValueError(
        f"{name}: one weight draw of shape {tuple(weight.shape)} is used by a second linear/conv call "
        f"(a module applied twice, or in a loop over time steps) {why}. Use "
        + ("Flipout, which keeps each example's weights across calls, or " if name != "Flipout" else "")
        + "weight-space sampling (no handler) for this model."
    )


class LocalReparameterization(_Estimator):
    r"""
    The local reparameterization trick (Kingma et al., 2015) as a Pyro effect handler.

    For ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` with a recorded weight
    :math:`W \sim \mathcal N(\mu_W, \sigma_W^2)` (elementwise), the output is sampled as

    .. math::

        m = \operatorname{op}(x, \mu_W, \mu_b), \quad
        v = \operatorname{op}(x^2, \sigma_W^2, \sigma_b^2), \quad
        y = m + \sqrt{v}\,\varepsilon, \quad \varepsilon \sim \mathcal N(0, I),

    with :math:`\varepsilon` independent for every output element (so every example, and every
    spatial position of a convolution, gets its own pre-activation noise). A bias recorded as a
    Normal enters through :math:`\mu_b, \sigma_b^2`; any other bias (a parameter, or a draw of
    another distribution) is added to :math:`m` as it is. ``stride``, ``padding``, ``dilation``
    and ``groups`` apply to both :math:`m` and :math:`v`. Each output element has exactly its
    weight-space marginal; elements are independent (under weight sampling they are correlated
    through the shared draw, for a convolution also across positions).

    Usage: ``with LocalReparameterization(): svi.step(x, y)``, or one instance wrapping model
    and guide, ``lr = LocalReparameterization(); SVI(lr(model), lr(guide), optim, elbo)``;
    see :mod:`bnnpyro.nn.estimators` for what is recorded and what falls back.

    A weight draw used by a second call (a module applied twice, an RNN cell in a loop) raises
    ``ValueError``: independent noise per call would be another model than one weight draw shared
    by the calls (for ``W (W x)`` with ``W ~ N(0, 1)`` the mean output 0 instead of 1).
    """

    def _sample(self, op, spatial, x, weight, bias, record, bias_record) -> Tensor:
        if weight in self._uses:
            raise _reuse_error("LocalReparameterization", weight,
                               "in one draw: its outputs would get independent noise per call")
        self._uses[weight] = True
        loc, scale = record
        if bias_record is not None:
            mean = op(x, loc, bias_record[0])
            var = op(x * x, scale * scale, bias_record[1] * bias_record[1])
        else:
            mean = op(x, loc, bias)
            var = op(x * x, scale * scale, None)
        # the clamp keeps sqrt's gradient finite where the variance is exactly 0 (it is then 0)
        std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()
        return mean + std * torch.randn_like(mean)


class Flipout(_Estimator):
    r"""
    Flipout (Wen et al., 2018) as a Pyro effect handler.

    For ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` with a recorded weight draw
    :math:`W = \mu_W + \Delta W` (:math:`\Delta W` symmetric about 0 and elementwise independent,
    as for a diagonal Normal), example :math:`n` uses the weight
    :math:`\mu_W + \Delta W \odot s^{\text{out}}_n {s^{\text{in}}_n}^\top`, computed as

    .. math::

        y_n = \operatorname{op}(x_n, \mu_W) + \operatorname{op}(x_n \odot s^{\text{in}}_n, \Delta W)
              \odot s^{\text{out}}_n + b,

    with :math:`s^{\text{in}}_n \in \{\pm1\}^{\text{in features / channels}}` and
    :math:`s^{\text{out}}_n \in \{\pm1\}^{\text{out features / channels}}` i.i.d. uniform per
    example (broadcast over a convolution's spatial dims). Every leading dim of the input counts
    as an example dim. :math:`\Delta W = W - \mu_W` is the actual draw's perturbation, so the
    sign-flipped weight has the distribution of :math:`W` and each example's output has exactly
    its weight-space distribution, while different examples' perturbations are uncorrelated.
    The bias (sampled or not) is added as it is, shared by the mini-batch. Costs two ops instead
    of one.

    A weight draw used by several calls (a module applied twice, an RNN cell in a loop over time
    steps) keeps its signs: example :math:`n` of every call sees the same weight
    :math:`\mu_W + \Delta W \odot s^{\text{out}}_n {s^{\text{in}}_n}^\top`, as all calls share
    :math:`W` under weight-space sampling. The calls must then have the same example dims
    (``ValueError`` otherwise).

    Usage as :class:`LocalReparameterization`.
    """

    def _sample(self, op, spatial, x, weight, bias, record, bias_record) -> Tensor:
        loc = record[0]
        sign_shape = x.shape[: x.dim() - spatial] + (1,) * spatial
        s_in, s_out = self._uses.get(weight, (None, None))
        if s_in is None:
            s_in = random_signs(sign_shape, x)
        elif s_in.shape != sign_shape:
            raise _reuse_error("Flipout", weight, f"with inputs of shape {tuple(x.shape)}, whose example dims differ "
                               f"from the first call's (signs {tuple(s_in.shape)}): its examples cannot keep their weights")
        mean = op(x, loc, bias)
        perturbation = op(x * s_in, weight - loc, None)
        if s_out is None:
            s_out = random_signs(perturbation.shape[: perturbation.dim() - spatial] + (1,) * spatial, x)
        self._uses[weight] = (s_in, s_out)
        return mean + perturbation * s_out


_HANDLERS = {"weight_space": WeightSpace, "local_reparameterization": LocalReparameterization, "flipout": Flipout}


def estimator(name: str) -> Messenger:
    """
    A new handler for estimator ``name``: ``"weight_space"`` (:class:`WeightSpace`),
    ``"local_reparameterization"`` (:class:`LocalReparameterization`) or ``"flipout"``
    (:class:`Flipout`).

    Raises:
        ValueError: ``name`` is not one of :data:`ESTIMATORS`.
    """
    if not isinstance(name, str) or name not in _HANDLERS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {name!r}")
    return _HANDLERS[name]()
