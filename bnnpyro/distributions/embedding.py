"""A Bayesian embedding table as a Pyro distribution over the looked-up vectors."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import lazy_property

from bnnpyro.distributions._validation import (
    check_float_tensors,
    check_layer_values,
    check_prior_shape,
    check_rows,
)
from bnnpyro.distributions.folded_kl import FoldedKLLayer
from bnnpyro.distributions.kl import minibatch_kl_factor, normal_kl_sum

EMBEDDING_ESTIMATORS = ("local_reparameterization", "weight_space")


class EmbeddingLayer(FoldedKLLayer):
    r"""
    An embedding table with a factorised Gaussian over its entries,
    :math:`W_{ve} \sim \mathcal N(\mu_{ve}, \sigma_{ve}^2)`, represented as a distribution
    over the looked-up vectors, with the conventions of :class:`~bnnpyro.distributions.HiddenLayer`.

    A lookup of token :math:`i` is the linear map :math:`\mathrm{onehot}(i)^\top W = W_i`, so its
    exact marginal is :math:`\mathcal N(\mu_i, \sigma_i^2)` elementwise.

    **Estimators** (``estimator=``), with the same per-lookup marginals:

    - ``"local_reparameterization"`` (default): every lookup draws its row independently,
      :math:`\mu_i + \sigma_i \odot \varepsilon` (the local reparameterization of Kingma et
      al., 2015, exact for a one-hot input).
    - ``"weight_space"``: one table draw per replica of the network (per element of
      ``sample_shape + batch_shape[:-1]``), so a token repeated within a replica gets the same
      vector. Only the rows of the tokens present are drawn.

    Flipout does not apply: a one-hot input has one non-zero entry, so its sign flips only flip
    the sign of the replica's shared row perturbation, while local reparameterization already
    samples every lookup exactly and independently.

    Positions equal to ``padding_idx`` get zero vectors. The folded KL (:meth:`log_prob`,
    ``KL_factor * KL / B`` per row, positive), ``dataset_size`` and the registered
    :func:`torch.distributions.kl_divergence` between two layers follow :class:`HiddenLayer`;
    the KL is summed over the whole ``V x E`` table.

    :param torch.Tensor input: ``*batch x T`` integer token ids in ``[0, V)`` (any integer dtype,
        taken as int64), one sequence per row; the rightmost batch dimension is the minibatch.
    :param torch.Tensor W_mean: ``V x E`` table means.
    :param torch.Tensor W_scale: ``V x E`` positive table standard deviations.
    :param float KL_factor: multiplier of the KL for the whole minibatch. Default 1.
    :param W_prior_scale: scale of the Normal prior (float or tensor broadcastable to ``V x E``).
    :param W_prior_mean: mean of the Normal prior (float or tensor broadcastable to ``V x E``).
    :param int padding_idx: token id whose positions output zeros (negative counts from ``V``).
    :param str estimator: ``"local_reparameterization"`` or ``"weight_space"``.
    :param int dataset_size: ``N``; if given, ``KL_factor`` is set to ``B / N``.

    The batch shape is ``input.shape[:-1]``, the event shape ``T x E``.

    Reference: Kingma, D. P., Salimans, T., Welling, M. (2015). Variational dropout and the
    local reparameterization trick. NeurIPS.
    """

    arg_constraints = {"W_mean": constraints.real, "W_scale": constraints.positive}
    support = constraints.independent(constraints.real, 2)

    def __init__(
        self,
        input: Tensor,
        W_mean: Tensor,
        W_scale: Tensor,
        KL_factor: float | Tensor = 1.0,
        W_prior_scale: float | Tensor = 1.0,
        *,
        W_prior_mean: float | Tensor = 0.0,
        padding_idx: int | None = None,
        estimator: str = "local_reparameterization",
        dataset_size: int | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if not torch.is_tensor(input):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.is_floating_point() or input.is_complex() or input.dtype == torch.bool:
            raise TypeError(f"input must be an integer tensor of token ids, got dtype {input.dtype}")
        if input.dtype != torch.int64:
            # a uint8 index tensor would be taken as a boolean mask by the lookups
            input = input.long()
        check_float_tensors(W_mean=W_mean, W_scale=W_scale)
        if input.device != W_mean.device:
            raise ValueError(f"input is on {input.device} but W_mean is on {W_mean.device}: put them on one device")
        if W_mean.dim() != 2:
            raise ValueError(f"W_mean must be 2-D (V x E), got shape {tuple(W_mean.shape)}")
        if W_scale.shape != W_mean.shape:
            raise ValueError(
                f"W_scale must have the shape of W_mean {tuple(W_mean.shape)}, got {tuple(W_scale.shape)}"
            )
        if input.dim() < 2:
            raise ValueError(
                f"input must have shape (..., B, T) with at least one batch dimension, got shape {tuple(input.shape)}"
            )
        if estimator == "flipout":
            raise ValueError(
                "estimator='flipout' is not meaningful for an embedding: a lookup is one row, "
                "which 'local_reparameterization' already samples exactly and independently"
            )
        if estimator not in EMBEDDING_ESTIMATORS:
            raise ValueError(f"estimator must be one of {EMBEDDING_ESTIMATORS}, got {estimator!r}")
        V = W_mean.size(0)
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not -V <= padding_idx < V:
                raise ValueError(f"padding_idx must be an int in [-{V}, {V}) (V = W_mean.size(0)), got {padding_idx!r}")
            padding_idx %= V
        check_prior_shape("W_prior_mean", W_prior_mean, W_mean.shape, "W_mean")
        check_prior_shape("W_prior_scale", W_prior_scale, W_mean.shape, "W_mean")
        rows = input.size(-2)
        check_rows("input", input, rows)
        KL_factor = minibatch_kl_factor(rows, KL_factor, dataset_size)

        self.input = input
        self._input_distinct = input
        self.W_mean = W_mean
        self.W_scale = W_scale
        self.KL_factor = KL_factor
        self.W_prior_mean = W_prior_mean
        self.W_prior_scale = W_prior_scale
        self.padding_idx = padding_idx
        self.estimator = estimator
        self._kl_per_row = KL_factor / rows

        validate = Distribution._validate_args if validate_args is None else validate_args
        if validate:
            self._check_values()
        event_shape = torch.Size([input.size(-1), W_mean.size(1)])
        super().__init__(input.shape[:-1], event_shape, validate_args=False)
        self._validate_args = validate

    def _check_values(self) -> None:
        V = self.W_mean.size(0)
        if self.input.numel() and (bool(self.input.min() < 0) or bool(self.input.max() >= V)):
            raise ValueError(
                f"input token ids must lie in [0, {V}) (V = W_mean.size(0)), got range "
                f"[{int(self.input.min())}, {int(self.input.max())}]"
            )
        check_layer_values({"W_mean": self.W_mean}, {"W_scale": self.W_scale}, "W", self.W_prior_mean,
                           self.W_prior_scale, self.KL_factor)

    def expand(self, batch_shape, _instance=None) -> "EmbeddingLayer":
        new = self._get_checked_instance(EmbeddingLayer, _instance)
        batch_shape = torch.Size(batch_shape)
        new.input = self.input.expand(batch_shape + self.input.shape[-1:])
        # lookups are done on the distinct rows and broadcast to the new batch shape
        new._input_distinct = self._input_distinct
        attrs = ("W_mean", "W_scale", "KL_factor", "W_prior_mean", "W_prior_scale", "padding_idx", "estimator",
                 "_kl_per_row")
        return self._finish_expand(new, batch_shape, attrs)

    @lazy_property
    def KL(self) -> Tensor:
        """Scalar KL of the table distribution from the prior, summed over all ``V x E`` entries."""
        return normal_kl_sum(self.W_mean, self.W_scale, self.W_prior_mean, self.W_prior_scale)

    def _mask_padding(self, out: Tensor, input: Tensor) -> Tensor:
        if self.padding_idx is None:
            return out
        return out.masked_fill(input.unsqueeze(-1) == self.padding_idx, 0.0)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        sample_shape = torch.Size(sample_shape)
        dtype, device = self.W_mean.dtype, self.W_mean.device
        if self.estimator == "local_reparameterization":
            input = self._input_distinct
            mean, scale = self.W_mean[input], self.W_scale[input]
            eps = torch.randn(sample_shape + self.batch_shape + self.event_shape, dtype=dtype, device=device)
            return self._mask_padding(torch.addcmul(mean, eps, scale), input)
        # weight space: one table per replica, drawn only at the U distinct tokens present
        lead = sample_shape + self.batch_shape[:-1]
        R = math.prod(lead)
        tokens, inverse = torch.unique(self._input_distinct, return_inverse=True)
        eps = torch.randn((R,) + tokens.shape + self.W_mean.shape[-1:], dtype=dtype, device=device)
        tables = torch.addcmul(self.W_mean[tokens], eps, self.W_scale[tokens])  # R x U x E
        inverse = inverse.expand(sample_shape + self.batch_shape + self.event_shape[:1]).reshape(R, -1)
        replica = torch.arange(R, device=device).unsqueeze(-1)
        out = tables[replica, inverse].reshape(sample_shape + self.batch_shape + self.event_shape)
        return self._mask_padding(out, self.input)


@register_kl(EmbeddingLayer, EmbeddingLayer)
def _kl_embeddinglayer_embeddinglayer(q: EmbeddingLayer, p: EmbeddingLayer) -> Tensor:
    """
    Share per minibatch row of ``KL(N(q.W_mean, q.W_scale) || N(p.W_mean, p.W_scale))``,
    scaled by ``q``'s ``KL_factor`` exactly as :meth:`EmbeddingLayer.log_prob`.
    """
    if q.W_mean.shape != p.W_mean.shape:
        raise ValueError(
            f"cannot compare EmbeddingLayers of table shapes {tuple(q.W_mean.shape)} and {tuple(p.W_mean.shape)}"
        )
    return q._folded_kl(normal_kl_sum(q.W_mean, q.W_scale, p.W_mean, p.W_scale))
