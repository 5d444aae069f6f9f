"""Device support: models, predictive and metrics on CUDA (skipped without a GPU)."""

import pytest
import torch

from bnnpyro import fit, sample_predictive
from bnnpyro.models import BayesianMLPClassifier, BayesianMLPRegressor
from bnnpyro.predict import accuracy, evaluate_regression, mean_probs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_regressor_trains_and_predicts_on_cuda():
    dev = torch.device("cuda")
    x = torch.randn(200, 3, device=dev)
    y = x.sum(-1) + 0.1 * torch.randn(200, device=dev)
    m = BayesianMLPRegressor(3, hidden=(16,), dataset_size=200).to(dev)
    fit(m.model, m.guide, (x, y), epochs=50, batch_size=32, seed=0, progress=False)
    f = sample_predictive(m.model, m.guide, x, 50)["f"]
    assert f.device.type == "cuda"
    with torch.no_grad():
        mean, scale = m.mean_and_scale(f)
    assert evaluate_regression(mean, scale, y)["rmse"] < 0.5


@cuda
def test_classifier_on_cuda():
    dev = torch.device("cuda")
    x = torch.randn(300, 2, device=dev)
    y = (x[:, 0] > 0).long()
    m = BayesianMLPClassifier(2, 2, hidden=(16,), dataset_size=300).to(dev)
    fit(m.model, m.guide, (x, y), epochs=30, batch_size=64, seed=0, progress=False)
    probs = mean_probs(sample_predictive(m.model, m.guide, x, 20)["f"], logits=True)
    assert probs.device.type == "cuda" and accuracy(probs, y) > 0.9
