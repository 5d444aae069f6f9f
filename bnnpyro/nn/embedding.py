r"""
A Bayesian embedding table: ``nn.Embedding`` whose weight is drawn once per call from a prior,
as the input embeddings of the Bayesian LSTM language model of Fortunato, Blundell and Vinyals
(2017), "Bayesian Recurrent Neural Networks", arXiv:1704.02798.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bnnpyro.distributions.priors import Prior
from bnnpyro.nn.lstm import BayesianWeights


class BayesianEmbedding(BayesianWeights):
    r"""
    ``nn.Embedding(num_embeddings, embedding_dim, padding_idx, scale_grad_by_freq=...)`` with a random ``weight``
    (``N x E``, a :class:`~pyro.nn.PyroSample` with prior ``prior((N, E))``, one event).

    A call draws the table once; every index of the input (all positions, all sequences)
    looks up rows of that one draw. Positions equal to ``padding_idx`` get zeros, as the
    padding row of ``nn.Embedding`` (its sampled row is unused, so its posterior stays the prior).

    :param input: integer indices of any shape ``*``.
    :return: ``* x E`` embeddings.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        *,
        scale_grad_by_freq: bool = False,
        prior: Prior = Prior(),
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError("padding_idx must be within num_embeddings")
            padding_idx %= num_embeddings
        super().__init__(prior, {"weight": (num_embeddings, embedding_dim)}, device=device, dtype=dtype)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.scale_grad_by_freq = bool(scale_grad_by_freq)

    def forward(self, input: Tensor) -> Tensor:
        weight = self.weight
        if weight.dim() != 2:
            raise RuntimeError(
                f"BayesianEmbedding takes one draw of its table (V x E), got a weight of shape {tuple(weight.shape)}: "
                "under an outer plate of samples (vectorize_particles=True, Predictive(parallel=True)) run the "
                "samples one at a time instead (e.g. sample_predictive(..., vectorize=False))"
            )
        out = F.embedding(input, weight, scale_grad_by_freq=self.scale_grad_by_freq)
        if self.padding_idx is not None:
            out = out.masked_fill((input == self.padding_idx).unsqueeze(-1), 0.0)
        return out

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.scale_grad_by_freq:
            s += ", scale_grad_by_freq=True"
        return s + f", prior={self.prior}"
