import pytest
import torch

from bnnpyro._checks import all_finite

BIG = torch.finfo(torch.float32).max


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_all_finite_agrees_with_the_elementwise_check(dtype):
    """``all_finite`` (sum first) == ``isfinite(t).all()``, including sums that overflow."""
    g = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    cases = [
        torch.randn(100, 13, generator=g),
        torch.empty(0, 3),
        torch.full((4,), big, dtype=dtype),  # finite, but the sum overflows
        torch.tensor([big, -big, 1.0], dtype=dtype),
    ]
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(50, 7, generator=g)
        t[31, 4] = bad
        cases.append(t)
    both = torch.randn(10, generator=g)
    both[2], both[7] = float("inf"), float("-inf")  # the sum is NaN
    cases.append(both)
    for t in cases:
        t = t.to(dtype)
        assert all_finite(t) == bool(torch.isfinite(t).all()), t


def test_catalogue_models_reject_non_finite_inputs():
    from bnnpyro.models import BayesianMLPRegressor

    m = BayesianMLPRegressor(3, dataset_size=100)
    x, y = torch.randn(8, 3), torch.randn(8)
    x[5, 2] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        m.guide(x, y)
    x = torch.full((8, 3), BIG)  # finite: accepted, though its sum overflows
    m.guide(x)
    y[0] = float("nan")
    with pytest.raises(ValueError, match="y contains NaN or infinite values"):
        m.model(torch.randn(8, 3), y)
