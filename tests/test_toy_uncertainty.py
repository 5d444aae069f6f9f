"""Honest uncertainty on the toy curve of Blundell et al. (2015): calibrated inside the data,
wide outside it."""

import pyro
import torch

from bnnpyro import fit, sample_predictive
from bnnpyro.data import toy_regression
from bnnpyro.models import BayesianMLPRegressor
from bnnpyro.predict import gaussian_mixture_interval, picp


def test_toy_regression_coverage_and_width_growth():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x, y = toy_regression(n=200, noise=0.02, seed=0)  # x in [0, 0.5]
    xt, yt = toy_regression(n=500, noise=0.02, seed=1)  # held-out, same range
    m = BayesianMLPRegressor(1, hidden=(50, 50), dataset_size=len(x), prior_scale=1.0)
    fit(m.model, m.guide, (x, y), epochs=300, batch_size=50, seed=0, progress=False)
    with torch.no_grad():
        mean, scale = m.mean_and_scale(sample_predictive(m.model, m.guide, xt, 500)["f"])
        lower, upper = gaussian_mixture_interval(mean, scale, 0.95)
        coverage = picp(lower, upper, yt).item()
        grid = torch.tensor([[0.25], [1.5]])  # centre of the data, and 1 unit beyond its edge
        gm, gs = m.mean_and_scale(sample_predictive(m.model, m.guide, grid, 2000)["f"])
        gl, gu = gaussian_mixture_interval(gm, gs, 0.95)
    width_in, width_out = (gu - gl).tolist()
    assert 0.90 <= coverage <= 0.99, coverage
    assert width_out >= 3 * width_in, (width_in, width_out)
