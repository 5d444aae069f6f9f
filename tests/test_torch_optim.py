"""The plain PyTorch loop (``elbo.differentiable_loss`` + ``backward`` + a ``torch.optim`` optimizer over
the modules' parameters) is the same SVI as ``SVI.step`` with the Pyro optimizer of the same name.

Adam is elementwise, so one ``torch.optim.Adam`` over all parameters and Pyro's one instance per
parameter compute the same update. With the same seed both loops draw the same noise, so after a few
steps every parameter must agree to float round-off (1e-6); leaving one parameter out of the torch
optimizer, or a different learning rate, moves it by about the learning rate, orders of magnitude more.
This is the loop the ``*-torchopt`` columns of ``benchmarks/svi_step.py`` time.
"""

import itertools

import pyro
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

from bnnpyro.infer import AnalyticAutoNormal, JitTraceMeanField_ELBO
from bnnpyro.models import BayesianMLPClassifier, BayesianMLPRegressor
from bnnpyro.nn import BayesianMLP

STEPS = 5
LR = 1e-2


def _data(classification: bool, batch: int = 16):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, generator=g)
    y = torch.randint(0, 3, (batch,), generator=g) if classification else torch.randn(batch, generator=g)
    return x, y


def _build(kind: str):
    """A fresh model (same initial parameters at every call) and the modules holding its parameters."""
    torch.manual_seed(7)
    if kind == "regressor":
        m = BayesianMLPRegressor(4, hidden=(20,), dataset_size=100, init_scale=0.1)
        return m.model, m.guide, [m], False
    if kind == "classifier":
        m = BayesianMLPClassifier(4, 3, hidden=(20,), dataset_size=100, init_scale=0.1)
        return m.model, m.guide, [m], True
    net = BayesianMLP(4, 1, hidden=(20,), dataset_size=100, likelihood="regression")
    guide = (AutoNormal if kind == "autonormal" else AnalyticAutoNormal)(net)
    return net, guide, [net, guide], False


def _params(modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.named_parameters()}


def _svi_run(kind: str, elbo, x, y):
    pyro.clear_param_store()
    model, guide, modules, _ = _build(kind)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), elbo)
    pyro.set_rng_seed(11)
    losses = [svi.step(x, y) for _ in range(STEPS)]
    return losses, _params(modules)


def _torch_run(kind: str, elbo, x, y, drop_last_param: bool = False, lr: float = LR):
    pyro.clear_param_store()
    model, guide, modules, _ = _build(kind)
    pyro.set_rng_seed(11)
    opt, losses, initial = None, [], None
    for _ in range(STEPS):
        loss = elbo.differentiable_loss(model, guide, x, y)
        if opt is None:  # an autoguide creates its parameters at its first call
            params = list(itertools.chain.from_iterable(m.parameters() for m in modules))
            opt = torch.optim.Adam(params[:-1] if drop_last_param else params, lr=lr)
            initial = _params(modules)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, _params(modules), initial


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("kind", ["regressor", "classifier", "autonormal", "analytic-autonormal"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_torch_loop_equals_svi_step(kind, jit):
    elbo_class = JitTraceMeanField_ELBO if jit else TraceMeanField_ELBO
    x, y = _data(_build(kind)[3])
    svi_losses, svi_params = _svi_run(kind, elbo_class(), x, y)
    torch_losses, torch_params, initial = _torch_run(kind, elbo_class(), x, y)
    assert torch_losses == pytest.approx(svi_losses, rel=1e-5)
    assert _max_difference(svi_params, torch_params) < 1e-6
    # the parameters did move: the comparison is not between two initial states
    assert _max_difference(svi_params, initial) > STEPS * LR / 2


@pytest.mark.parametrize("change", ["missing parameter", "learning rate"])
def test_the_comparison_detects_a_different_update(change):
    x, y = _data(False)
    _, svi_params = _svi_run("regressor", TraceMeanField_ELBO(), x, y)
    if change == "missing parameter":
        _, torch_params, _ = _torch_run("regressor", TraceMeanField_ELBO(), x, y, drop_last_param=True)
    else:
        _, torch_params, _ = _torch_run("regressor", TraceMeanField_ELBO(), x, y, lr=1.1 * LR)
    assert _max_difference(svi_params, torch_params) > 1e-3
