"""The common base of the layers written as distributions: a draw is the layer's output, ``log_prob`` the
weights' KL folded in per minibatch row."""

from __future__ import annotations

from typing import Iterable

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import Tensor

from bnnpyro.distributions._shapes import broadcast_shapes
from bnnpyro.distributions._validation import check_value_shape


class FoldedKLLayer(TorchDistribution):
    r"""
    A Bayesian layer as a distribution over its output, for one minibatch of ``B`` rows (the last
    batch dim), with the KL of its weight distribution from their prior folded into ``log_prob``:
    each row carries the share

    .. math:: \log q(\text{row}) \;:=\; \mathrm{KL\_factor}\cdot\mathrm{KL}(q(W)\,\Vert\,p(W)) / B,

    whatever the value drawn. Inside ``pyro.plate("data", N, subsample=...)`` the plate scales the
    ``B`` shares by ``N / B``, so a guide site adds ``KL_factor * (N / B) * KL`` to the ELBO's
    ``log q`` side: once per step with ``KL_factor = B / N`` (what ``dataset_size=N`` sets), the
    minibatch form of Blundell et al. (2015). ``log p`` of the model's layer site (the prior as a
    layer) is its own KL from itself, zero.

    Since the KL rides on the rows, anything that weights rows weights it too: ``poutine.mask``
    over some rows drops their shares of the KL (with 3 of ``B = 5`` rows kept, ``3/5`` of it).
    To leave rows out of the likelihood only, mask the likelihood site, not the layers.

    Subclasses (:class:`~bnnpyro.distributions.HiddenLayer`, :class:`~bnnpyro.distributions.ConvLayer`,
    :class:`~bnnpyro.distributions.EmbeddingLayer`) set ``_kl_per_row = KL_factor / B`` and define
    ``KL``, ``rsample`` and ``expand`` (with :meth:`_finish_expand`).
    """

    has_rsample = True
    _kl_per_row: Tensor | float

    @property
    def KL(self) -> Tensor:
        """Scalar ``KL(q(W) || p(W))`` summed over all weights."""
        raise NotImplementedError

    def log_prob(self, value: Tensor) -> Tensor:
        """
        This row's share of the folded KL, ``KL_factor * KL / B`` (positive), broadcast to the batch
        shape of ``value`` (its shape without the event dims). ``value`` itself does not enter.
        """
        if self._validate_args:
            check_value_shape(self, value)
        shape = value.shape[: value.dim() - len(self.event_shape)]
        if shape != self.batch_shape:
            shape = broadcast_shapes(shape, self.batch_shape)
        return (self._kl_per_row * self.KL).expand(shape)

    def _finish_expand(self, new: "FoldedKLLayer", batch_shape: torch.Size, attrs: Iterable[str]) -> "FoldedKLLayer":
        """The end of ``expand``: ``new`` shares ``attrs`` with ``self`` and gets ``batch_shape``
        (the values were checked when ``self`` was built, so they are not checked again)."""
        for attr in attrs:
            setattr(new, attr, getattr(self, attr))
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _folded_kl(self, kl: Tensor) -> Tensor:
        """``kl`` (a scalar KL of this layer's weights from some other layer's) shared per row as in
        :meth:`log_prob`, for the registered ``kl_divergence`` of two layers: ``batch_shape``."""
        return (self._kl_per_row * kl).expand(self.batch_shape)
