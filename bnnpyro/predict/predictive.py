"""Vectorized posterior predictive: all posterior samples in one batched pass."""

from __future__ import annotations

import contextlib
import numbers
from typing import Callable, Sequence

import pyro
from pyro.distributions import MaskedDistribution
from pyro.distributions.util import is_validation_enabled
import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
import torch
from torch import Tensor
from tqdm.auto import tqdm
from torch.distributions import Independent

from bnnpyro._checks import all_finite
from bnnpyro.distributions import ConvLayer, FoldedKLLayer, HiddenLayer

_PARTICLE_PLATE = "_num_predictive_samples"
_ESTIMATORS = ("auto", "local_reparameterization", "weight_space", None)
# below this input width a weight-space draw per sample (one S x D x H batched matmul) is cheaper
# than S x B x H local-reparameterization normals even when the layer's rows are shared by all S
_MIN_LOCAL_REPARAMETERIZATION_WIDTH = 128
# chunk_size="auto": rows x samples per pass at least; the elements of the widest HiddenLayer output
# (S x rows x width) the passes may grow to, so that a narrow network pays the fixed per-pass cost
# of Pyro (about 1 ms) fewer times; the rows of the first pass, which finds the widths
_AUTO_CHUNK_ELEMENTS = 65536
_AUTO_CHUNK_ACTIVATION_ELEMENTS = 8_000_000
_AUTO_CHUNK_PROBE_ROWS = 16


class _LayerSampling(Messenger):
    r"""
    Sets how each :class:`~bnnpyro.distributions.HiddenLayer` site samples during prediction.

    Both samplers give every input row's pre-activations their exact marginal (Kingma et al.,
    2015), so the per-input predictive is the same; they differ in cost. Local
    reparameterization draws ``S x B x H`` normals but computes the moments once for all ``S``
    samples when the layer's input rows are shared by them (the first layer); weight-space
    sampling draws ``S`` weight matrices (``S x D x H`` normals) and needs one batched matmul.
    ``"auto"`` uses local reparameterization for a layer whose input is shared by the samples
    and at least ``128`` wide, weight-space sampling otherwise (deeper layers, whose inputs
    differ per sample, and narrow inputs).

    ``None`` keeps each layer's own estimator. A weight-space layer's ``S`` weight draws (a
    :class:`~bnnpyro.distributions.ConvLayer`'s too, whose estimator is always its own) are made
    on the first chunk of rows and reused on the others (``weight_noise``, by site), so each of
    the ``S`` networks is one network across all inputs, as for the global sites (and the draws
    are made once, not once per chunk). Each
    layer's ``S x rows x (H + 1)`` output storage is handed on from one chunk to the next
    (``output_storage``): a fresh tensor of that size costs its page faults on every chunk (a
    quarter of the pass for a 13-50-1 network); :meth:`release` drops storage that a tensor kept
    by the caller shares. Use one instance per pass over the inputs.
    """

    def __init__(self, estimator: str | None) -> None:
        super().__init__()
        self.estimator = estimator
        self.weight_noise: dict[str, Tensor | tuple[Tensor, Tensor | None]] = {}
        self.output_storage: dict[str, Tensor] = {}

    def release(self, t: Tensor) -> None:
        """Stop handing on any output storage that ``t`` (kept by the caller) shares."""
        ptr = t.untyped_storage().data_ptr()
        for name in [n for n, s in self.output_storage.items() if s.untyped_storage().data_ptr() == ptr]:
            del self.output_storage[name]

    def _pyro_sample(self, msg: dict) -> None:
        fn = _base_layer(msg["fn"])
        if fn is None or msg["is_observed"]:
            return
        fn = fn.expand(fn.batch_shape)  # a copy: the guide's own layer is left as it is
        if isinstance(fn, HiddenLayer):
            if self.estimator == "auto":
                shared = fn._X_distinct.shape[:-2].numel() == 1
                local = shared and fn.dim_X >= _MIN_LOCAL_REPARAMETERIZATION_WIDTH
                fn.estimator = "local_reparameterization" if local else "weight_space"
            elif self.estimator is not None:
                fn.estimator = self.estimator
            fn.weight_space_sampling = fn.estimator == "weight_space"
            fn.output_buffer = self.output_storage.pop(msg["name"], None)
        fn.weight_noise = self.weight_noise.get(msg["name"]) if fn.estimator == "weight_space" else None
        msg["fn"] = _with_base(msg["fn"], fn)

    def _pyro_post_sample(self, msg: dict) -> None:
        fn = _base_layer(msg["fn"])
        if fn is None:
            return
        if fn.estimator == "weight_space" and fn.drawn_weight_noise is not None:
            self.weight_noise.setdefault(msg["name"], fn.drawn_weight_noise)
        if isinstance(fn, HiddenLayer) and fn.drawn_output_storage is not None:
            self.output_storage[msg["name"]] = fn.drawn_output_storage


def _base_layer(fn: object) -> HiddenLayer | ConvLayer | None:
    """The :class:`~bnnpyro.distributions.HiddenLayer` or :class:`~bnnpyro.distributions.ConvLayer`
    that ``fn`` is, or wraps (``.to_event``, ``.mask``), or ``None``."""
    while isinstance(fn, (Independent, MaskedDistribution)):
        fn = fn.base_dist
    return fn if isinstance(fn, (HiddenLayer, ConvLayer)) else None


def _with_base(fn: object, base: HiddenLayer | ConvLayer) -> object:
    """``fn`` with the layer it is or wraps replaced by ``base``, under the same wrappers."""
    if isinstance(fn, Independent):  # Pyro's (callable) subclass, as .to_event makes
        return type(fn)(_with_base(fn.base_dist, base), fn.reinterpreted_batch_ndims)
    if isinstance(fn, MaskedDistribution):
        return type(fn)(_with_base(fn.base_dist, base), fn._mask)
    return base


def _is_global_latent(site: dict) -> bool:
    """A latent sample site shared by all data points: not observed, in no plate but the particle
    plate, and not a layer's activations (a :class:`~bnnpyro.distributions.FoldedKLLayer`, e.g.
    made an event with ``.to_event(1)`` outside any data plate: one value per row of ``x``)."""
    if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
        return False
    fn = site["fn"]
    while hasattr(fn, "base_dist"):  # Independent, masked, ...
        fn = fn.base_dist
    if isinstance(fn, FoldedKLLayer):
        return False
    return all(frame.name == _PARTICLE_PLATE for frame in site["cond_indep_stack"])


def sample_predictive(
    model: Callable,
    guide: Callable,
    x: Tensor,
    num_samples: int,
    *,
    return_sites: Sequence[str] = (),
    chunk_size: int | str | None = "auto",
    max_plate_nesting: int = 1,
    estimator: str | None = "auto",
    vectorize: bool = True,
    progress: bool = False,
    **kwargs,
) -> dict[str, Tensor]:
    r"""
    Draw ``S = num_samples`` samples of the network output from the posterior predictive,
    in **one vectorized pass**: the guide and the model run once inside an outer
    ``pyro.plate`` of size ``S`` (at ``dim = -max_plate_nesting - 1``), so every weight
    (or pre-activation) site is sampled for all ``S`` particles at once and the network is
    evaluated with batched weights; there is no Python loop over samples.

    ``model(x, y=None)`` must return the network output ``f`` (``B x W``, or with leading
    sample dims under the plate), as every catalogue model and :class:`bnnpyro.nn.BayesianMLP`
    do; ``guide(x)`` is a hand-written guide or any Pyro autoguide.

    With ``chunk_size``, ``x`` is processed ``chunk_size`` rows at a time to bound memory. The
    *global* latent sites (weights, outside every data plate) are drawn once on the first chunk
    and replayed on the others, so all chunks see the same ``S`` networks. So do the
    :class:`~bnnpyro.distributions.HiddenLayer` s and
    :class:`~bnnpyro.distributions.ConvLayer` s that sample their weights (their ``S`` weight
    draws are made on the first chunk and reused, with any ``estimator``); those that sample
    pre-activations (local reparameterization) or per-row sign flips (flipout) draw them per row,
    in any case. (A weight-space :class:`~bnnpyro.distributions.EmbeddingLayer` draws its tables at
    the tokens of each chunk: per chunk.) Every input's predictive distribution is exact either way. With Pyro's validation on, ``x`` is checked for
    NaN and infinite values once, up front, and the distributions' argument checks run on the first
    pass only: the later passes run the same distributions, with the same parameters, on other
    rows of the checked ``x`` (skipping the checks over their ``S x rows`` arguments made a 13-50-1
    network's prediction at ``S = 100`` 4% faster).

    :param x: ``N x D`` inputs.
    :param int num_samples: ``S``.
    :param return_sites: names of global latent sites whose ``S x ...`` samples to return too
        (or one name).
    :param chunk_size: rows per pass; ``None``: all of ``x`` in one pass. ``"auto"`` (default):
        one pass if ``x`` has at most ``max(1, 65536 // S)`` rows; otherwise a first pass of 16 rows
        finds the widths of the :class:`~bnnpyro.distributions.HiddenLayer` outputs, and the other
        rows go in equal passes of at most ``max(65536 // S, 8e6 // (S x widest))`` rows, so that
        the widest ``S x rows x width`` output stays near ``8 * 10^6`` elements (32 MB in float32)
        when the network is narrow. Each pass costs about 1 ms of Pyro besides its arithmetic; at
        ``S = 100`` over 10,000 rows a 13-50-1 network takes 1,427-row passes (1.1-1.4x faster
        than 655-row ones), a 784-400-400-10 one 624-row passes.
    :param int max_plate_nesting: plates the model nests (1 for the catalogue models).
    :param estimator: how :class:`~bnnpyro.distributions.HiddenLayer` sites sample:
        ``"auto"`` (default) picks per layer the cheaper of local reparameterization and
        weight-space sampling, both exact per input (see :class:`_LayerSampling`);
        ``"local_reparameterization"`` or ``"weight_space"`` force one; ``None`` keeps each
        layer's own setting. (:class:`~bnnpyro.distributions.ConvLayer` s keep theirs always.)
    :param bool vectorize: ``False`` runs ``S`` passes of one network each instead, for models whose
        layers cannot take a stack of weight draws (e.g. a :func:`bnnpyro.nn.to_bayesian` CNN, whose
        ``F.conv2d`` and pooling expect 4-D inputs); same distribution, a Python loop over samples.
    :param bool progress: show a tqdm progress bar over the rows (times ``S`` with
        ``vectorize=False``). Default False.
    :returns: ``{"f": S x N x W, **{site: S x ...}}``.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or len(x) == 0:
        raise ValueError(f"x must have at least one row (its first dim), got shape {tuple(x.shape)}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    num_samples = int(num_samples)  # numpy integers too
    if isinstance(return_sites, str):
        return_sites = (return_sites,)
    grow_to = None
    if chunk_size == "auto":
        chunk_size = max(1, _AUTO_CHUNK_ELEMENTS // num_samples)
        if vectorize and estimator is not None and len(x) > chunk_size:
            # a short first pass finds the widths of the HiddenLayer outputs
            grow_to, chunk_size = chunk_size, min(chunk_size, _AUTO_CHUNK_PROBE_ROWS)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}")
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
    chunk_size = chunk_size or len(x)
    if is_validation_enabled() and x.is_floating_point() and not all_finite(x):
        row = int((~torch.isfinite(x)).reshape(len(x), -1).any(-1).nonzero()[0])
        raise ValueError(f"x contains NaN or infinite values (first in row {row})")
    total = len(x) if vectorize else num_samples * len(x)
    with torch.no_grad(), tqdm(total=total, desc="sample_predictive", unit="row", disable=not progress) as bar:
        if vectorize:
            plate = pyro.plate(_PARTICLE_PLATE, num_samples, dim=-max_plate_nesting - 1)
            try:
                f, extra = _predictive_pass(model, guide, x, chunk_size, grow_to, plate, estimator,
                                            return_sites, kwargs, bar)
            except RuntimeError as e:
                raise RuntimeError(
                    f"{e}\n\nsample_predictive: the vectorized pass over {num_samples} weight draws failed. If "
                    "the model's layers take one weight draw at a time (e.g. convolutions converted by "
                    "bnnpyro.nn.to_bayesian, or the Bayesian LSTM models, whose fused kernel takes 2-D "
                    "weights; those also have get_logits/predict), pass vectorize=False."
                ) from e
            extra = {
                name: value.reshape((num_samples,) + value.shape[max_plate_nesting + 1 :])
                if value.dim() > max_plate_nesting and value.size(0) == num_samples else value
                for name, value in extra.items()
            }
            return {"f": f.reshape((num_samples,) + f.shape[-2:]) if f.dim() >= 2 else f, **extra}
        draws = [_predictive_pass(model, guide, x, chunk_size, None, None, estimator, return_sites, kwargs, bar)
                 for _ in range(num_samples)]
    result = {"f": torch.stack([f for f, _ in draws])}
    for name in return_sites:
        result[name] = torch.stack([extra[name] for _, extra in draws])
    return result


def _predictive_pass(
    model: Callable, guide: Callable, x: Tensor, chunk_size: int, grow_to: int | None,
    plate: pyro.plate | None, estimator: str | None, return_sites: Sequence[str], kwargs: dict,
    bar: tqdm,
) -> tuple[Tensor, dict[str, Tensor]]:
    """
    The model's output on all rows of ``x``, ``chunk_size`` at a time (concatenated along the rows,
    dim -2), for one draw of the global sites, taken on the first chunk and replayed on the others;
    under ``plate`` (the particle plate) the draw is ``S`` networks at once. ``grow_to``: after the
    first chunk, take the other rows in equal chunks of at most ``grow_to`` rows, or of as many as
    keep the widest ``HiddenLayer`` output at ``_AUTO_CHUNK_ACTIVATION_ELEMENTS``. ``estimator``:
    how the guide's ``HiddenLayer`` s sample (:class:`_LayerSampling`; ``None``: as they are).
    ``bar`` advances by each chunk's rows. Returns ``(f, {site: value})``.
    """
    sampling = _LayerSampling(estimator)
    guide = sampling(guide)  # one per pass: its weight draws are this pass's

    def wrap(fn: Callable) -> Callable:
        return fn if plate is None else plate(fn)

    global_trace: poutine.Trace | None = None
    outputs = []
    extra: dict[str, Tensor] = {}
    start = 0
    while start < len(x):
        chunk = x[start : start + chunk_size]
        first = start == 0
        start += chunk_size
        # replayed, not conditioned: a conditioned site is observed, and the model's replay of
        # an observed guide site fails ("must be sampled in trace")
        guide_fn = wrap(guide) if first else poutine.replay(wrap(guide), trace=global_trace)
        # argument checks on the first pass only: the later ones differ from it only in rows of x
        checks = contextlib.nullcontext() if first else pyro.validation_enabled(False)
        with checks:
            guide_trace = poutine.trace(guide_fn).get_trace(chunk, **kwargs)
            f = poutine.replay(wrap(model), trace=guide_trace)(chunk, **kwargs)
        if first:
            global_trace = guide_trace.copy()
            for name, site in list(global_trace.nodes.items()):
                if not _is_global_latent(site):
                    global_trace.remove_node(name)
            for name in return_sites:
                if name not in guide_trace.nodes:
                    raise ValueError(f"return_sites: {name!r} is not a site of the guide")
                if not _is_global_latent(guide_trace.nodes[name]):
                    # a per-row site: its value would be the first chunk's rows only (and failed
                    # in the reshape to S x ... with a bare RuntimeError)
                    raise ValueError(f"return_sites: {name!r} is not a global latent site of the guide (it is "
                                     "in a data plate, observed or not a sample site); only those can be returned")
                extra[name] = guide_trace.nodes[name]["value"]
            kept = [*(site["value"] for site in global_trace.nodes.values()), *extra.values()]
        if not torch.is_tensor(f):
            raise TypeError("the model must return the network output f as a tensor")
        if f.dim() < 2 or f.size(-2) != len(chunk):
            raise ValueError(
                f"the model must return the network output f as B x W (rows at dim -2): got shape "
                f"{tuple(f.shape)} for {len(chunk)} rows of x; for one output return f.unsqueeze(-1)"
            )
        for value in (*kept, f):  # kept beyond this chunk: its storage is not handed on
            sampling.release(value)
        outputs.append(f)
        bar.update(len(chunk))
        if grow_to is not None and start < len(x):
            if sampling.output_storage:
                widest = max(s.numel() for s in sampling.output_storage.values()) // len(chunk)
                grow_to = max(grow_to, _AUTO_CHUNK_ACTIVATION_ELEMENTS // widest)
            passes = -(-(len(x) - start) // grow_to)  # the rest in equal chunks: one storage serves all
            chunk_size, grow_to = -(-(len(x) - start) // passes), None
    return torch.cat(outputs, dim=-2), extra
