"""bnnpyro.data: UCI loader (standardization, errors, bundled copy), toy curve, classification."""

import filecmp
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bnnpyro.data import (
    UCI_DATASETS,
    list_uci,
    load_classification,
    load_uci,
    make_moons,
    make_spirals,
    toy_regression,
    toy_regression_curve,
    uci_protocol,
)

BUNDLED = Path(__file__).resolve().parents[1] / "bnnpyro" / "data" / "uci"
SHARED = Path(__file__).parents[2] / "shared" / "data" / "uci"


def _raw(name, split):
    """Manual numpy reference: raw x, y of the train and test rows."""
    folder = BUNDLED / name
    data = np.loadtxt(folder / "data.txt")
    feats = np.loadtxt(folder / "index_features.txt", dtype=int)
    target = int(np.loadtxt(folder / "index_target.txt"))
    train = np.loadtxt(folder / f"index_train_{split}.txt", dtype=int)
    test = np.loadtxt(folder / f"index_test_{split}.txt", dtype=int)
    return data[train][:, feats], data[train, target], data[test][:, feats], data[test, target]


@pytest.mark.parametrize("name", UCI_DATASETS)
def test_uci_train_split_is_standardized(name):
    s = load_uci(name, split=1)
    assert s.x_train.dtype == s.y_train.dtype == torch.float32
    assert s.x_train.dim() == 2 and s.y_train.dim() == 1 and s.y_test.dim() == 1
    assert (s.name, s.split) == (name, 1)
    x_std = s.x_train.double().std(0, unbiased=False)
    non_constant = s.x_std != 1  # a zero-std column stays constant after centring
    assert s.x_train.double().mean(0).abs().max() < 1e-4
    assert (x_std[non_constant] - 1).abs().max() < 1e-4
    assert abs(s.y_train.double().mean().item()) < 1e-4
    assert abs(s.y_train.double().std(unbiased=False).item() - 1) < 1e-4


@pytest.mark.parametrize("name", UCI_DATASETS)
def test_uci_test_split_uses_training_stats(name):
    split = 7
    s = load_uci(name, split=split)
    x_tr, y_tr, x_te, y_te = _raw(name, split)
    mu, sd = x_tr.mean(0), x_tr.std(0)
    sd[sd == 0] = 1.0
    np.testing.assert_allclose(s.x_test.numpy(), (x_te - mu) / sd, atol=1e-5)
    np.testing.assert_allclose(s.y_test.numpy(), (y_te - y_tr.mean()) / y_tr.std(), atol=1e-5)
    assert s.y_scale == pytest.approx(y_tr.std(), rel=1e-6)
    assert len(s.x_train) == len(x_tr) and len(s.x_test) == len(x_te)


def test_y_to_original_inverts():
    s = load_uci("yacht", split=0)
    _, y_tr, _, y_te = _raw("yacht", 0)
    np.testing.assert_allclose(s.y_test_original.numpy(), y_te, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s.y_to_original(s.y_train).numpy(), y_tr, rtol=1e-5, atol=1e-4)
    # RMSE in standardized units times y_scale is the RMSE in original units.
    pred = torch.zeros_like(s.y_test)
    rmse_std = (pred - s.y_test).pow(2).mean().sqrt()
    rmse_orig = (s.y_to_original(pred) - s.y_test_original).pow(2).mean().sqrt()
    assert (rmse_std * s.y_scale).item() == pytest.approx(rmse_orig.item(), rel=1e-5)


def test_protocol_and_listing():
    for name in UCI_DATASETS:
        assert uci_protocol(name) == {"n_hidden": 50, "n_epochs": 40, "n_splits": 20}
    assert set(UCI_DATASETS) <= set(list_uci())
    assert list_uci(root=BUNDLED) == sorted(UCI_DATASETS)
    assert "bostonHousing" not in list_uci(root=BUNDLED)


def test_explicit_root(tmp_path):
    s = load_uci("energy", split=2, root=BUNDLED)
    torch.testing.assert_close(s.x_test, load_uci("energy", split=2).x_test)
    with pytest.raises(FileNotFoundError, match="energy"):
        load_uci("energy", root=tmp_path)


def test_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_uci("yacht", split=20)
    with pytest.raises(ValueError, match="split"):
        load_uci("yacht", split=-1)
    for bad in (2.0, True, "1"):  # had looked for index_train_2.0.txt, index_train_True.txt
        with pytest.raises(ValueError, match="split must be an int"):
            load_uci("yacht", split=bad)
    assert len(load_uci("yacht", split=np.int64(1)).x_test) == len(load_uci("yacht", split=1).x_test)
    monkeypatch.setenv("BNNPYRO_UCI_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="looked in") as info:
        load_uci("no-such-data-set")
    assert str(tmp_path) in str(info.value) and str(BUNDLED) in str(info.value)
    assert "Available there: " in str(info.value) and "yacht" in str(info.value)


def test_a_path_to_a_data_set_folder_loads_it(tmp_path, monkeypatch):
    s = load_uci(str(BUNDLED / "yacht"), split=3)
    torch.testing.assert_close(s.x_train, load_uci("yacht", split=3).x_train)
    # ./name is a path (it had been looked up as a bare name under the default roots only), and a
    # local ./yacht is not confused with the bundled yacht
    shutil.copytree(BUNDLED / "yacht", tmp_path / "mydata")
    shutil.copytree(BUNDLED / "yacht", tmp_path / "yacht")
    (tmp_path / "yacht" / "data.txt").write_text("1 2\n")  # a local ./yacht that is not the bundled one
    monkeypatch.chdir(tmp_path)
    torch.testing.assert_close(load_uci("./mydata", split=3).x_train, s.x_train)
    with pytest.raises(IndexError):  # the local file is read: its one row has no row 3 of the split
        load_uci("./yacht", split=3)
    torch.testing.assert_close(load_uci("yacht", split=3).x_train, s.x_train)  # the bare name: bundled
    with pytest.raises(FileNotFoundError, match="'./concrete' has no data.txt"):  # not the bundled concrete
        load_uci("./concrete")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/uci not present")
@pytest.mark.parametrize("name", UCI_DATASETS)
def test_bundled_copy_matches_shared(name):
    files = sorted(p.name for p in (SHARED / name).iterdir())
    assert sorted(p.name for p in (BUNDLED / name).iterdir()) == files
    match, mismatch, errors = filecmp.cmpfiles(SHARED / name, BUNDLED / name, files, shallow=False)
    assert not mismatch and not errors


def test_toy_regression_shapes_and_noise():
    x, y = toy_regression(n=64, seed=1)
    assert x.shape == (64, 1) and y.shape == (64,) and x.dtype == y.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 0.5
    x2, y2 = toy_regression(n=64, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x0, y0 = toy_regression(n=64, noise=0.0)
    torch.testing.assert_close(y0, toy_regression_curve(x0.squeeze(-1)))
    assert toy_regression_curve(x0).shape == x0.shape


def test_toy_regression_noise_std():
    # y = f(x + ε) for the curve f, so y - f(x) ≈ ε f'(x) + ε² f''(x) / 2: its std is
    # about noise * sqrt(E[f'(x)²]) and its mean about noise² E[f''(x)] / 2.
    noise = 0.01
    x, y = toy_regression(n=200_000, noise=noise, seed=3)
    x = x.squeeze(-1).double()
    resid = y.double() - toy_regression_curve(x)
    two_pi_x = 2 * math.pi * x
    d1 = 1 + 0.6 * math.pi * torch.cos(two_pi_x) + 1.2 * math.pi * torch.cos(2 * two_pi_x)
    d2 = -1.2 * math.pi**2 * torch.sin(two_pi_x) - 4.8 * math.pi**2 * torch.sin(2 * two_pi_x)
    expected_mean = noise**2 / 2 * d2.mean().item()
    assert resid.mean().item() == pytest.approx(expected_mean, abs=0.04 * noise)  # ~6 std errors
    assert resid.std().item() == pytest.approx(noise * d1.pow(2).mean().sqrt().item(), rel=0.02)


@pytest.mark.parametrize("name", ["two_moons", "spirals", "digits", "breast_cancer"])
def test_classification_split(name):
    if name in ("digits", "breast_cancer"):
        pytest.importorskip("sklearn")
    s = load_classification(name, seed=0)
    assert s.x_train.dtype == s.x_test.dtype == torch.float32
    assert s.y_train.dtype == s.y_test.dtype == torch.int64
    assert s.x_train.dim() == 2 and s.x_train.shape[1] == s.x_test.shape[1]
    assert s.y_train.shape == (len(s.x_train),) and s.y_test.shape == (len(s.x_test),)
    for y in (s.y_train, s.y_test):
        assert y.min() >= 0 and y.max() < s.num_classes
        assert len(y.unique()) == s.num_classes  # stratified: every class on both sides
    n = len(s.y_train) + len(s.y_test)
    assert len(s.y_test) == pytest.approx(0.2 * n, abs=s.num_classes)
    # No row shared between train and test (digits has no exact duplicate images).
    train_rows = {tuple(r) for r in s.x_train.tolist()}
    assert not any(tuple(r) in train_rows for r in s.x_test.tolist())
    if name == "digits":
        assert s.num_classes == 10 and s.x_train.min() >= 0 and s.x_train.max() <= 1
    else:
        assert s.x_train.double().mean(0).abs().max() < 1e-4
        assert (s.x_train.double().std(0, unbiased=False) - 1).abs().max() < 1e-4
    again = load_classification(name, seed=0)
    assert torch.equal(s.x_test, again.x_test) and torch.equal(s.y_test, again.y_test)
    assert not torch.equal(s.y_test, load_classification(name, seed=1).y_test)


def test_synthetic_generators():
    x, y = make_moons(300, noise=0.0, seed=0)
    assert x.shape == (300, 2) and y.shape == (300,) and np.bincount(y).tolist() == [150, 150]
    np.testing.assert_allclose(np.linalg.norm(x[y == 0], axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(x[y == 1] - [1.0, 0.5], axis=1), 1.0)
    x, y = make_spirals(300, noise=0.0, num_classes=3, seed=0)
    assert x.shape == (300, 2) and np.bincount(y).tolist() == [100, 100, 100]
    assert np.linalg.norm(x, axis=1).max() <= 1.0


def test_unknown_classification_name():
    with pytest.raises(ValueError, match="unknown"):
        load_classification("mnist")


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "n must be a positive int"),
    ({"noise": -0.1}, "noise must be a non-negative"),
    ({"x_range": (0.5, 0.0)}, "x_range"),
])
def test_toy_regression_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy_regression(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"test_fraction": 1.5}, "test_fraction"),
    ({"test_fraction": 0.0}, "test_fraction"),
    ({"name": "two_moons", "n": 0}, "n must be a positive int"),
    # round(0.01 * 10) = 0 test points per class
    ({"name": "two_moons", "n": 20, "test_fraction": 0.01}, "leaves the test split empty"),
])
def test_load_classification_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_classification(**kwargs)


@pytest.mark.parametrize("make", [make_moons, make_spirals])
def test_generators_reject_no_points(make):
    with pytest.raises(ValueError, match="n must be a positive int"):
        make(0)
