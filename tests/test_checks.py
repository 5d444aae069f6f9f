import math

import pytest
import torch

from bnnpyro._checks import all_finite, check_float_batch, one_of, prior_scale_or_fan_in

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


def test_layers_reject_mixed_dtypes_and_devices_naming_the_arguments():
    """A float64 input to float32 weights (or weights on another device) fails at construction
    with the argument names, not deep inside a matmul."""
    from bnnpyro.distributions import ConvLayer, EmbeddingLayer, HiddenLayer

    X, A = torch.randn(5, 4), torch.randn(4, 3)
    with pytest.raises(TypeError, match="A_mean has dtype torch.float32 but X has torch.float64"):
        HiddenLayer(X.double(), A, A.exp())
    with pytest.raises(TypeError, match="A_scale has dtype torch.float64 but X has torch.float32"):
        HiddenLayer(X, A, A.exp().double())
    with pytest.raises(ValueError, match="A_mean is on meta but X is on cpu"):
        HiddenLayer(X, A.to("meta"), A.exp())
    W = torch.randn(2, 1, 3, 3)
    with pytest.raises(TypeError, match="W_mean has dtype torch.float32 but X has torch.float64"):
        ConvLayer(torch.randn(2, 1, 6, 6, dtype=torch.float64), W, W.exp())
    with pytest.raises(TypeError, match="bias_scale has dtype torch.float64 but X has torch.float32"):
        ConvLayer(torch.randn(2, 1, 6, 6), W, W.exp(), bias_mean=torch.zeros(2), bias_scale=torch.ones(2).double())
    E = torch.randn(10, 3)
    with pytest.raises(TypeError, match="W_scale has dtype torch.float64 but W_mean has torch.float32"):
        EmbeddingLayer(torch.zeros(2, 4, dtype=torch.long), E, E.exp().double())
    with pytest.raises(ValueError, match="input is on meta but W_mean is on cpu"):
        EmbeddingLayer(torch.zeros(2, 4, dtype=torch.long, device="meta"), E, E.exp())


def _catalogue_models():
    from bnnpyro.models import (BayesianCNNClassifier, BayesianLSTMClassifier, BayesianMLPClassifier,
                                BayesianMLPRegressor)
    from bnnpyro.nn import BayesianMLP

    return [
        (lambda: BayesianMLPRegressor(3, dataset_size=100), lambda m: (m.model, m.guide),
         torch.randn(8, 3), torch.randn(8)),
        (lambda: BayesianMLPClassifier(3, 4, dataset_size=100), lambda m: (m.model, m.guide),
         torch.randn(8, 3), torch.randint(0, 4, (8,))),
        (lambda: BayesianCNNClassifier(num_classes=3, image_size=8, channels=(2, 2), hidden=(4,), dataset_size=100),
         lambda m: (m.model, m.guide), torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))),
        (lambda: BayesianLSTMClassifier(num_classes=3, hidden_size=4, input_size=2, dataset_size=100),
         lambda m: (m.model, m.guide), torch.randn(8, 5, 2), torch.randint(0, 3, (8,))),
        (lambda: BayesianMLP(3, 1, hidden=(4,), dataset_size=100), None, torch.randn(8, 3), torch.randn(8)),
    ]


@pytest.mark.parametrize("make, program, x, y", _catalogue_models())
def test_catalogue_models_name_a_dtype_or_device_mismatch_of_x(make, program, x, y):
    """float64 (or meta-device) x to a float32 model: an error naming x, both dtypes (devices) and
    the fix; converting the model as it says makes the same x work (a finite loss)."""
    import pyro
    from pyro.infer import Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    pyro.clear_param_store()
    m = make()
    model, guide = program(m) if program else (m, AutoNormal(m))
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the model's \w+ \w* ?are torch.float32: "
                                        r"convert x \(x.to\(torch.float32\)\) or the model \(model.to\(torch.float64\)\)"):
        model(x.double(), y.double() if y.is_floating_point() else y)
    with pytest.raises(ValueError, match="x is on meta but the model's .* are on cpu"):
        model(x.to("meta"), y)
    pyro.clear_param_store()
    m = make().to(torch.float64)
    model, guide = program(m) if program else (m, AutoNormal(m))
    y = y.double() if y.is_floating_point() else y
    assert math.isfinite(Trace_ELBO().loss(model, guide, x.double(), y))


def test_empty_minibatches_raise_naming_the_input():
    """A layer's KL is shared among its minibatch rows (``KL_factor / B`` each): B = 0 is an error
    naming the input, not a ZeroDivisionError; so is an empty x to the models and the predictive."""
    from bnnpyro import sample_predictive
    from bnnpyro.distributions import ConvLayer, EmbeddingLayer, HiddenLayer
    from bnnpyro.models import BayesianCNNClassifier, BayesianMLPRegressor

    A = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"X has no rows \(shape \(0, 4\)\)"):
        HiddenLayer(torch.randn(0, 4), A, A.exp(), dataset_size=10)
    W = torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"X has no rows \(shape \(0, 1, 6, 6\)\)"):
        ConvLayer(torch.randn(0, 1, 6, 6), W, W.exp())
    with pytest.raises(ValueError, match=r"input has no rows \(shape \(0, 4\)\)"):
        EmbeddingLayer(torch.zeros(0, 4, dtype=torch.long), A, A.exp())
    m = BayesianMLPRegressor(4, dataset_size=10)
    with pytest.raises(ValueError, match=r"x must have at least one row, got shape \(0, 4\)"):
        m.guide(torch.randn(0, 4))
    with pytest.raises(ValueError, match=r"x must have at least one row \(its first dim\), got shape \(0, 4\)"):
        sample_predictive(m.model, m.guide, torch.randn(0, 4), 3)
    cnn = BayesianCNNClassifier(num_classes=3, image_size=8, channels=(2, 2), hidden=(4,), dataset_size=10)
    with pytest.raises(ValueError, match=r"x must have at least one row, got shape \(0, 1, 8, 8\)"):
        cnn.model(torch.randn(0, 1, 8, 8))


@pytest.mark.parametrize("value", [1.0, 2, 1e-3, "fan_in"])
def test_prior_scale_or_fan_in_accepts(value):
    assert prior_scale_or_fan_in(value) == value


@pytest.mark.parametrize("value", [0.0, -1.0, True, "fan-in", None, float("nan"), [1.0]])
def test_prior_scale_or_fan_in_rejects_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"prior_scale must be a positive float or 'fan_in', got "):
        prior_scale_or_fan_in(value)


def test_one_of_names_the_argument_and_the_choices():
    assert one_of("estimator", "flipout", ("weight_space", "flipout")) == "flipout"
    with pytest.raises(ValueError, match=r"estimator must be one of \('weight_space', 'flipout'\), got 'x'"):
        one_of("estimator", "x", ("weight_space", "flipout"))


def test_check_float_batch_names_a_non_tensor_by_its_type():
    """A numpy array is named as such (its float32 dtype was printed, as if that were the problem)."""
    import numpy as np

    like = torch.zeros(3)
    with pytest.raises(TypeError, match="x must be a floating-point torch.Tensor, got ndarray"):
        check_float_batch(np.zeros((2, 3), dtype=np.float32), like, True, "B x 3", 10, True)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        check_float_batch(torch.zeros(2, 3, dtype=torch.long), like, True, "B x 3", 10, True)


def _value_check_cases():
    """(name, model or guide, bad x, bad y) per model family: one non-finite or out-of-range value each."""
    from bnnpyro.models import BayesianCNNClassifier, BayesianMLPClassifier, BayesianMLPRegressor
    from bnnpyro.nn import BayesianMLP

    nan_x = torch.randn(4, 3)
    nan_x[0, 0] = float("nan")
    reg = BayesianMLPRegressor(3, dataset_size=10)
    clf = BayesianMLPClassifier(3, 2, dataset_size=10)
    cnn = BayesianCNNClassifier(num_classes=2, image_size=8, channels=(2,), hidden=(4,), dataset_size=10)
    net = BayesianMLP(3, 2, likelihood="classification", dataset_size=10)
    return [
        ("regressor x", reg.model, nan_x, torch.randn(4)),
        ("classifier y", clf.model, torch.randn(4, 3), torch.tensor([0, 1, 2, 0])),
        ("cnn y", cnn.model, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 5, 0])),
        ("BayesianMLP y", net, torch.randn(4, 3), torch.tensor([0, 1, 3, 0])),
    ]


def test_value_checks_follow_pyros_validation_setting():
    """The models' checks of input *values* (NaN, labels out of range: a pass over the batch, a
    synchronisation on a GPU) run with Pyro's validation on, like the distributions' value
    checks, and not with it off (which the README advises for speed); shape, dtype and device checks
    always run. With validation off a BayesianMLP runs on the meta device (shape inference)."""
    import pyro

    from bnnpyro.models import BayesianLSTMClassifier, BayesianLSTMLanguageModel
    from bnnpyro.nn import BayesianMLP

    for name, fn, x, y in _value_check_cases():
        with pytest.raises((ValueError, TypeError)):
            fn(x, y)
        with pyro.validation_enabled(False):
            try:
                fn(x, y)
            except (ValueError, TypeError) as e:  # an index error deeper down is the user's lookout
                raise AssertionError(f"{name}: checked values with validation off: {e}") from e
            except (IndexError, RuntimeError):
                pass
    # token ids are checked always: cheap beside an LSTM, a device-side assert on a GPU otherwise, and
    # sample_predictive runs its later chunks with validation off
    # sample_predictive runs its later chunks with validation off; so are the LSTM models' labels and
    # next-token targets (F.cross_entropy silently skips a -100)
    lstm = BayesianLSTMClassifier(num_classes=2, hidden_size=4, vocab_size=5, embedding_dim=3, dataset_size=10)
    lm = BayesianLSTMLanguageModel(5, 3, 4, dataset_size=10)
    tokens = torch.tensor([[0, 1], [2, 3]])
    with pyro.validation_enabled(False):
        with pytest.raises(ValueError, match=r"x holds ids in \[0, 7\], expected \[0, 5\)"):
            lstm.guide(torch.tensor([[0, 1], [7, 2]]))
        with pytest.raises(ValueError, match=r"y holds class labels in \[0, 2\], expected \[0, 2\)"):
            lstm.model(tokens, torch.tensor([0, 2]))
        for bad in (9, -100):
            with pytest.raises(ValueError, match="y holds next-token ids"):
                lm.model(tokens, torch.tensor([[1, 2], [3, bad]]))
    net = BayesianMLP(3, 1, hidden=(4,), dataset_size=10).to("meta")
    with pyro.validation_enabled(False), torch.no_grad():
        assert net(torch.empty(5, 3, device="meta")).shape == (5, 1)
        with pytest.raises(ValueError, match="x must be a float tensor of shape B x 3"):
            net(torch.empty(5, 4, device="meta"))
