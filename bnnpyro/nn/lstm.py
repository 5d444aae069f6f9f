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

:func:`lstm_flipout_forward` is the flipout estimator (Wen et al., 2018) as a separate
functional path: every sequence of the batch gets its own pseudo-independent weights (sign
flips of one shared perturbation, fixed across time steps), which the fused kernel cannot
take, so it runs a Python loop over time steps.

References: Fortunato, M., Blundell, C., Vinyals, O. (2017). Bayesian Recurrent Neural
Networks. arXiv:1704.02798. Wen, Y., Vicol, P., Ba, J., Tran, D., Grosse, R. (2018). Flipout:
Efficient Pseudo-Independent Weight Perturbations on Mini-batches. ICLR.
"""

from __future__ import annotations

from functools import partial
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule, PyroSample
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence

from bnnpyro.distributions.hidden_layer import random_signs
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


def _check_weight_dim(flat_weights: list[Tensor], i: int, dim: int) -> None:
    """``flat_weights[i]`` must be ``dim``-D: one draw of a weight matrix (2) or bias (1), not a stack."""
    if flat_weights[i].dim() != dim:
        raise RuntimeError(
            f"flat_weights[{i}] must be {dim}-D, got shape {tuple(flat_weights[i].shape)}: the fused LSTM "
            "kernel takes one draw of the weights; for stacked draws call it once per draw"
        )


def _check_input(x: Tensor, weight_ih: Tensor) -> None:
    """The input's features and dtype must be the first layer's (``weight_ih_l0``: ``4H x D``), as
    ``nn.LSTM`` checks: on CPU the fused kernel does not, and read past a too-narrow input."""
    width, expected = int(x.shape[-1]), int(weight_ih.shape[1])  # plain ints under torch.jit.trace
    if width != expected:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {expected}, got {width}")
    if x.dtype != weight_ih.dtype and not torch._C._is_any_autocast_enabled():  # as nn.LSTM
        raise ValueError(f"input dtype ({x.dtype}) does not match weight dtype ({weight_ih.dtype})")


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
        ``weight_hr (R x H)``. ``H`` and ``R`` are read from ``weight_hh_l0``. One draw: stacked
        weights (a leading sample dim) raise a ``RuntimeError``.
    :return: ``(output, (h_n, c_n))`` exactly as ``nn.LSTM``: output ``T x B x (dirs*R)``
        (or packed, in the input's order), ``h_n``/``c_n`` like ``h_0``/``c_0``.
    """
    num_directions = 2 if bidirectional else 1
    _check_weight_dim(flat_weights, 1, 2)  # H and R are read from it
    hidden_size = flat_weights[1].shape[0] // 4
    real_hidden_size = flat_weights[1].shape[1]
    per_layer = (4 if bias else 2) + (real_hidden_size != hidden_size)
    if len(flat_weights) != num_layers * num_directions * per_layer:
        raise ValueError(
            f"expected {num_layers * num_directions * per_layer} weight tensors, got {len(flat_weights)}"
        )
    for i in range(len(flat_weights)):
        _check_weight_dim(flat_weights, i, 1 if bias and i % per_layer in (2, 3) else 2)
    state_dims = num_layers * num_directions

    if isinstance(input, PackedSequence):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        _check_input(data, flat_weights[0])
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
    _check_input(input, flat_weights[0])
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
                f"For {'batched 3-D' if is_batched else 'unbatched 2-D'} input, hx and cx should also be {expected_dim}-D "
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


def flipout_signs(batch_size: int, weights: Sequence[Tensor], bias: bool) -> list[tuple[Tensor, Tensor]]:
    r"""
    Random sign vectors for :func:`lstm_flipout_forward`: for every weight matrix ``W`` (``out x in``)
    of ``weights`` (``nn.LSTM._flat_weights`` order, biases skipped) a pair ``(s_in, s_out)`` of
    i.i.d. uniform :math:`\pm 1` entries, ``B x in`` and ``B x out``.

    :param batch_size: ``B``, the number of sequences.
    :param weights: the flat weights (or anything of their shapes, dtype and device).
    :param bias: whether ``weights`` holds biases (``4`` tensors per layer and direction, else ``2``).
    """
    per_layer = 4 if bias else 2
    matrices = [w for i, w in enumerate(weights) if i % per_layer < 2]
    return [(random_signs((batch_size, w.shape[1]), w), random_signs((batch_size, w.shape[0]), w)) for w in matrices]


def _flipout_linear(x: Tensor, mean: Tensor, delta: Tensor, s_in: Tensor, s_out: Tensor) -> Tensor:
    r"""``x @ mean^T + ((x * s_in) @ delta^T) * s_out``: rows ``b`` of ``x`` (``... x B x in``) see
    the weights ``mean + (s_out[b] s_in[b]^T) * delta`` (Wen et al., 2018, eq. 5)."""
    return torch.addcmul(x @ mean.t(), (x * s_in) @ delta.t(), s_out)


def _flipout_recurrence(
    gates_x: Tensor, h: Tensor, c: Tensor, mean_hh: Tensor, delta_hh: Tensor,
    s_in: Tensor, s_out: Tensor, reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer and direction over time: ``gates_x`` (``T x B x 4H``, input part of the gates with
    bias) -> ``(output T x B x H, h_n, c_n)``, gate order ``i, f, g, o`` as ``nn.LSTM``."""
    outputs: list[Tensor] = [gates_x.new_empty(0)] * gates_x.size(0)
    steps = range(gates_x.size(0) - 1, -1, -1) if reverse else range(gates_x.size(0))
    for t in steps:
        gates = gates_x[t] + _flipout_linear(h, mean_hh, delta_hh, s_in, s_out)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs[t] = h
    return torch.stack(outputs), h, c


def lstm_flipout_forward(
    input: Tensor,
    hx: Optional[LSTMState],
    mean_weights: Sequence[Tensor],
    delta_weights: Sequence[Tensor],
    signs: Optional[Sequence[tuple[Tensor, Tensor]]] = None,
    *,
    num_layers: int,
    bias: bool,
    batch_first: bool,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, LSTMState]:
    r"""
    An LSTM with **flipout** weight perturbations (Wen et al., 2018), sign flips fixed across time.

    Sequence ``b`` of the batch runs an ordinary LSTM whose every weight matrix is

    .. math:: W_b = \bar W + (s^{\text{out}}_b\, {s^{\text{in}}_b}^\top) \odot \Delta W,

    ``\bar W`` from ``mean_weights``, ``\Delta W`` from ``delta_weights`` (one draw per call, e.g.
    ``w - \bar W`` for a posterior sample ``w``) and ``s_b`` i.i.d. uniform :math:`\pm 1` vectors
    drawn once per call, per sequence and per weight matrix, and reused at every time step (the
    paper's recurrent setting, Sec. 4). The product is never formed: the gates are
    ``x @ W_mean^T + ((x * s_in_b) @ dW^T) * s_out_b``, one ``4H``-wide matmul per weight per step
    (the input part of all steps in one matmul per layer). If ``\Delta W`` is symmetric about 0
    (e.g. ``Normal(0, sigma)``) and independent of the signs, each ``W_b`` has the distribution of
    ``\bar W + \Delta W``, so every sequence's output has the same distribution as under one shared
    weight draw, while the sequences of a batch see pseudo-independent perturbations (lower-variance
    gradients than one shared draw).

    **Biases** are not flipped: each layer adds ``b_mean + db`` (one draw shared by every sequence),
    as in the reference implementation accompanying the paper (``tf.contrib.bayesflow``'s flipout
    layers add one posterior sample of the bias to every example); the paper defines flipout for
    weight matrices.

    The recurrence is a Python loop over time steps (torch's fused kernel takes one weight set for
    the whole batch), so it is slower than :func:`lstm_forward`. No projections
    (``proj_size``) and no packed sequences.

    :param input: ``T x B x D`` (``B x T x D`` if ``batch_first``).
    :param hx: ``(h_0, c_0)``, each ``(L*dirs) x B x H``, or None for zeros.
    :param mean_weights: ``\bar W`` in ``nn.LSTM._flat_weights`` order: per layer and direction
        ``weight_ih (4H x D_l)``, ``weight_hh (4H x H)``, then if ``bias`` ``bias_ih``, ``bias_hh`` (``4H``).
    :param delta_weights: ``\Delta W``, the same shapes and order.
    :param signs: one ``(s_in, s_out)`` per weight matrix (``weight_ih``/``weight_hh`` of each layer
        and direction, in flat order), ``B x in`` and ``B x 4H``, entries :math:`\pm 1`;
        None draws them with :func:`flipout_signs`.
    :param dropout: dropout on the outputs of every layer but the last, when ``training`` (as ``nn.LSTM``).
    :return: ``(output, (h_n, c_n))`` as ``nn.LSTM``: output ``T x B x (dirs*H)`` (``B x T x ...`` if
        ``batch_first``), ``h_n``, ``c_n`` ``(L*dirs) x B x H``.

    Reference: Wen, Y., Vicol, P., Ba, J., Tran, D., Grosse, R. (2018). Flipout: Efficient
    Pseudo-Independent Weight Perturbations on Mini-batches. ICLR.
    """
    if isinstance(input, PackedSequence):
        raise NotImplementedError("lstm_flipout_forward does not take packed sequences; pad them")
    if not torch.is_tensor(input) or input.dim() != 3:
        raise ValueError(f"input must be a 3-D tensor (T x B x D, or B x T x D if batch_first), "
                         f"got {getattr(input, 'shape', type(input).__name__)}")
    num_directions = 2 if bidirectional else 1
    per_layer = 4 if bias else 2
    expected = num_layers * num_directions * per_layer
    if len(mean_weights) != expected or len(delta_weights) != expected:
        raise ValueError(f"expected {expected} mean and delta weight tensors, got "
                         f"{len(mean_weights)} and {len(delta_weights)}")
    for i, (m, d) in enumerate(zip(mean_weights, delta_weights)):
        if m.shape != d.shape:
            raise ValueError(f"delta_weights[{i}] has shape {tuple(d.shape)}, mean_weights[{i}] {tuple(m.shape)}")
    hidden_size = mean_weights[1].shape[0] // 4
    if mean_weights[1].shape[1] != hidden_size:
        raise ValueError("lstm_flipout_forward does not support projections (proj_size)")
    _check_input(input, mean_weights[0])
    x = input.transpose(0, 1) if batch_first else input
    batch = x.size(1)
    if signs is None:
        signs = flipout_signs(batch, mean_weights, bias)
    if len(signs) != 2 * num_layers * num_directions:
        raise ValueError(f"expected {2 * num_layers * num_directions} (s_in, s_out) pairs, got {len(signs)}")
    matrices = [w for i, w in enumerate(mean_weights) if i % per_layer < 2]
    for i, ((s_in, s_out), w) in enumerate(zip(signs, matrices)):
        if tuple(s_in.shape) != (batch, w.shape[1]) or tuple(s_out.shape) != (batch, w.shape[0]):
            # broadcast signs (e.g. drawn for one sequence) would give every sequence one perturbation
            raise ValueError(f"signs[{i}] must be B x in and B x out = {(batch, w.shape[1])} and "
                             f"{(batch, w.shape[0])}, got {tuple(s_in.shape)} and {tuple(s_out.shape)}")
    state_dims = num_layers * num_directions
    if hx is None:
        zeros = x.new_zeros(state_dims, batch, hidden_size)
        hx = (zeros, zeros)
    else:
        _check_hidden(hx, (state_dims, batch, hidden_size), (state_dims, batch, hidden_size))

    h_n, c_n = [], []
    for layer in range(num_layers):
        if layer > 0 and dropout and training:
            x = F.dropout(x, dropout, training=True)
        outputs = []
        for direction in range(num_directions):
            k = layer * num_directions + direction
            means = mean_weights[k * per_layer: (k + 1) * per_layer]
            deltas = delta_weights[k * per_layer: (k + 1) * per_layer]
            (s_in_ih, s_out_ih), (s_in_hh, s_out_hh) = signs[2 * k], signs[2 * k + 1]
            gates_x = _flipout_linear(x, means[0], deltas[0], s_in_ih, s_out_ih)
            if bias:
                gates_x = gates_x + (means[2] + deltas[2] + means[3] + deltas[3])
            out, h, c = _flipout_recurrence(gates_x, hx[0][k], hx[1][k], means[1], deltas[1],
                                            s_in_hh, s_out_hh, reverse=direction == 1)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=-1)
    output = x.transpose(0, 1) if batch_first else x
    return output, (torch.stack(h_n), torch.stack(c_n))


class BayesianWeights(PyroModule):
    r"""
    Base of the Bayesian layers: named weight tensors, each a :class:`~pyro.nn.PyroSample`
    drawn once per call from ``prior(shape)``.

    The prior distributions are built once per device/dtype of the module (tracked by an empty
    buffer, so ``.to()`` moves them) and prior (``.prior`` may be reassigned), and reused by every
    call, not re-created each step.

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
        self._priors_key: Optional[tuple[torch.device, torch.dtype, Prior]] = None
        for name in self.weight_shapes:
            setattr(self, name, PyroSample(partial(BayesianWeights._weight_prior, name=name)))

    def _weight_prior(self, name: str) -> TorchDistribution:
        """``prior(shape)`` of weight ``name`` on the module's current device and dtype."""
        # the prior too: a prior assigned after the first call is used (it had kept the cached one)
        key = (self._prior_anchor.device, self._prior_anchor.dtype, self.prior)
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
                # a weight excluded from conversion (to_bayesian's exclude) is a parameter, not a site
                own = self._parameters.get(name)
                lstm.get_parameter(name).copy_(own if own is not None else self._site_value(weights, name))
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
