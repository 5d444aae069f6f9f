"""Uncertainty plots: returned Axes, drawn artists, PNG export, errors (headless, Agg)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from bnnpyro.predict.metrics import auroc, expected_calibration_error  # noqa: E402
from bnnpyro.predict.plots import (  # noqa: E402
    plot_predicted_vs_true,
    plot_predictive_band,
    plot_reliability_diagram,
    plot_uncertainty_histogram,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def regression_data(n=30):
    g = gen()
    x = torch.rand(n, generator=g) * 4 - 2
    y = torch.sin(x) + 0.1 * torch.randn(n, generator=g)
    return x, y


def test_predictive_band_on_training_inputs(tmp_path):
    x, y = regression_data()
    mean = torch.sin(x)
    ax = plot_predictive_band(x, y, mean, mean - 0.2, mean + 0.2)
    assert isinstance(ax, Axes)
    assert len(ax.lines) == 1  # mean
    assert len(ax.collections) == 2  # interval, data
    ax.figure.savefig(tmp_path / "band.png")
    assert (tmp_path / "band.png").stat().st_size > 0


def test_predictive_band_on_grid_with_test_points_and_true_fn(tmp_path):
    x, y = regression_data()
    x_test = torch.linspace(-3, 3, 50)[:, None]  # N x 1 inputs are accepted
    y_test = torch.sin(x_test[:, 0])
    mean = torch.sin(x_test[:, 0])
    seen = []

    def true_fn(grid):
        seen.append(grid.shape)
        return torch.sin(grid)

    _, given = plt.subplots()
    ax = plot_predictive_band(
        x[:, None], y, mean, mean - 0.3, mean + 0.3, ax=given, x_test=x_test, y_test=y_test, true_fn=true_fn
    )
    assert ax is given
    assert seen == [torch.Size([500, 1])]  # grid shaped like x
    assert len(ax.lines) == 2  # mean, true function
    assert len(ax.collections) == 3  # interval, data, test points
    ax.figure.savefig(tmp_path / "band_grid.png")


def test_predicted_vs_true(tmp_path):
    g = gen()
    y = torch.randn(40, generator=g)
    mean = y + 0.1 * torch.randn(40, generator=g)
    lower, upper = mean - 0.5, mean + 0.5
    ax = plot_predicted_vs_true(y, mean, lower, upper)
    assert len(ax.lines) == 2  # error-bar markers, diagonal
    assert len(ax.collections) == 1  # error bars
    assert "RMSE" in ax.get_title() and "coverage" in ax.get_title()
    ax.figure.savefig(tmp_path / "pred_vs_true.png")


def test_reliability_diagram(tmp_path):
    g = gen()
    probs = torch.randn(200, 4, generator=g).mul(3).softmax(-1)
    y = torch.randint(4, (200,), generator=g)
    ax = plot_reliability_diagram(probs, y, num_bins=10)
    assert len(ax.patches) == 10  # one accuracy bar per bin
    assert len(ax.lines) == 1  # diagonal
    ece = expected_calibration_error(probs, y, num_bins=10)
    assert ax.get_title() == f"ECE = {float(ece):.4f}"
    ax.figure.savefig(tmp_path / "reliability.png")


def test_uncertainty_histogram(tmp_path):
    g = gen()
    score_in, score_out = torch.rand(100, generator=g), torch.rand(80, generator=g) + 0.5
    ax = plot_uncertainty_histogram(score_in, score_out, label="predictive entropy")
    assert len(ax.patches) == 2  # one filled step histogram each
    assert ax.get_xlabel() == "predictive entropy"
    assert ax.get_title() == f"AUROC = {float(auroc(score_in, score_out)):.3f}"
    ax.figure.savefig(tmp_path / "hist.png")


def test_plot_errors():
    x, y = regression_data()
    with pytest.raises(ValueError, match="y_test needs x_test"):
        plot_predictive_band(x, y, y, y - 1, y + 1, y_test=y)
    with pytest.raises(ValueError, match=r"mean must have the shape of x_test \(5,\)"):
        plot_predictive_band(x, y, y, y - 1, y + 1, x_test=torch.zeros(5))
    with pytest.raises(ValueError, match=r"x must be N or N x 1, got shape \(30, 2\)"):
        plot_predictive_band(torch.zeros(30, 2), y, y, y - 1, y + 1)
    with pytest.raises(ValueError, match="lower must not exceed upper"):
        plot_predicted_vs_true(y, y, y + 1, y - 1)
    with pytest.raises(ValueError, match=r"mean must have the shape of y_true \(30,\), got shape \(29,\)"):
        plot_predicted_vs_true(y, y[1:], y - 1, y + 1)
    with pytest.raises(ValueError, match="lower must not exceed upper"):
        plot_predictive_band(x, y, y, y + 1, y - 1)
