r"""
The Bayesian LSTM of Fortunato, Blundell and Vinyals (2017), run on torch's fused LSTM kernel.

Every weight and bias of the LSTM is a random variable (a :class:`~pyro.nn.PyroSample` with
an i.i.d. :class:`~bnnpyro.distributions.Prior`). As in the paper ("Bayes by Backprop
through time"), a forward call draws **one** set of weights and uses it at every time step
and for every sequence of the mini-batch; the recurrence itself is torch's
``_VF.lstm`` (no Python loop over time steps or gates), so a call costs the weight draw
plus one deterministic ``nn.LSTM`` call.

A call is not vectorized over weight draws: under an outer ``pyro.plate`` (over posterior
samples, ``vectorize_particles=True``, or a data plate) the weights would gain a batch
dimension that the kernel does not accept. Call the layer outside data plates and loop
over weight draws.

Reference: Fortunato, M., Blundell, C., Vinyals, O. (2017). Bayesian Recurrent Neural
Networks. arXiv:1704.02798.
"""

from __future__ import annotations

from functools import partial
from typing import Mapping, Optional, Union

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule, PyroSample
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence

from bnnpyro.distributions.priors import Prior

LSTMState = tuple[Tensor, Tensor]


def _permute(hx: LSTMState, permutation: Optional[Tensor]) -> LSTMState:
    """Reorder the batch dimension (dim 1) of ``(h, c)``; identity if ``permutation`` is None."""
    if permutation is None:
        return hx
    return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)


def _check_hidden(hx: LSTMState, expected_h: tuple[int, ...], expected_c: tuple[int, ...]) -> None:
    for name, t, expected in (("h_0", hx[0], expected_h), ("c_0", hx[1], expected_c)):
        if tuple(t.shape) != expected:
            raise RuntimeError(f"Expected {name} of size {list(expected)}, got {list(t.shape)}")


def lstm_forward(
    input: Union[Tensor, PackedSequence],
    hx: Optional[LSTMState],
    flat_weights: list[Tensor],
    *,
    num_layers: int,
    bias: bool,
    batch_first: bool,
    dropout: float,
    training: bool,
    bidirectional: bool,
) -> tuple[Union[Tensor, PackedSequence], LSTMState]:
    r"""
    ``nn.LSTM.forward`` as a function of its weights: one call of torch's fused ``_VF.lstm``.

    :param input: ``T x B x D`` (``B x T x D`` if ``batch_first``), unbatched ``T x D``, or a
        :class:`~torch.nn.utils.rnn.PackedSequence` (sorted or not).
    :param hx: ``(h_0, c_0)`` of shapes ``(L*dirs) x B x R`` and ``(L*dirs) x B x H``
        (no ``B`` dimension for unbatched input; ``R = proj_size or H``), or None for zeros.
    :param flat_weights: the weights in ``nn.LSTM._flat_weights`` order:
        per layer and direction ``weight_ih (4H x D_l)``, ``weight_hh (4H x R)``,
        then if ``bias`` ``bias_ih (4H)``, ``bias_hh (4H)``, then if projecting
        ``weight_hr (R x H)``. ``H`` and ``R`` are read from ``weight_hh_l0``.
    :return: ``(output, (h_n, c_n))`` exactly as ``nn.LSTM``: output ``T x B x (dirs*R)``
        (or packed, in the input's order), ``h_n``/``c_n`` like ``h_0``/``c_0``.
    """
    num_directions = 2 if bidirectional else 1
    hidden_size = flat_weights[1].shape[0] // 4
    real_hidden_size = flat_weights[1].shape[1]
    per_layer = (4 if bias else 2) + (real_hidden_size != hidden_size)
    if len(flat_weights) != num_layers * num_directions * per_layer:
        raise ValueError(
            f"expected {num_layers * num_directions * per_layer} weight tensors, got {len(flat_weights)}"
        )
    state_dims = num_layers * num_directions

    if isinstance(input, PackedSequence):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        batch = int(batch_sizes[0])
        if hx is None:
            hx = (
                data.new_zeros(state_dims, batch, real_hidden_size),
                data.new_zeros(state_dims, batch, hidden_size),
            )
        else:
            _check_hidden(hx, (state_dims, batch, real_hidden_size), (state_dims, batch, hidden_size))
            hx = _permute(hx, sorted_indices)
        output, h_n, c_n = _VF.lstm(
            data, batch_sizes, hx, flat_weights, bias, num_layers, dropout, training, bidirectional
        )
        packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        return packed, _permute((h_n, c_n), unsorted_indices)

    if input.dim() not in (2, 3):
        raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
    is_batched = input.dim() == 3
    batch_dim = 0 if batch_first else 1
    if not is_batched:
        input = input.unsqueeze(batch_dim)
    batch = input.shape[batch_dim]
    if hx is None:
        hx = (
            input.new_zeros(state_dims, batch, real_hidden_size),
            input.new_zeros(state_dims, batch, hidden_size),
        )
    else:
        expected_dim = 3 if is_batched else 2
        if hx[0].dim() != expected_dim or hx[1].dim() != expected_dim:
            raise RuntimeError(
                f"For {expected_dim + 1}-D input, hx and cx should be {expected_dim}-D "
                f"but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
            )
        if not is_batched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        _check_hidden(hx, (state_dims, batch, real_hidden_size), (state_dims, batch, hidden_size))
    output, h_n, c_n = _VF.lstm(
        input, hx, flat_weights, bias, num_layers, dropout, training, bidirectional, batch_first
    )
    if not is_batched:
        return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
    return output, (h_n, c_n)


class BayesianWeights(PyroModule):
    r"""
    Base of the Bayesian layers: named weight tensors, each a :class:`~pyro.nn.PyroSample`
    drawn once per call from ``prior(shape)``.

    The prior distributions are built once per device/dtype of the module (tracked by an empty
    buffer, so ``.to()`` moves them) and reused by every call, not re-created each step.

    :param prior: the i.i.d. weight prior.
    :param shapes: weight name -> shape, in the order the layer uses them.
    """

    def __init__(
        self,
        prior: Prior,
        shapes: Mapping[str, torch.Size],
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.prior = prior
        self.weight_shapes: dict[str, torch.Size] = {k: torch.Size(v) for k, v in shapes.items()}
        self.register_buffer("_prior_anchor", torch.empty(0, device=device, dtype=dtype), persistent=False)
        self._priors: dict[str, TorchDistribution] = {}
        self._priors_key: Optional[tuple[torch.device, torch.dtype]] = None
        for name in self.weight_shapes:
            setattr(self, name, PyroSample(partial(BayesianWeights._weight_prior, name=name)))

    def _weight_prior(self, name: str) -> TorchDistribution:
        """``prior(shape)`` of weight ``name`` on the module's current device and dtype."""
        key = (self._prior_anchor.device, self._prior_anchor.dtype)
        if key != self._priors_key:
            self._priors = {n: self.prior(s, device=key[0], dtype=key[1]) for n, s in self.weight_shapes.items()}
            self._priors_key = key
        return self._priors[name]

    def _site_value(self, weights: Mapping[str, Tensor], name: str) -> Tensor:
        """``weights[site name]``, the site name being this module's Pyro name + ``.name``, or bare ``name``."""
        full = f"{self._pyro_name}.{name}" if self._pyro_name else name
        return weights[full] if full in weights else weights[name]


class BayesianLSTM(BayesianWeights):
    r"""
    Drop-in Bayesian ``nn.LSTM`` (Fortunato et al., 2017): same constructor, call and output.

    Sample sites carry ``nn.LSTM``'s parameter names (``weight_ih_l0``, ``weight_hh_l0``,
    ``bias_ih_l0``, ``bias_hh_l0``, ``weight_hr_l0`` with projections, ``..._reverse``),
    prefixed by the module's name inside a parent :class:`~pyro.nn.PyroModule`; each has prior
    ``prior(shape)`` over the whole tensor (one event). A call draws every weight once and
    shares the draw across all time steps and sequences, then runs :func:`lstm_forward`.
    Works with autoguides such as ``AutoNormal`` and ``AutoDiagonalNormal``. With
    ``TraceMeanField_ELBO`` the KL is in closed form for the Normal prior when the guide puts
    a ``Normal(loc, scale).to_event(...)`` at the site; pyro's ``AutoNormal`` (auxiliary
    Normal + ``Delta`` site) and the scale-mixture prior give its Monte Carlo estimate.

    :param input: ``T x B x input_size`` (``B x T x input_size`` if ``batch_first``),
        unbatched ``T x input_size``, or a ``PackedSequence``.
    :param hx: optional ``(h_0, c_0)``, ``(num_layers*dirs) x B x R`` and
        ``(num_layers*dirs) x B x hidden_size`` (``R = proj_size or hidden_size``).
    :return: ``(output, (h_n, c_n))``, output ``T x B x (dirs*R)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        prior: Prior = Prior(),
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        # nn.LSTM on the meta device validates the arguments and names/shapes the weights
        template = nn.LSTM(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                           bidirectional, proj_size, device="meta")
        shapes = {name: template.get_parameter(name).shape for name in template._flat_weights_names}
        super().__init__(prior, shapes, device=device, dtype=dtype)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, prior: Prior = Prior()) -> "BayesianLSTM":
        """A :class:`BayesianLSTM` with ``lstm``'s configuration, device and dtype (not its weights;
        to start a guide there, e.g. ``AutoNormal(model, init_loc_fn=init_to_value(values=...))``)."""
        w = lstm.weight_ih_l0
        return cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
                   lstm.dropout, lstm.bidirectional, lstm.proj_size, prior=prior, device=w.device, dtype=w.dtype)

    def to_lstm(self, weights: Mapping[str, Tensor]) -> nn.LSTM:
        """The deterministic ``nn.LSTM`` with the given weights, e.g. the posterior median/mean
        ``guide.median()``; keys are site names (with this module's prefix) or bare weight names."""
        anchor = self._prior_anchor
        lstm = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first,
                       self.dropout, self.bidirectional, self.proj_size, device=anchor.device, dtype=anchor.dtype)
        with torch.no_grad():
            for name in self.weight_shapes:
                lstm.get_parameter(name).copy_(self._site_value(weights, name))
        return lstm.train(self.training)

    def forward(
        self, input: Union[Tensor, PackedSequence], hx: Optional[LSTMState] = None
    ) -> tuple[Union[Tensor, PackedSequence], LSTMState]:
        weights = [getattr(self, name) for name in self.weight_shapes]
        return lstm_forward(input, hx, weights, num_layers=self.num_layers, bias=self.bias,
                            batch_first=self.batch_first, dropout=self.dropout, training=self.training,
                            bidirectional=self.bidirectional)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s + f", prior={self.prior}"
