r"""
Summaries of Monte Carlo posterior predictive samples.

Samples come with the sample dimension first: regression ``S x N`` samples of the
predicted mean (with optional observation-noise scales), classification ``S x N x C``
class probabilities (or logits). Every function computes on the device and in the dtype
of its inputs; the private ``_check_*`` helpers are shared with
:mod:`bnnpyro.predict.metrics` and raise ``ValueError`` naming the argument and the
expected shape.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import Tensor

# -- input validation (shared with bnnpyro.predict.metrics) --------------------------


def _check_tensor(x, name: str, ndims: tuple[int, ...], desc: str, floating: bool = True) -> Tensor:
    """Check type, number of dims (``desc`` names the expected shape), non-emptiness, NaNs."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in ndims:
        raise ValueError(f"{name} must be {desc}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty {desc}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.is_floating_point() and torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x


def _check_samples(samples, name: str = "samples") -> Tensor:
    """A floating ``S x N`` tensor of regression samples."""
    return _check_tensor(samples, name, (2,), "S x N")


def _check_vector(x, name: str, n: int, floating: bool = True) -> Tensor:
    """A 1-D tensor of length ``n``."""
    _check_tensor(x, name, (1,), "N", floating=floating)
    if x.shape[0] != n:
        raise ValueError(f"{name} must have shape (N,) = ({n},), got shape {tuple(x.shape)}")
    return x


def _check_same_shape(x, name: str, ref: Tensor, ref_name: str, floating: bool = True) -> Tensor:
    """A tensor with the shape of ``ref``; used for targets and interval ends."""
    if isinstance(x, Tensor) and x.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got shape {tuple(x.shape)}"
        )
    return _check_tensor(x, name, (ref.ndim,), f"{ref_name}-shaped", floating=floating)


def _broadcasts_to(shape: torch.Size, target: tuple[int, ...]) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == torch.Size(target)
    except RuntimeError:
        return False


def _check_noise_scale(noise_scale, samples: Tensor, strict: bool = True) -> Tensor:
    """
    Broadcast observation-noise scales to the ``S x N`` shape of ``samples``.

    Accepts a Python number or a tensor of shape ``()``, ``N``, ``S x 1`` or ``S x N``
    (anything of at most 2 dims broadcastable to ``S x N``; a 1-D tensor is per point).
    ``strict`` requires scales ``> 0``, otherwise ``>= 0``.
    """
    S, N = samples.shape
    expected = f"a scalar, N, S x 1 or S x N (S={S}, N={N}) tensor"
    if isinstance(noise_scale, (int, float)) and not isinstance(noise_scale, bool):
        noise = torch.as_tensor(noise_scale, dtype=samples.dtype, device=samples.device)
    elif isinstance(noise_scale, Tensor):
        noise = noise_scale
    else:
        raise TypeError(f"noise_scale must be a number or a torch.Tensor, got {type(noise_scale).__name__}")
    if noise.ndim > 2 or not _broadcasts_to(noise.shape, (S, N)):
        raise ValueError(f"noise_scale must be {expected}, got shape {tuple(noise.shape)}")
    if not noise.is_floating_point():
        noise = noise.to(samples.dtype)
    if torch.isnan(noise).any():
        raise ValueError("noise_scale contains NaN")
    if (noise <= 0).any() if strict else (noise < 0).any():
        raise ValueError(f"noise_scale must be {'positive' if strict else 'non-negative'}")
    return noise.expand(S, N)


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(level)


def _check_probs(probs, name: str, ndims: tuple[int, ...], desc: str, logits: bool = False) -> Tensor:
    """Probabilities in ``[0, 1]`` summing to one over the last dim; logits: no ``+inf``, and at least
    one finite logit per distribution (a softmax of ``+inf`` or of all ``-inf`` is NaN)."""
    _check_tensor(probs, name, ndims, desc)
    if logits:
        if torch.isposinf(probs).any() or torch.isneginf(probs).all(-1).any():
            raise ValueError(f"{name} (logits) must be below +inf, with at least one finite logit per row")
        return probs
    if ((probs < 0) | (probs > 1)).any():
        raise ValueError(f"{name} must lie in [0, 1] (got logits? apply a softmax or pass logits=True)")
    tol = max(1e-3, 10 * torch.finfo(probs.dtype).eps)
    if ((probs.sum(-1) - 1).abs() > tol).any():
        raise ValueError(f"{name} must sum to 1 over the last (class) dim")
    return probs


def _class_probs(probs_samples, logits: bool) -> Tensor:
    """Validated ``S x N x C`` probabilities, from probabilities or logits."""
    _check_probs(probs_samples, "probs_samples", (3,), "S x N x C", logits=logits)
    return probs_samples.softmax(-1) if logits else probs_samples


# -- regression -------------------------------------------------------------------------


def predictive_mean(samples: Tensor) -> Tensor:
    r"""
    Posterior predictive mean :math:`\bar\mu_n = \frac1S \sum_s \mu_{sn}`.

    :param samples: ``S x N`` samples of the predicted mean.
    :returns: ``N``.
    """
    return _check_samples(samples).mean(dim=0)


def predictive_std(samples: Tensor, noise_scale: Tensor | float | None = None) -> Tensor:
    r"""
    Standard deviation of the posterior predictive, an equal-weight mixture of the ``S``
    sampled predictions (law of total variance):

    .. math::

        \sigma_n = \sqrt{\tfrac1S \textstyle\sum_s (\mu_{sn} - \bar\mu_n)^2
        + \tfrac1S \textstyle\sum_s \sigma_{sn}^2},

    i.e. epistemic (spread of the means, a population variance) plus aleatoric
    (mean noise variance, only when ``noise_scale`` is given).

    :param samples: ``S x N`` samples of the predicted mean.
    :param noise_scale: observation-noise std: a number, ``N`` (per point), ``S x 1``
        (per sample, e.g. a sampled homoscedastic noise) or ``S x N``.
    :returns: ``N``.
    """
    _check_samples(samples)
    var = samples.var(dim=0, correction=0)
    if noise_scale is not None:
        var = var + _check_noise_scale(noise_scale, samples, strict=False).square().mean(dim=0)
    return var.sqrt()


def _sorted_quantile(sorted_samples: Tensor, q: float) -> Tensor:
    """Quantile ``q`` along dim 0 of sorted samples, linearly interpolated (as ``torch.quantile``)."""
    S = sorted_samples.shape[0]
    pos = q * (S - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, S - 1)
    return sorted_samples[lo] + (pos - lo) * (sorted_samples[hi] - sorted_samples[lo])


def quantile_interval(samples: Tensor, level: float = 0.95) -> tuple[Tensor, Tensor]:
    """
    Central interval from the empirical quantiles ``(1 - level) / 2`` and ``(1 + level) / 2``
    over the sample dim (linear interpolation between order statistics, as
    ``torch.quantile``; computed by sorting, so no size limit and any float dtype).

    Pass samples of the observations (mean plus noise) for a predictive interval, samples
    of the mean for a credible interval of the regression function.

    :param samples: ``S x N``.
    :param level: nominal coverage in ``(0, 1)``.
    :returns: ``(lower, upper)``, each ``N``.
    """
    _check_samples(samples)
    level = _check_level(level)
    ordered = samples.sort(dim=0).values
    return _sorted_quantile(ordered, (1 - level) / 2), _sorted_quantile(ordered, (1 + level) / 2)


def normal_interval(mean: Tensor, std: Tensor, level: float = 0.95) -> tuple[Tensor, Tensor]:
    r"""
    Central interval :math:`\mu \pm z\,\sigma` of a Normal, :math:`z = \Phi^{-1}((1 + \text{level})/2)`;
    with :func:`predictive_mean` and :func:`predictive_std` this is the moment-matched
    interval of the predictive mixture.

    :param mean: ``N``.
    :param std: ``N``, non-negative.
    :param level: nominal coverage in ``(0, 1)``.
    :returns: ``(lower, upper)``, each ``N``.
    """
    _check_tensor(mean, "mean", (1,), "N")
    _check_same_shape(std, "std", mean, "mean")
    if (std < 0).any():
        raise ValueError("std must be non-negative")
    z = NormalDist().inv_cdf((1 + _check_level(level)) / 2)
    return mean - z * std, mean + z * std


def _mixture_quantile(mean: Tensor, noise: Tensor, q: float) -> Tensor:
    """Quantile ``q`` of the ``S``-component Gaussian mixtures (``S x N`` → ``N``) by bisection,
    until every bracket is within the dtype's precision of the quantile's magnitude plus the smallest
    component std (or cannot be split): a fixed number of halvings, one per mantissa bit, left an
    error relative to the components' spread instead (5.7e-3 relative in float32 with one component
    1e6 away from 99 others)."""
    component = mean + NormalDist().inv_cdf(q) * noise
    # The mixture CDF at the smallest (largest) component quantile is <= q (>= q).
    lo, hi = component.min(dim=0).values, component.max(dim=0).values
    finfo = torch.finfo(mean.dtype)
    scale = noise.expand_as(mean).min(dim=0).values
    for _ in range(finfo.bits + 2 * math.ceil(math.log2(finfo.max))):  # enough for any two finite floats
        mid = (lo + hi) / 2
        precise = hi - lo <= finfo.eps * (torch.maximum(lo.abs(), hi.abs()) + scale)
        if (precise | (mid == lo) | (mid == hi)).all():
            break
        below = torch.special.ndtr((mid - mean) / noise).mean(dim=0) < q
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def gaussian_mixture_interval(
    mean_samples: Tensor, noise_scale: Tensor | float, level: float = 0.95
) -> tuple[Tensor, Tensor]:
    r"""
    Exact central interval of the predictive mixture
    :math:`p(y_n) = \frac1S \sum_s \mathcal N(y_n; \mu_{sn}, \sigma_{sn}^2)`: the quantiles
    ``(1 -/+ level) / 2`` of the mixture CDF :math:`\frac1S\sum_s\Phi((y-\mu_{sn})/\sigma_{sn})`,
    found by bisection between the extreme component quantiles down to the dtype's
    precision (``O(S N)`` per iteration; half precision is computed in ``float32``).

    :param mean_samples: ``S x N`` sampled means.
    :param noise_scale: positive noise std: a number, ``N`` (per point), ``S x 1``
        (per sample) or ``S x N``.
    :param level: nominal coverage in ``(0, 1)``.
    :returns: ``(lower, upper)``, each ``N``.
    """
    _check_samples(mean_samples, "mean_samples")
    noise = _check_noise_scale(noise_scale, mean_samples)
    level = _check_level(level)
    work = torch.promote_types(mean_samples.dtype, torch.float32)
    mean, noise = mean_samples.to(work), noise.to(work)
    lower = _mixture_quantile(mean, noise, (1 - level) / 2)
    upper = _mixture_quantile(mean, noise, (1 + level) / 2)
    return lower.to(mean_samples.dtype), upper.to(mean_samples.dtype)


# -- classification ---------------------------------------------------------------------


def mean_probs(probs_samples: Tensor, logits: bool = False) -> Tensor:
    r"""
    Bayesian model average :math:`\bar p_{nc} = \frac1S \sum_s p_{snc}`.

    :param probs_samples: ``S x N x C`` probabilities (or logits with ``logits=True``,
        softmaxed over ``C`` before averaging).
    :returns: ``N x C``.
    """
    return _class_probs(probs_samples, logits).mean(dim=0)
