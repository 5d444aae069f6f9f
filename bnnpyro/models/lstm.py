r"""
Bayesian LSTM catalogue models (Fortunato, Blundell and Vinyals, 2017): a sequence classifier and a
language model, each with a hand-written mean-field guide.

Both share one structure. An optional :class:`~bnnpyro.nn.BayesianEmbedding` and a
:class:`~bnnpyro.nn.BayesianLSTM` (``batch_first=True``, torch's fused kernel) whose weights are
**global** sample sites, drawn once per call (once per minibatch) and shared by every time step
and every sequence, as in the paper's "Bayes by Backprop through time"; then an output layer that
is a :class:`~bnnpyro.distributions.HiddenLayer` (local reparameterization), with its KL folded
into its sample site. (The language model's output layer is by default one more global weight site,
see :class:`BayesianLSTMLanguageModel`'s ``output_estimator``.)

*Model*: the weight sites take the LSTM's and embedding's priors (site names ``embedding.weight``,
``lstm.weight_ih_l0``, ``lstm.bias_hh_l1``, ... as ``nn.LSTM`` names its parameters); the output
layer site holds the prior layer; the likelihood is observed inside
``pyro.plate("data", dataset_size, subsample=arange(B))``.
*Guide*: the weight sites are :class:`~bnnpyro.distributions.FactorizedNormal` ``(loc, softplus(rho))``,
a Normal over the whole tensor as one event (parameters held by the
module and registered with ``pyro.module`` under a name unique to the instance) outside the plate,
and the output layer is the variational ``HiddenLayer`` inside it. With
``SVI(m.model, m.guide, optim, TraceMeanField_ELBO())`` each step minimises the full-data
objective of the paper,

.. math:: -\mathrm{ELBO} = \frac{N}{B} \sum_{n \in \text{batch}} \mathbb E_q[-\log p(y_n \mid x_n, \theta)]
          + \mathrm{KL}(q(\theta) \,\Vert\, p(\theta)),

the KL counted once (in closed form for the default Normal prior, by Monte Carlo for the scale
mixture).

**Estimators.** ``estimator="weight_space"`` (default) runs the guide's LSTM on its one weight draw
with torch's fused kernel. ``estimator="flipout"`` (Wen et al., 2018) runs it with
:func:`~bnnpyro.nn.lstm.lstm_flipout_forward` around the posterior means: centre
``loc`` (``self.posterior.loc``), perturbation ``w - loc`` for the guide's draw ``w``, and per-sequence
sign flips fixed across time steps, so the sequences of a minibatch see pseudo-independent weights
with the same marginal ``q`` (same expected -ELBO, lower-variance gradients; a Python loop over time,
slower per step). Flipout is a *training-time* estimator around the posterior mean: the guide's
weight sites and the KL are unchanged, and :meth:`get_logits`, :meth:`predict`, ``perplexity`` and
``generate`` keep weight-space draws. Under SVI only the guide's features enter the likelihood (the
model's ``"logits"`` site takes the guide's value), so the model program keeps the weight-space pass
over its sites: run alone it draws weights from the prior, for which flipout around ``loc`` would
not be a valid estimator. The embedding table is one shared draw in both estimators.

Reference: Fortunato, M., Blundell, C., Vinyals, O. (2017). Bayesian Recurrent Neural Networks.
arXiv:1704.02798.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Mapping

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.distributions import constraints

from bnnpyro._checks import check_finite, check_like, one_of, positive_int, positive_number
from bnnpyro.distributions import FactorizedNormal, HiddenLayer, Prior
from bnnpyro.models._config import ConfigRepr
from bnnpyro.nn import BayesianEmbedding, BayesianLSTM, lstm_forward
from bnnpyro.nn.activations import identity, inverse_softplus
from bnnpyro.nn.lstm import LSTMState, lstm_flipout_forward
from bnnpyro.nn.param_names import NewParamNameOnCopy, new_param_prefix
from bnnpyro.predict.metrics import mutual_information, predictive_entropy

__all__ = ["BayesianLSTMClassifier", "BayesianLSTMLanguageModel"]

ESTIMATORS: tuple[str, ...] = ("weight_space", "flipout")
OUTPUT_ESTIMATORS: tuple[str, ...] = ("weight_space", "local_reparameterization")
OUTPUT_SITE = "output.weight"


class _SoftmaxCategorical(TorchDistribution):
    r"""
    ``Categorical(logits=logits)`` over the last dimension, its ``log_prob`` one fused
    ``-F.cross_entropy``. Same values as :class:`pyro.distributions.Categorical`, whose
    ``logits - logsumexp(logits)`` normalisation and its backward make about ten passes and
    temporaries of the logits' size: at a 10,000-word vocabulary (``B x T x V`` logits) they cost
    more than the log-softmax itself. The logits are neither normalised nor validated here.
    """

    arg_constraints = {"logits": constraints.real_vector}

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits
        super().__init__(logits.shape[:-1], validate_args=False)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.integer_interval(0, self.logits.size(-1) - 1)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        return dist.Categorical(logits=self.logits).sample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        logits = self.logits.expand(shape + self.logits.shape[-1:]).reshape(-1, self.logits.size(-1))
        nll = F.cross_entropy(logits, value.long().expand(shape).reshape(-1), reduction="none")
        return -nll.view(shape)


# per encoder, its guide's last pass as (x, {site: weight draw}, output), recorded when that output
# is exactly the encoder's own function of those tensors (no flipout centring, no dropout draw): the
# model's pass, which under replay gets the same draws (the same tensors) on the same x, takes the
# output from here instead of running the LSTM again, unless it would draw dropout masks itself;
# any other draw runs it
_GUIDE_PASS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _append_ones(h: Tensor) -> Tensor:
    """``... x H`` -> ``... x (H + 1)``: a column of ones, so that the output layer's last weight row is a bias."""
    return torch.cat([h, h.new_ones(h.shape[:-1] + (1,))], dim=-1)


class _SequenceEncoder(PyroModule):
    r"""
    ``[BayesianEmbedding ->] BayesianLSTM(batch_first=True)``: ``B x T`` token ids (or
    ``B x T x input_size`` features) to the top layer's outputs ``B x T x H``.

    Called as a module, it samples its weights from their priors (sites ``embedding.weight`` and
    ``lstm.<nn.LSTM parameter name>``); :meth:`run` computes the same function for given weights.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        vocab_size: int | None,
        prior: Prior,
    ) -> None:
        super().__init__()
        self.embedding = None if vocab_size is None else BayesianEmbedding(vocab_size, input_size, prior=prior)
        self.lstm = BayesianLSTM(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout, prior=prior)

    def site_shapes(self) -> dict[str, torch.Size]:
        """Sample site name -> weight shape, in the order of the sites."""
        shapes = {} if self.embedding is None else {"embedding.weight": self.embedding.weight_shapes["weight"]}
        shapes.update({f"lstm.{name}": shape for name, shape in self.lstm.weight_shapes.items()})
        return shapes

    def forward(self, x: Tensor) -> Tensor:
        """Samples every weight from its prior and returns ``run(weights, x)``'s output (see
        ``_GUIDE_PASS`` for when the guide's pass supplies it)."""
        weights = {} if self.embedding is None else {"embedding.weight": self.embedding.weight}
        weights.update({f"lstm.{name}": getattr(self.lstm, name) for name in self.lstm.weight_shapes})
        guide_pass = _GUIDE_PASS.pop(self, None)
        if guide_pass is not None and not self._draws_dropout_masks:
            guide_x, guide_weights, output = guide_pass
            if guide_x is x and all(w is guide_weights.get(k) for k, w in weights.items()):
                return output
        return self.run(weights, x, training=self.training)[0]

    @property
    def _draws_dropout_masks(self) -> bool:
        """Whether a pass draws dropout masks between the LSTM layers (training, ``dropout > 0``)."""
        return self.training and self.lstm.dropout > 0

    def guide_pass(self, weights: Mapping[str, Tensor], x: Tensor, centre: Mapping[str, Tensor] | None) -> Tensor:
        """``run(weights, x, self.training, centre=centre)``'s output, recorded for the model's pass
        when it is the encoder's own function of ``weights`` and ``x``."""
        out = self.run(weights, x, training=self.training, centre=centre)[0]
        if centre is None and not self._draws_dropout_masks:
            _GUIDE_PASS[self] = (x, dict(weights), out)
        else:
            _GUIDE_PASS.pop(self, None)
        return out

    def run(
        self, weights: Mapping[str, Tensor], x: Tensor, training: bool, hx: LSTMState | None = None,
        centre: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, LSTMState]:
        """
        ``(output B x T x H, (h_n, c_n))`` for the weights ``{site name: tensor}``: one fused LSTM call,
        or with ``centre`` (``{site name: tensor}``, e.g. the posterior means) flipout around ``centre``
        with perturbation ``weights - centre`` (:func:`~bnnpyro.nn.lstm.lstm_flipout_forward`).
        """
        if self.embedding is not None and weights["embedding.weight"].dim() != 2:
            raise RuntimeError(
                f"the embedding table must be one draw (V x E), got shape {tuple(weights['embedding.weight'].shape)}: "
                "the LSTM models take one draw of their weights per call; under an outer plate of samples "
                "(vectorize_particles=True, Predictive(parallel=True)) run the samples one at a time instead"
            )
        inputs = x if self.embedding is None else F.embedding(x, weights["embedding.weight"])
        names = [f"lstm.{name}" for name in self.lstm.weight_shapes]
        lstm = self.lstm
        kwargs = dict(num_layers=lstm.num_layers, bias=True, batch_first=True, dropout=lstm.dropout,
                      training=training, bidirectional=False)
        if centre is None:
            return lstm_forward(inputs, hx, [weights[n] for n in names], **kwargs)
        means = [centre[n] for n in names]
        deltas = [weights[n] - m for n, m in zip(names, means)]
        return lstm_flipout_forward(inputs, hx, means, deltas, **kwargs)


class _MeanFieldNormal(nn.Module):
    """``q(w) = Normal(loc, softplus(rho))`` for each weight tensor, one sample site per tensor."""

    def __init__(self, init_locs: Mapping[str, Tensor], init_scale: float) -> None:
        super().__init__()
        self.sites = tuple(init_locs)
        rho = inverse_softplus(init_scale)
        self.loc = nn.ParameterDict({self._key(s): nn.Parameter(v.detach().clone()) for s, v in init_locs.items()})
        self.rho = nn.ParameterDict({self._key(s): nn.Parameter(torch.full_like(v, rho)) for s, v in init_locs.items()})

    @staticmethod
    def _key(site: str) -> str:
        return site.replace(".", "__")

    def distribution(self, site: str) -> dist.Distribution:
        """``Normal(loc, softplus(rho))`` over the whole tensor of one site, as one event."""
        loc, rho = self.loc[self._key(site)], self.rho[self._key(site)]
        return FactorizedNormal(loc, F.softplus(rho))

    def sample(self) -> dict[str, Tensor]:
        """Sample every site with ``pyro.sample`` (the guide)."""
        return {s: pyro.sample(s, self.distribution(s)) for s in self.sites}

    def rsample(self) -> dict[str, Tensor]:
        """One draw of every weight tensor, outside Pyro (predictions)."""
        return {s: self.distribution(s).rsample() for s in self.sites}

    def means(self) -> dict[str, Tensor]:
        """The posterior mean ``loc`` of every site."""
        return {s: self.loc[self._key(s)] for s in self.sites}


class _BayesianLSTMNet(ConfigRepr, NewParamNameOnCopy, nn.Module):
    r"""
    Shared plumbing: the encoder, its mean-field posterior, the output layer's parameters
    (``(H + 1) x out_features``, the last row a bias) and their priors, input checks.
    """

    def __init__(
        self,
        *,
        out_features: int,
        hidden_size: int,
        dataset_size: int,
        input_size: int,
        vocab_size: int | None,
        num_layers: int,
        dropout: float,
        prior: Prior | Mapping,
        prior_scale: float,
        init_scale: float,
        estimator: str,
    ) -> None:
        super().__init__()
        one_of("estimator", estimator, ESTIMATORS)
        for name, value in (("hidden_size", hidden_size), ("dataset_size", dataset_size),
                            ("num_layers", num_layers), ("input_size", input_size)):
            positive_int(name, value)
        if vocab_size is not None:
            positive_int("vocab_size", vocab_size)
        if isinstance(prior, Mapping):
            prior = Prior(**prior)
        if not isinstance(prior, Prior):
            raise TypeError(
                f"prior must be a bnnpyro.distributions.Prior or a dict of its fields, got {type(prior).__name__}"
            )
        positive_number("prior_scale", prior_scale)
        positive_number("init_scale", init_scale)
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size = vocab_size
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.dataset_size = dataset_size
        self.prior = prior
        self.estimator = estimator
        self.encoder = _SequenceEncoder(input_size, hidden_size, num_layers, float(dropout), vocab_size, prior)

        init = {"embedding.weight": torch.randn(vocab_size, input_size)} if vocab_size is not None else {}
        template = nn.LSTM(input_size, hidden_size, num_layers)  # torch's initialisation of the means
        init.update({f"lstm.{n}": template.get_parameter(n).detach() for n in self.encoder.lstm.weight_shapes})
        self.posterior = _MeanFieldNormal(init, init_scale)

        bound = 1.0 / math.sqrt(hidden_size)
        out_mean = torch.empty(hidden_size + 1, out_features).uniform_(-bound, bound)
        out_mean[-1].zero_()
        self.out_mean = nn.Parameter(out_mean)
        self.out_rho = nn.Parameter(torch.full_like(out_mean, inverse_softplus(init_scale)))
        self.register_buffer("out_prior_mean", torch.zeros(()))
        self.register_buffer("out_prior_scale", torch.tensor(float(prior_scale)))
        self._pyro_name = new_param_prefix(type(self).__name__)

    # -- checks ------------------------------------------------------------------------------

    def _check_x(self, x: Tensor) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self.vocab_size is not None:
            if x.dtype != torch.long:
                raise TypeError(f"x must be an int64 tensor of token ids (B x T), got dtype {x.dtype}")
            check_like("x", x, self.out_mean)
            if x.dim() != 2 or 0 in x.shape:
                raise ValueError(f"x must be B x T token ids, got shape {tuple(x.shape)}")
            # always checked (cheap beside the LSTM): a bad id is a device-side assert on a GPU, and
            # sample_predictive runs its later chunks with validation off
            if x.min() < 0 or x.max() >= self.vocab_size:
                raise ValueError(f"x holds ids in [{int(x.min())}, {int(x.max())}], expected [0, {self.vocab_size})")
        else:
            if not x.is_floating_point():
                raise TypeError(f"x must be a floating-point tensor (B x T x {self.input_size}), got dtype {x.dtype}")
            check_like("x", x, self.out_mean)
            if x.dim() != 3 or x.size(-1) != self.input_size or 0 in x.shape:
                raise ValueError(f"x must be B x T x {self.input_size}, got shape {tuple(x.shape)}")
            check_finite("x", x)

    def _check_labels(self, y: Tensor, shape: tuple[int, ...], num_classes: int, what: str) -> None:
        if not torch.is_tensor(y) or y.dtype != torch.long:
            raise TypeError(f"y must be an int64 tensor of {what}, got {getattr(y, 'dtype', type(y).__name__)}")
        if tuple(y.shape) != shape:
            raise ValueError(f"y must have shape {shape}, got {tuple(y.shape)}")
        # always (cheap beside the LSTM): F.cross_entropy silently skips -100 (its ignore_index)
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"y holds {what} in [{int(y.min())}, {int(y.max())}], expected [0, {num_classes})")

    def _check_batch(self, x: Tensor) -> None:
        if x.size(0) > self.dataset_size:
            raise ValueError(
                f"the batch has {x.size(0)} sequences but dataset_size is {self.dataset_size}: "
                "dataset_size must be the number of training sequences"
            )

    @staticmethod
    def _check_num_predictions(num_predictions: int) -> int:
        return positive_int("num_predictions", num_predictions)

    # -- layers ------------------------------------------------------------------------------

    def _plate(self, x: Tensor) -> pyro.plate:
        return pyro.plate("data", self.dataset_size, subsample=torch.arange(x.size(0), device=x.device))

    def _prior_layer(self, X: Tensor) -> HiddenLayer:
        """The output layer under the prior (zero KL), rows ``X``."""
        shape = self.out_mean.shape
        m0, s0 = self.out_prior_mean.expand(shape), self.out_prior_scale.expand(shape)
        return HiddenLayer(X, m0, s0, non_linearity=identity, include_hidden_bias=False,
                           A_prior_mean=m0, A_prior_scale=s0, validate_args=False)

    def _variational_layer(self, X: Tensor, **kl_scaling) -> HiddenLayer:
        """The output layer under ``q`` (local reparameterization), rows ``X``."""
        return HiddenLayer(X, self.out_mean, F.softplus(self.out_rho), non_linearity=identity,
                           include_hidden_bias=False, A_prior_mean=self.out_prior_mean,
                           A_prior_scale=self.out_prior_scale, **kl_scaling)

    def _guide_outputs(self, x: Tensor) -> Tensor:
        """``B x T x H`` LSTM outputs under the guide's weight sites, by ``self.estimator``."""
        centre = self.posterior.means() if self.estimator == "flipout" else None
        return self.encoder.guide_pass(self.posterior.sample(), x, centre)

    def _sampled_outputs(self, x: Tensor, num_predictions: int) -> Tensor:
        """``S x B x T x H`` LSTM outputs, one posterior weight draw per ``s`` (dropout off)."""
        return torch.stack([self.encoder.run(self.posterior.rsample(), x, training=False)[0]
                            for _ in range(num_predictions)])


class BayesianLSTMClassifier(_BayesianLSTMNet):
    r"""
    Bayesian LSTM sequence classifier (Fortunato et al., 2017): ``[embedding ->] LSTM -> last
    hidden state -> HiddenLayer -> Categorical``.

    Inputs are ``B x T`` int64 token ids (``vocab_size`` and ``embedding_dim`` given) or
    ``B x T x input_size`` float sequences (``input_size`` given, e.g. the 8 rows of an 8x8 image as
    8 steps of 8 features); ``y`` holds ``B`` int64 labels in ``[0, num_classes)``. The LSTM and
    embedding weights are global sites drawn once per minibatch; the output layer's KL is folded
    with ``dataset_size=N`` into its site inside the data plate, so that
    ``SVI(m.model, m.guide, optim, TraceMeanField_ELBO())`` minimises
    ``(N/B) * NLL(batch) + KL``.

    :param int num_classes: ``C >= 2``.
    :param int hidden_size: ``H``.
    :param int dataset_size: ``N``, the number of training sequences.
    :param vocab_size: number of token ids, for token inputs.
    :param embedding_dim: embedding width ``E``, with ``vocab_size``.
    :param input_size: feature width of float inputs (instead of ``vocab_size``).
    :param int num_layers: stacked LSTM layers.
    :param prior: i.i.d. prior of the LSTM and embedding weights (a :class:`Prior` or a dict of its
        fields), e.g. ``Prior(kind="scale_mixture")`` for the paper's prior.
    :param float prior_scale: std of the zero-mean Normal prior of the output layer's weights.
    :param float init_scale: initial posterior std of every weight.
    :param str estimator: ``"weight_space"`` (one shared draw, fused kernel) or ``"flipout"`` (training
        only; see the module docstring).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        hidden_size: int,
        dataset_size: int,
        vocab_size: int | None = None,
        embedding_dim: int | None = None,
        input_size: int | None = None,
        num_layers: int = 1,
        prior: Prior | Mapping = Prior(),
        prior_scale: float = 1.0,
        init_scale: float = 1e-2,
        estimator: str = "weight_space",
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if (vocab_size is None) == (input_size is None):
            raise ValueError("give exactly one of vocab_size (token inputs) and input_size (float inputs)")
        if vocab_size is not None:
            if embedding_dim is None:
                raise ValueError("embedding_dim is required with vocab_size")
            positive_int("embedding_dim", embedding_dim)
        if input_size is not None and embedding_dim is not None:
            raise ValueError("embedding_dim is only used with vocab_size, not with input_size")
        super().__init__(out_features=num_classes, hidden_size=hidden_size, dataset_size=dataset_size,
                         input_size=embedding_dim if input_size is None else input_size, vocab_size=vocab_size,
                         num_layers=num_layers, dropout=0.0, prior=prior, prior_scale=prior_scale,
                         init_scale=init_scale, estimator=estimator)
        self.num_classes = num_classes
        self.config = {
            "num_classes": num_classes, "hidden_size": hidden_size, "dataset_size": dataset_size,
            "vocab_size": vocab_size, "embedding_dim": embedding_dim, "input_size": input_size,
            "num_layers": num_layers, "prior": dataclasses.asdict(self.prior),
            "prior_scale": float(prior_scale), "init_scale": float(init_scale), "estimator": estimator,
        }

    def _check(self, x: Tensor, y: Tensor | None) -> None:
        self._check_x(x)
        if y is not None:  # a training batch: at most dataset_size; prediction takes any number
            self._check_batch(x)
        if y is not None:
            self._check_labels(y, (x.size(0),), self.num_classes, "class labels")

    def model(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Pyro model: weights from the prior; returns the ``B x C`` logits site ``"logits"``."""
        self._check(x, y)
        pyro.module(self._pyro_name, self)
        X = _append_ones(self.encoder(x)[:, -1])
        with self._plate(x):
            logits = pyro.sample("logits", self._prior_layer(X))
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)
        return logits

    def guide(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Pyro guide: global mean-field weight sites, then the output layer (``dataset_size=N``)."""
        self._check(x, y)
        pyro.module(self._pyro_name, self)
        X = _append_ones(self._guide_outputs(x)[:, -1])
        with self._plate(x):
            return pyro.sample("logits", self._variational_layer(X, dataset_size=self.dataset_size))

    @torch.no_grad()
    def get_logits(self, x: Tensor, num_predictions: int = 10) -> Tensor:
        """``B x S x C`` logits of ``S = num_predictions`` posterior weight draws (no gradients).

        The sample dim is second; :mod:`bnnpyro.predict`'s metrics take
        the samples first (``S x B x C``): pass ``get_logits(x, S).softmax(-1).movedim(1, 0)``, or
        use :meth:`uncertainty`.
        """
        self._check_x(x)
        S = self._check_num_predictions(num_predictions)
        X = _append_ones(self._sampled_outputs(x, S)[:, :, -1])  # S x B x (H + 1)
        return self._variational_layer(X).rsample().movedim(0, 1)

    def predict(self, x: Tensor, num_predictions: int = 10) -> Tensor:
        """``B x C`` posterior-predictive mean probabilities."""
        return self.get_logits(x, num_predictions).softmax(-1).mean(1)

    def uncertainty(self, x: Tensor, num_predictions: int = 10) -> dict[str, Tensor]:
        """Per-sequence ``predictive_entropy`` (total) and ``mutual_information`` (epistemic), each ``B``, in nats."""
        probs = self.get_logits(x, num_predictions).softmax(-1).movedim(1, 0)  # S x B x C
        return {"predictive_entropy": predictive_entropy(probs), "mutual_information": mutual_information(probs)}


class BayesianLSTMLanguageModel(_BayesianLSTMNet):
    r"""
    Bayesian LSTM language model (Fortunato et al., 2017): ``embedding -> LSTM -> HiddenLayer`` at
    every position, ``y[b, t] ~ Categorical(logits[b, t])`` for the next token.

    Inputs ``x`` and targets ``y`` are ``B x T`` int64 token ids. The data plate is over
    **sequences** (``dataset_size`` = ``N``, the number of training sequences) and each sequence's
    likelihood sums over its ``T`` positions (``.to_event(1)``). The output layer's rows are the
    ``B x T`` positions: its site is ``HiddenLayer(X: B x T x (H+1), KL_factor=1/N).to_event(1)``, so
    each of the ``T`` positions of a sequence carries ``KL / (N T)``, a sequence ``KL / N``, and the
    plate's scale ``N / B`` makes the minibatch carry the KL exactly once:
    ``-ELBO = (N/B) * sum_{b,t} NLL[b, t] + KL``.

    :param int vocab_size: ``V``.
    :param int embedding_dim: ``E``.
    :param int hidden_size: ``H``.
    :param int num_layers: stacked LSTM layers (2 in the paper).
    :param int dataset_size: ``N``, the number of training sequences.
    :param prior: i.i.d. prior of the LSTM and embedding weights (a :class:`Prior` or a dict of its fields).
    :param float prior_scale: std of the zero-mean Normal prior of the output layer's weights.
    :param float dropout: dropout between LSTM layers during training (none at prediction).
    :param float init_scale: initial posterior std of every weight.
    :param str estimator: ``"weight_space"`` (one shared draw, fused kernel) or ``"flipout"`` (training
        only; see the module docstring).
    :param str output_estimator: how training samples the output layer. ``"weight_space"`` (default):
        its ``(H+1) x V`` weights are one more global site, ``"output.weight"``, drawn once per
        minibatch like every other weight (the paper's scheme); the model computes the logits
        ``[h, 1] @ A`` from its own pass over the replayed weights and the guide only samples weights,
        so a step costs one ``V``-wide matmul forward and two backward, as a deterministic output layer.
        ``"local_reparameterization"``: the output layer is a
        :class:`~bnnpyro.distributions.HiddenLayer` site ``"logits"`` in the guide, every position's
        logits drawn independently (lower-variance gradients, about twice the output layer's
        matmuls; required with ``estimator="flipout"``, whose features only the guide computes).
        Prediction (:meth:`get_logits`, :meth:`perplexity`) is the same for both: each position's
        logits from their exact marginal.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        hidden_size: int,
        num_layers: int = 2,
        *,
        dataset_size: int,
        prior: Prior | Mapping = Prior(),
        prior_scale: float = 1.0,
        dropout: float = 0.0,
        init_scale: float = 1e-2,
        estimator: str = "weight_space",
        output_estimator: str = "weight_space",
    ) -> None:
        if output_estimator not in OUTPUT_ESTIMATORS:
            raise ValueError(f"output_estimator must be one of {OUTPUT_ESTIMATORS}, got {output_estimator!r}")
        if estimator == "flipout" and output_estimator == "weight_space":
            raise ValueError(
                "estimator='flipout' needs output_estimator='local_reparameterization': the flipout "
                "features are computed in the guide, which then samples the logits"
            )
        super().__init__(out_features=positive_int("vocab_size", vocab_size), hidden_size=hidden_size,
                         dataset_size=dataset_size, input_size=positive_int("embedding_dim", embedding_dim),
                         vocab_size=vocab_size, num_layers=num_layers, dropout=dropout, prior=prior,
                         prior_scale=prior_scale, init_scale=init_scale, estimator=estimator)
        self.output_estimator = output_estimator
        self.config = {
            "vocab_size": vocab_size, "embedding_dim": embedding_dim, "hidden_size": hidden_size,
            "num_layers": num_layers, "dataset_size": dataset_size, "prior": dataclasses.asdict(self.prior),
            "prior_scale": float(prior_scale), "dropout": float(dropout), "init_scale": float(init_scale),
            "estimator": estimator, "output_estimator": output_estimator,
        }

    def _check(self, x: Tensor, y: Tensor | None) -> None:
        self._check_x(x)
        if y is not None:  # a training batch: at most dataset_size; prediction takes any number
            self._check_batch(x)
        if y is not None:
            self._check_labels(y, tuple(x.shape), self.vocab_size, "next-token ids")

    def model(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """
        Pyro model: weights from the prior; returns the ``B x T x V`` logits: ``[h, 1] @ A`` for the
        ``"output.weight"`` site ``A`` (``output_estimator="weight_space"``), or the site ``"logits"``.
        """
        self._check(x, y)
        pyro.module(self._pyro_name, self)
        X = _append_ones(self.encoder(x))
        if self.output_estimator == "weight_space":
            prior = FactorizedNormal(self.out_prior_mean, self.out_prior_scale, self.out_mean.shape)
            logits = X @ pyro.sample(OUTPUT_SITE, prior)
            with self._plate(x):
                pyro.sample("y", _SoftmaxCategorical(logits).to_event(1), obs=y)
            return logits
        with self._plate(x):
            logits = pyro.sample("logits", self._prior_layer(X).to_event(1))
            pyro.sample("y", _SoftmaxCategorical(logits).to_event(1), obs=y)
        return logits

    def guide(self, x: Tensor, y: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        """
        Pyro guide: global mean-field weight sites; with ``output_estimator="weight_space"`` the output
        layer's too (returns ``{site: draw}``), else the output layer ``"logits"`` (``KL_factor = 1/N``,
        returns the ``B x T x V`` logits).
        """
        self._check(x, y)
        pyro.module(self._pyro_name, self)
        if self.output_estimator == "weight_space":
            weights = self.posterior.sample()
            weights[OUTPUT_SITE] = pyro.sample(OUTPUT_SITE, FactorizedNormal(self.out_mean, F.softplus(self.out_rho)))
            return weights
        X = _append_ones(self._guide_outputs(x))
        with self._plate(x):
            layer = self._variational_layer(X, KL_factor=1.0 / self.dataset_size)
            return pyro.sample("logits", layer.to_event(1))

    @torch.no_grad()
    def get_logits(self, x: Tensor, num_predictions: int = 10) -> Tensor:
        """``B x S x T x V`` next-token logits of ``S = num_predictions`` posterior weight draws (no gradients).

        The sample dim is second; :mod:`bnnpyro.predict`'s metrics take the samples first:
        ``.movedim(1, 0)``.
        """
        self._check_x(x)
        S = self._check_num_predictions(num_predictions)
        X = _append_ones(self._sampled_outputs(x, S))  # S x B x T x (H + 1)
        return self._variational_layer(X).rsample().movedim(0, 1)

    def predict(self, x: Tensor, num_predictions: int = 10) -> Tensor:
        """``B x T x V`` posterior-predictive mean next-token probabilities."""
        return self.get_logits(x, num_predictions).softmax(-1).mean(1)

    def perplexity(self, x: Tensor, y: Tensor, num_predictions: int = 10, batch_size: int = 256) -> Tensor:
        r"""
        Per-token perplexity of the posterior-predictive mean probabilities,
        :math:`\exp\big(-\frac{1}{BT}\sum_{b,t} \log \frac1S \sum_s p_s(y_{bt} \mid x_{b, \le t})\big)`,
        computed ``batch_size`` sequences at a time. ``x``, ``y``: ``B x T``.
        """
        self._check_x(x)
        self._check_labels(y, tuple(x.shape), self.vocab_size, "next-token ids")
        S = self._check_num_predictions(num_predictions)
        total = x.new_zeros((), dtype=self.out_mean.dtype)
        for xb, yb in zip(x.split(positive_int("batch_size", batch_size)), y.split(batch_size)):
            log_probs = self.get_logits(xb, S).log_softmax(-1)  # b x S x T x V
            picked = log_probs.gather(-1, yb[:, None, :, None].expand(-1, S, -1, 1)).squeeze(-1)
            total += (torch.logsumexp(picked, dim=1) - math.log(S)).sum()
        return torch.exp(-total / y.numel())

    @torch.no_grad()
    def generate(self, prompt: Tensor, num_tokens: int, temperature: float = 1.0) -> Tensor:
        """
        Sample ``num_tokens`` ids continuing the 1-D int64 ``prompt``, under **one** posterior draw of
        all weights (output layer included), shared by every step as in training.
        """
        if not (torch.is_tensor(prompt) and prompt.dtype == torch.long and prompt.dim() == 1 and prompt.numel()):
            raise ValueError("prompt must be a non-empty 1-D int64 tensor of token ids")
        self._check_x(prompt[None])
        positive_int("num_tokens", num_tokens)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        weights = self.posterior.rsample()
        A = self.out_mean + F.softplus(self.out_rho) * torch.randn_like(self.out_mean)
        out, hx = self.encoder.run(weights, prompt[None], training=False)
        tokens = []
        for _ in range(num_tokens):
            logits = _append_ones(out[0, -1]) @ A
            token = torch.multinomial((logits / temperature).softmax(-1), 1)
            tokens.append(token)
            out, hx = self.encoder.run(weights, token[None], training=False, hx=hx)
        return torch.cat(tokens)
