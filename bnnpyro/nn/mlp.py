r"""
A Bayesian MLP as a Pyro model, for Pyro's autoguides and ELBOs.

Every weight and bias is a global sample site (:class:`~bnnpyro.nn.linear.BayesianLinear`),
the likelihood is observed in a subsampled data plate, so that a plain SVI loop over
mini-batches of ``B`` out of ``N`` points optimizes the full-data ELBO (Blundell et al., 2015,
eq. 8 with the KL counted once):

.. math::

    -\mathrm{ELBO} = \frac{N}{B} \sum_{n \in \text{batch}} \mathbb E_{q(w)}[-\log p(y_n \mid x_n, w)]
                     + \mathrm{KL}(q(w) \,\Vert\, p(w)).

Reference: Blundell, C., Cornebise, J., Kavukcuoglu, K., Wierstra, D. (2015). Weight
uncertainty in neural networks. ICML.
"""

from __future__ import annotations

import dataclasses

from typing import Callable, Optional, Sequence

import pyro
import pyro.distributions as dist
from pyro.distributions.util import is_validation_enabled
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor, nn
from torch.distributions import constraints

from bnnpyro._checks import check_finite, check_like, positive_int, positive_ints
from bnnpyro.distributions.priors import Prior
from bnnpyro.nn.activations import resolve_non_linearity
from bnnpyro.nn.linear import BayesianLinear
from bnnpyro.nn.param_names import UniqueParamNames, new_param_prefix

LIKELIHOODS = ("regression", "classification")



class BayesianMLP(UniqueParamNames, PyroModule):
    r"""
    ``in_features -> hidden... -> out_features`` network of :class:`BayesianLinear` layers
    (sites ``layers.<i>.weight`` / ``layers.<i>.bias``) with ``non_linearity`` between them,
    and a likelihood; ``forward(x, y=None)`` is a Pyro model.

    *Likelihood* (site ``y``, as in the catalogue models, in ``pyro.plate("data", N,
    subsample=arange(B), dim=-1)``, which scales it by ``N / B`` with ``N = dataset_size``, default
    the batch size):

    - ``"regression"``: :math:`y_n \sim \mathcal N(f(x_n), \sigma^2)`, ``Normal(f.squeeze(-1),
      sigma)`` with ``y`` of shape ``B`` if ``out_features == 1``, else
      ``Normal(f, sigma).to_event(1)`` with ``y`` ``B x out``. :math:`\sigma` is a learned
      :class:`~pyro.nn.PyroParam` ``sigma`` (positive, initial value 1), or the constant
      ``noise_scale`` (a buffer ``sigma``). In Pyro's param store the learned ``sigma`` is
      ``<param_prefix>.sigma``, unique to the instance (``BayesianMLP_<k>``), so that two models
      in one process never share it (see :mod:`bnnpyro.nn.param_names`).
    - ``"classification"``: ``Categorical(logits=f)``, ``y`` int64 of shape ``B`` in
      ``0 .. out_features - 1``.

    The network output is also recorded inside the plate as ``pyro.deterministic("f", f,
    event_dim=1)``, so ``pyro.infer.Predictive`` returns it, and is returned by ``forward``.
    The network is evaluated outside the plate, so each weight's KL is counted once per step.

    *Posterior draws.* Weights drawn under outer plates (an ELBO with
    ``vectorize_particles=True``, a user's plate over samples) have batch shape ``*P x 1``
    (the 1 standing for the data plate) and the layers output ``*P x 1 x B x out``; the model
    drops that singleton so that ``f`` is ``*P x B x out``, aligned with the plates. Weights
    conditioned to stacked draws ``S x out x in`` (what ``Predictive(..., parallel=True)``
    feeds the model: its guide pass has no plates) give ``S x B x out`` directly.

    The learned ``sigma`` lives in Pyro's global param store under the instance's own name, so a
    ``load_state_dict`` into a new instance is used as loaded (no stale store entry of another
    model overrides it), and a deep copy or an unpickled model takes a new name of its own.

    :param in_features: input width ``D``.
    :param out_features: output width: 1 (or more) regression targets, or the number of classes.
    :param hidden: widths of the hidden layers.
    :param non_linearity: elementwise activation between layers.
    :param dataset_size: ``N``, the number of training points; ``None`` for the batch size.
    :param prior: i.i.d. prior of every weight and bias; ``None`` for a zero-mean Normal.
    :param prior_scale: scale of that Normal, or ``"fan_in"`` for ``1/sqrt(fan-in)`` per layer.
    :param likelihood: ``"regression"`` or ``"classification"``.
    :param noise_scale: fixed observation noise of the regression likelihood; ``None`` learns it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (50,),
        non_linearity: str | Callable[[Tensor], Tensor] = "relu",
        dataset_size: Optional[int] = None,
        prior: Optional[Prior | dict] = None,
        prior_scale: float | str = 1.0,
        likelihood: str = "regression",
        noise_scale: Optional[float] = None,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        # sigma is stored in Pyro's param store under a name of this instance's own
        self._param_prefix = new_param_prefix(type(self).__name__)
        if isinstance(prior, dict):
            prior = Prior(**prior)
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        self.hidden = positive_ints("hidden", hidden)
        self.dataset_size = None if dataset_size is None else positive_int("dataset_size", dataset_size)
        self.non_linearity = resolve_non_linearity(non_linearity)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood == "classification" and noise_scale is not None:
            raise ValueError("noise_scale is only used with likelihood='regression'")
        self.likelihood = likelihood
        self.config = {
            "in_features": in_features,
            "out_features": out_features,
            "hidden": list(self.hidden),
            "non_linearity": non_linearity if isinstance(non_linearity, str) else None,
            "dataset_size": dataset_size,
            "prior": None if prior is None else dataclasses.asdict(prior),
            "prior_scale": prior_scale,
            "likelihood": likelihood,
            "noise_scale": noise_scale,
        }
        widths = (in_features, *self.hidden, out_features)
        self.layers = PyroModule[nn.ModuleList](
            [
                BayesianLinear(d_in, d_out, prior=prior, prior_scale=prior_scale, device=device, dtype=dtype)
                for d_in, d_out in zip(widths[:-1], widths[1:])
            ]
        )
        if likelihood == "regression":
            dtype = dtype if dtype is not None else torch.get_default_dtype()
            if noise_scale is None:
                self.sigma = PyroParam(torch.ones((), device=device, dtype=dtype), constraints.positive)
            elif isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) or not noise_scale > 0:
                raise ValueError(f"noise_scale must be a positive number or None, got {noise_scale!r}")
            else:
                self.register_buffer("sigma", torch.tensor(float(noise_scale), device=device, dtype=dtype))

    def net(self, x: Tensor) -> Tensor:
        """The network ``x -> f``: ``B x in`` -> ``*S x B x out`` (``*S``: the weights' sample dims)."""
        for i, layer in enumerate(self.layers):
            if i:
                x = self.non_linearity(x)
            x = layer(x)
        return x

    def _check_inputs(self, x: Tensor, y: Optional[Tensor]) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2 or x.shape[1] != self.in_features:
            got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a float tensor of shape B x {self.in_features}, got {got}")
        check_like("x", x, next(self.layers[0].buffers()), owner="the model's prior buffers")
        batch = x.shape[0]
        if batch == 0:
            raise ValueError("x must have at least one row")
        check_finite("x", x)
        if y is not None and self.dataset_size is not None and self.dataset_size < batch:
            raise ValueError(f"dataset_size ({self.dataset_size}) is smaller than the batch size ({batch})")
        if y is None:
            return
        if not isinstance(y, Tensor):
            raise ValueError(f"y must be a tensor or None, got {type(y).__name__}")
        if self.likelihood == "classification":
            if y.dtype != torch.int64 or y.shape != (batch,):
                raise ValueError(f"y must be an int64 tensor of shape ({batch},), got {y.dtype} {tuple(y.shape)}")
            if is_validation_enabled() and ((y < 0) | (y >= self.out_features)).any():
                raise ValueError(f"y labels must be in 0 .. {self.out_features - 1}")
            return
        expected = (batch,) if self.out_features == 1 else (batch, self.out_features)
        if not y.is_floating_point() or y.shape != expected:
            raise ValueError(f"y must be a float tensor of shape {expected}, got {y.dtype} {tuple(y.shape)}")
        check_finite("y", y)

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """
        The model: ``x`` ``B x in`` (float), ``y`` as documented or ``None`` (then ``y`` is
        sampled). Returns ``f``: ``B x out``, or ``*P x B x out`` under outer plates.

        Raises:
            ValueError: ``x`` not a ``B x in_features`` float tensor, ``y`` of the wrong shape or
                dtype, ``dataset_size < B``; with Pyro's validation on, NaN or inf in ``x`` or
                ``y`` and labels out of range.
        """
        self._check_inputs(x, y)
        batch = x.shape[0]
        f = self.net(x)
        if f.dim() > 2 and f.shape[-3] == 1:
            f = f.squeeze(-3)  # the weights' placeholder dim of the data plate, see the class docstring
        size = self.dataset_size or batch
        with pyro.plate("data", size, subsample=torch.arange(batch, device=x.device), dim=-1):
            pyro.deterministic("f", f, event_dim=1)
            if self.likelihood == "classification":
                likelihood = dist.Categorical(logits=f)
            elif self.out_features == 1:
                likelihood = dist.Normal(f.squeeze(-1), self.sigma)
            else:
                likelihood = dist.Normal(f, self.sigma).to_event(1)
            pyro.sample("y", likelihood, obs=y)
        return f

    def mean_and_scale(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """Regression: the likelihood's mean and noise std given the network output ``f``
        (``... x B x out``), the mean squeezed to ``... x B`` when ``out_features == 1``."""
        if self.likelihood != "regression":
            raise ValueError("mean_and_scale is only defined for likelihood='regression'")
        mean = f.squeeze(-1) if self.out_features == 1 else f
        return mean, self.sigma.expand(mean.shape)

    def extra_repr(self) -> str:
        non_linearity = self.config["non_linearity"] or getattr(self.non_linearity, "__name__", "callable")
        noise = "" if self.likelihood != "regression" else (
            ", noise='learned'" if self.config["noise_scale"] is None else f", noise_scale={self.config['noise_scale']}")
        return (f"likelihood={self.likelihood!r}, non_linearity={non_linearity!r}{noise}, "
                f"dataset_size={self.dataset_size}")
