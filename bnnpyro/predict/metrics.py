r"""
Metrics of predictive performance and uncertainty quality.

Predictions come first, then targets, options as keywords. Samples have the sample
dimension first (``S x N`` for regression, ``S x N x C`` for classification). Scalar
metrics are returned as 0-dim tensors on the device of the inputs; per-point quantities
as ``N`` tensors. Entropies are in nats.

References:

- Gneiting, T., Raftery, A. E. (2007). Strictly proper scoring rules, prediction, and
  estimation. JASA.
- Guo, C., Pleiss, G., Sun, Y., Weinberger, K. Q. (2017). On calibration of modern
  neural networks. ICML.
- Houlsby, N., Huszár, F., Ghahramani, Z., Lengyel, M. (2011). Bayesian active learning
  for classification and preference learning. arXiv:1112.5745.
- Kull, M., Perello-Nieto, M., Kängsepp, M., Silva Filho, T., Song, H., Flach, P. (2019).
  Beyond temperature scaling: obtaining well-calibrated multiclass probabilities with
  Dirichlet calibration. NeurIPS.
- Ferro, C. A. T. (2014). Fair scores for ensemble forecasts. QJRMS.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bnnpyro.predict.summary import (
    _check_noise_scale,
    _check_probs,
    _check_same_shape,
    _check_samples,
    _check_tensor,
    _check_vector,
    _class_probs,
)

# -- regression -------------------------------------------------------------------------


def rmse(pred_mean: Tensor, y: Tensor) -> Tensor:
    r"""
    Root mean squared error :math:`\sqrt{\frac1N \sum_n (\hat y_n - y_n)^2}`.

    :param pred_mean: ``N`` point predictions (e.g. :func:`~bnnpyro.predict.summary.predictive_mean`).
    :param y: ``N`` targets.
    """
    _check_tensor(pred_mean, "pred_mean", (1,), "N")
    _check_same_shape(y, "y", pred_mean, "pred_mean", floating=False)
    return (pred_mean - y).square().mean().sqrt()


def gaussian_log_likelihood(mean_samples: Tensor, noise_scale: Tensor | float, y: Tensor) -> Tensor:
    r"""
    Average test log-likelihood under the Monte Carlo predictive mixture:

    .. math::

        \frac1N \sum_n \log \frac1S \sum_s \mathcal N(y_n; \mu_{sn}, \sigma_{sn}^2)
        = \frac1N \sum_n \Big[\operatorname{logsumexp}_s
          \log\mathcal N(y_n; \mu_{sn}, \sigma_{sn}^2) - \log S\Big].

    :param mean_samples: ``S x N`` sampled means.
    :param noise_scale: positive noise std: a number, ``N`` (per point), ``S x 1``
        (per sample) or ``S x N``.
    :param y: ``N`` targets.
    """
    _check_samples(mean_samples, "mean_samples")
    S, N = mean_samples.shape
    _check_vector(y, "y", N, floating=False)
    noise = _check_noise_scale(noise_scale, mean_samples)
    z = (y - mean_samples) / noise
    log_pdf = -0.5 * z.square() - noise.log() - 0.5 * math.log(2 * math.pi)
    return (torch.logsumexp(log_pdf, dim=0) - math.log(S)).mean()


def _check_interval(lower: Tensor, upper: Tensor) -> None:
    _check_tensor(lower, "lower", (1,), "N")
    _check_same_shape(upper, "upper", lower, "lower")
    if (lower > upper).any():
        raise ValueError("lower must not exceed upper")


def picp(lower: Tensor, upper: Tensor, y: Tensor) -> Tensor:
    r"""
    Prediction interval coverage probability :math:`\frac1N \sum_n 1[l_n \le y_n \le u_n]`.

    :param lower: ``N`` lower interval ends.
    :param upper: ``N`` upper interval ends.
    :param y: ``N`` targets.
    """
    _check_interval(lower, upper)
    _check_same_shape(y, "y", lower, "lower", floating=False)
    return ((lower <= y) & (y <= upper)).to(lower.dtype).mean()


def mean_interval_width(lower: Tensor, upper: Tensor) -> Tensor:
    r"""
    Mean prediction interval width :math:`\frac1N \sum_n (u_n - l_n)`.

    :param lower: ``N`` lower interval ends.
    :param upper: ``N`` upper interval ends.
    """
    _check_interval(lower, upper)
    return (upper - lower).mean()


def crps_gaussian(mean: Tensor, std: Tensor, y: Tensor) -> Tensor:
    r"""
    Mean closed-form CRPS of Normal predictions (Gneiting & Raftery, 2007, eq. 21); lower is
    better. With :math:`z = (y - \mu)/\sigma`:

    .. math::

        \operatorname{CRPS}(\mathcal N(\mu, \sigma^2), y)
        = \sigma\Big[z\,(2\Phi(z) - 1) + 2\varphi(z) - \tfrac{1}{\sqrt\pi}\Big].

    :param mean: ``N`` predictive means.
    :param std: ``N`` positive predictive stds.
    :param y: ``N`` targets.
    """
    _check_tensor(mean, "mean", (1,), "N")
    _check_same_shape(std, "std", mean, "mean")
    _check_same_shape(y, "y", mean, "mean", floating=False)
    if (std <= 0).any():
        raise ValueError("std must be positive")
    z = (y - mean) / std
    pdf = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    crps = std * (z * (2 * torch.special.ndtr(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
    return crps.mean()


def crps_ensemble(samples: Tensor, y: Tensor, fair: bool = False) -> Tensor:
    r"""
    Mean CRPS of the empirical distribution of ``S`` samples, in the energy form
    (Gneiting & Raftery, 2007, eq. 20):

    .. math::

        \operatorname{CRPS} = \frac1S \sum_s |x_s - y| - \frac{1}{2S^2} \sum_{s,t} |x_s - x_t|.

    The double sum is computed in ``O(S log S)`` per point by sorting: with order statistics
    :math:`x_{(1)} \le \dots \le x_{(S)}`,
    :math:`\sum_{s,t} |x_s - x_t| = 2 \sum_{i=1}^S (2i - S - 1)\, x_{(i)}`.
    ``fair=True`` divides the double sum by :math:`2S(S-1)` instead, the unbiased
    ("fair") estimate of the CRPS of the distribution the samples were drawn from
    (Ferro, 2014); it needs ``S >= 2``.

    :param samples: ``S x N`` samples of the predictive distribution.
    :param y: ``N`` targets.
    :param fair: use the unbiased ``1 / (S (S - 1))`` normalisation of the spread term.
    """
    _check_samples(samples)
    S, N = samples.shape
    _check_vector(y, "y", N, floating=False)
    if fair and S < 2:
        raise ValueError(f"crps_ensemble(fair=True) needs S >= 2 samples, got shape {tuple(samples.shape)}")
    abs_error = (samples - y).abs().mean(dim=0)
    # the weights sum to 0, so the pair sum is shift-invariant: centred on each point's median, a
    # common offset (targets in raw units, 1e4 +- 0.1) does not swamp the spread in float32
    ordered = samples.sort(dim=0).values
    ordered = ordered - ordered[(S - 1) // 2]
    weights = 2 * torch.arange(1, S + 1, dtype=samples.dtype, device=samples.device) - S - 1
    pair_sum = 2 * (weights[:, None] * ordered).sum(dim=0)  # sum_{s,t} |x_s - x_t|
    spread = pair_sum / (2 * S * (S - 1)) if fair else pair_sum / (2 * S * S)
    return (abs_error - spread).mean()


# -- classification ---------------------------------------------------------------------


def _classification_inputs(probs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Validate ``probs`` (``S x N x C`` is averaged over ``S``) and integer labels ``y`` in ``[0, C)``."""
    _check_probs(probs, "probs", (2, 3), "S x N x C or N x C")
    if probs.ndim == 3:
        probs = probs.mean(dim=0)
    N, C = probs.shape
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.shape != (N,) or y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(
            f"y must be an integer tensor of shape (N,) = ({N},), got {y.dtype} of shape {tuple(y.shape)}"
        )
    if ((y < 0) | (y >= C)).any():
        raise ValueError(f"y must hold class indices in [0, C) = [0, {C})")
    return probs, y.long()


def accuracy(probs: Tensor, y: Tensor) -> Tensor:
    r"""
    Fraction of points whose most probable class is the label,
    :math:`\frac1N\sum_n 1[\arg\max_c p_{nc} = y_n]`.

    :param probs: ``N x C`` predictive probabilities (``S x N x C`` samples are averaged over ``S``).
    :param y: ``N`` integer labels.
    """
    probs, y = _classification_inputs(probs, y)
    return (probs.argmax(dim=-1) == y).to(probs.dtype).mean()


def nll(probs: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    r"""
    Mean negative log-likelihood :math:`-\frac1N \sum_n \log \max(p_{n y_n}, \epsilon)`.

    :param probs: ``N x C`` predictive probabilities (``S x N x C`` samples are averaged over ``S``).
    :param y: ``N`` integer labels.
    :param eps: floor on the probabilities (raised to the dtype's smallest normal number).
    """
    probs, y = _classification_inputs(probs, y)
    p_true = probs.gather(1, y[:, None]).squeeze(1)
    return -p_true.clamp_min(max(eps, torch.finfo(probs.dtype).tiny)).log().mean()


def brier(probs: Tensor, y: Tensor) -> Tensor:
    r"""
    Multiclass Brier score :math:`\frac1N \sum_n \sum_c (p_{nc} - 1[y_n = c])^2`, in ``[0, 2]``.

    :param probs: ``N x C`` predictive probabilities (``S x N x C`` samples are averaged over ``S``).
    :param y: ``N`` integer labels.
    """
    probs, y = _classification_inputs(probs, y)
    onehot = F.one_hot(y, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).square().sum(dim=-1).mean()


def _check_num_bins(num_bins: int) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    return num_bins


def _bin_sums(conf: Tensor, hit: Tensor, num_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """
    Sums over equal-width bins ``((b - 1)/B, b/B]`` (``0`` falls in the first bin), per column.

    :param conf: ``N x G`` confidences in ``[0, 1]``, binned separately for each of ``G`` columns.
    :param hit: ``N x G`` outcomes in ``{0, 1}``.
    :returns: ``(counts, sum_conf, sum_hit)``, each ``G x B``; the sums are in at least ``float32``.
    """
    G = conf.shape[1]
    work = torch.promote_types(conf.dtype, torch.float32)
    conf = conf.to(work)
    edges = torch.linspace(0, 1, num_bins + 1, dtype=work, device=conf.device)[1:-1]
    offset = num_bins * torch.arange(G, device=conf.device)
    index = (torch.bucketize(conf, edges) + offset).reshape(-1)

    def total(values: Tensor) -> Tensor:
        out = torch.zeros(G * num_bins, dtype=values.dtype, device=values.device)
        return out.index_add_(0, index, values.reshape(-1)).reshape(G, num_bins)

    return total(torch.ones_like(index)), total(conf), total(hit.to(work))


def _top_label(probs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``N x 1`` max-probability confidences and ``N x 1`` correctness of the argmax."""
    conf, pred = probs.max(dim=-1)
    return conf[:, None], (pred == y)[:, None]


def expected_calibration_error(probs: Tensor, y: Tensor, num_bins: int = 15) -> Tensor:
    r"""
    Expected calibration error of the top-label confidence (Guo et al., 2017, eq. 3):
    with equal-width bins :math:`B_b` on :math:`\max_c p_{nc}`,

    .. math::

        \mathrm{ECE} = \sum_b \frac{|B_b|}{N}\,\big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|.

    :param probs: ``N x C`` predictive probabilities (``S x N x C`` samples are averaged over ``S``).
    :param y: ``N`` integer labels.
    :param num_bins: number of equal-width bins on ``[0, 1]``.
    """
    probs, y = _classification_inputs(probs, y)
    _, sum_conf, sum_hit = _bin_sums(*_top_label(probs, y), _check_num_bins(num_bins))
    return ((sum_hit - sum_conf).abs().sum() / probs.shape[0]).to(probs.dtype)


def calibration_curve(probs: Tensor, y: Tensor, num_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """
    Reliability-diagram data for the top-label confidence, over the bins of
    :func:`expected_calibration_error`.

    :param probs: ``N x C`` predictive probabilities (``S x N x C`` samples are averaged over ``S``).
    :param y: ``N`` integer labels.
    :param num_bins: number of equal-width bins on ``[0, 1]``.
    :returns: ``(confidence, accuracy, counts)``, each of length ``num_bins``: mean confidence
        and accuracy per bin (NaN for empty bins) and the int64 number of points per bin.
    """
    probs, y = _classification_inputs(probs, y)
    counts, sum_conf, sum_hit = _bin_sums(*_top_label(probs, y), _check_num_bins(num_bins))
    counts = counts[0]
    return (sum_conf[0] / counts).to(probs.dtype), (sum_hit[0] / counts).to(probs.dtype), counts


def per_class_ece(probs: Tensor, y: Tensor, num_bins: int = 15) -> Tensor:
    r"""
    Calibration error of each class probability (Kull et al., 2019): for class :math:`c`,
    with equal-width bins :math:`B_{cb}` on :math:`p_{nc}`,

    .. math::

        \mathrm{ECE}_c = \sum_b \frac{|B_{cb}|}{N}\,
        \Big|\frac{1}{|B_{cb}|}\sum_{n \in B_{cb}} 1[y_n = c]
        - \frac{1}{|B_{cb}|}\sum_{n \in B_{cb}} p_{nc}\Big|.

    :param probs: ``N x C`` predictive probabilities (``S x N x C`` samples are averaged over ``S``).
    :param y: ``N`` integer labels.
    :param num_bins: number of equal-width bins on ``[0, 1]``.
    :returns: ``C``.
    """
    probs, y = _classification_inputs(probs, y)
    onehot = F.one_hot(y, probs.shape[1])
    _, sum_conf, sum_hit = _bin_sums(probs, onehot, _check_num_bins(num_bins))
    return ((sum_hit - sum_conf).abs().sum(dim=1) / probs.shape[0]).to(probs.dtype)


def classwise_ece(probs: Tensor, y: Tensor, num_bins: int = 15) -> Tensor:
    r"""
    Classwise ECE (Kull et al., 2019): :math:`\frac1C \sum_c \mathrm{ECE}_c`, the mean of
    :func:`per_class_ece`.

    :param probs: ``N x C`` predictive probabilities (``S x N x C`` samples are averaged over ``S``).
    :param y: ``N`` integer labels.
    :param num_bins: number of equal-width bins on ``[0, 1]``.
    """
    return per_class_ece(probs, y, num_bins=num_bins).mean()


# -- uncertainty decomposition ----------------------------------------------------------


def _entropy(probs: Tensor) -> Tensor:
    """Entropy over the last dim in nats, with ``0 log 0 = 0``."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def predictive_entropy(probs_samples: Tensor, logits: bool = False) -> Tensor:
    r"""
    Total uncertainty: entropy of the predictive mean,
    :math:`\mathbb H[\bar p_n] = -\sum_c \bar p_{nc} \log \bar p_{nc}`,
    :math:`\bar p_{nc} = \frac1S\sum_s p_{snc}`
    (``log C`` for a uniform prediction).

    :param probs_samples: ``S x N x C`` sampled probabilities, or ``N x C`` mean probabilities
        (with ``logits=True``: logits, softmaxed over ``C`` per sample).
    :returns: ``N``.
    """
    if isinstance(probs_samples, Tensor) and probs_samples.ndim == 2:
        probs = _check_probs(probs_samples, "probs_samples", (2,), "S x N x C or N x C", logits=logits)
        return _entropy(probs.softmax(-1) if logits else probs)
    return _entropy(_class_probs(probs_samples, logits).mean(dim=0))


def expected_entropy(probs_samples: Tensor, logits: bool = False) -> Tensor:
    r"""
    Aleatoric uncertainty: mean entropy of the sampled predictions,
    :math:`\frac1S \sum_s \mathbb H[p_{sn}]`.

    :param probs_samples: ``S x N x C`` sampled probabilities (or logits with ``logits=True``).
    :returns: ``N``.
    """
    return _entropy(_class_probs(probs_samples, logits)).mean(dim=0)


def mutual_information(probs_samples: Tensor, logits: bool = False) -> Tensor:
    r"""
    Epistemic uncertainty: the mutual information between the label and the weights
    (BALD, Houlsby et al., 2011),
    :math:`\mathbb H[\bar p_n] - \frac1S \sum_s \mathbb H[p_{sn}] \ge 0`;
    round-off negatives are clamped to zero. Exactly zero where all samples agree (the difference
    of entropies leaves round-off there, up to 1e-6 in float32, which broke ties in :func:`auroc`).

    :param probs_samples: ``S x N x C`` sampled probabilities (or logits with ``logits=True``).
    :returns: ``N``.
    """
    probs = _class_probs(probs_samples, logits)
    mi = (_entropy(probs.mean(dim=0)) - _entropy(probs).mean(dim=0)).clamp_min(0)
    agree = (probs == probs[0]).all(dim=-1).all(dim=0)
    return mi.masked_fill(agree, 0.0)


# -- out-of-distribution detection ------------------------------------------------------


def auroc(score_in: Tensor, score_out: Tensor) -> Tensor:
    r"""
    Area under the ROC curve for telling out-of-distribution points from in-distribution
    points by a score that is larger for "more OOD" (e.g. :func:`predictive_entropy`,
    :func:`mutual_information`). Computed as the normalised Mann–Whitney U statistic,
    ties counting one half:

    .. math::

        \mathrm{AUROC} = \frac{1}{n_\text{in} n_\text{out}} \sum_{i,j}
        \Big(1[s^\text{out}_j > s^\text{in}_i] + \tfrac12\, 1[s^\text{out}_j = s^\text{in}_i]\Big),

    with exact integer counts from a binary search in the sorted in-distribution scores
    (``O((n_in + n_out) log n_in)``).

    :param score_in: ``N_in`` scores of in-distribution points.
    :param score_out: ``N_out`` scores of out-of-distribution points.
    """
    _check_tensor(score_in, "score_in", (1,), "N_in")
    _check_tensor(score_out, "score_out", (1,), "N_out")
    dtype = torch.promote_types(score_in.dtype, score_out.dtype)
    ordered = score_in.to(dtype).sort().values
    score_out = score_out.to(dtype)
    below = torch.searchsorted(ordered, score_out, right=False)  # in-scores < each out-score
    below_or_tied = torch.searchsorted(ordered, score_out, right=True)
    twice_u = (below + below_or_tied).sum()
    # in float64: the counts reach 2^24 (float32's integer precision) at about 3,000 x 3,000 scores
    return (twice_u.double() / (2 * score_in.numel() * score_out.numel())).to(dtype)
