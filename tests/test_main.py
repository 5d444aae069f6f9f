"""The main job (`bnnpyro` / `python -m bnnpyro`) runs end to end with small settings."""

import re
import subprocess
import sys

import pytest

from bnnpyro.__main__ import main


def _metrics(out: str) -> dict[str, float]:
    values = {}
    for line in out.splitlines():
        for key in ("test RMSE", "test log-likelihood", "95% coverage", "mean interval width"):
            if line.startswith(key):
                values[key] = float(line.split()[-1])
    return values


@pytest.mark.parametrize("guide, jit", [("hand", False), ("auto-normal", False), ("auto-lowrank", False),
                                        ("hand", True), ("auto-lowrank", True)])
def test_main_job_prints_metrics_and_writes_plot(tmp_path, capsys, guide, jit):
    plot = tmp_path / "pred.png"
    assert main(["--data", "yacht", "--epochs", "40", "--guide", guide, "--plot", str(plot),
                 "--no-progress", "--num-samples", "100", *(["--jit"] if jit else [])]) == 0
    metrics = _metrics(capsys.readouterr().out)
    assert set(metrics) == {"test RMSE", "test log-likelihood", "95% coverage", "mean interval width"}
    assert 0 < metrics["test RMSE"] < 15  # yacht target std ~15
    assert 0 <= metrics["95% coverage"] <= 1 and metrics["mean interval width"] > 0
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("guide", ["hand", "auto-lowrank"])
def test_save_writes_the_trained_model(tmp_path, capsys, guide):
    """--save writes the trained model (and autoguide) with its optimizer state: the loaded model's
    test RMSE on the same split agrees with the printed one (an untrained network's is several
    times larger), and its optimizer state loads."""
    import pyro
    import torch

    import bnnpyro
    from bnnpyro.data import load_uci
    from bnnpyro.predict import evaluate_regression

    path = tmp_path / "m.pt"
    assert main(["--data", "yacht", "--epochs", "40", "--guide", guide, "--plot", "", "--save", str(path),
                 "--no-progress", "--num-samples", "200"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}" in out
    printed = _metrics(out)["test RMSE"]
    loaded = bnnpyro.load(path)
    model, guide_ = (loaded.model, loaded.guide) if guide == "hand" else loaded
    net = loaded if guide == "hand" else loaded[0]
    bnnpyro.load_optim_state(path, pyro.optim.Adam({"lr": 1e-2}), net, None if guide == "hand" else guide_)
    d = load_uci("yacht", split=0)
    pyro.set_rng_seed(1)
    f = bnnpyro.sample_predictive(model, guide_, d.x_test, 200)["f"]
    with torch.no_grad():
        rmse = evaluate_regression(*net.mean_and_scale(f), d.y_test, y_scale=d.y_scale)["rmse"]
    assert rmse == pytest.approx(printed, rel=0.05)


def test_threads_apply_during_the_run_and_are_restored(monkeypatch, capsys):
    import torch

    import bnnpyro.__main__ as cli

    seen = []
    monkeypatch.setattr(cli, "_run", lambda parser, args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert main(["--threads", "3"]) == 0 and seen == [3]
    assert torch.get_num_threads() == before


def test_help_documents_the_options():
    out = subprocess.run([sys.executable, "-m", "bnnpyro", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in ("--data", "--split", "--model", "--guide", "--epochs", "--seed", "--device", "--threads", "--plot",
                   "--save", "--jit"):
        assert option in out
    assert "interval coverage" in out and "(at --level)" in out and "%%" not in out


@pytest.mark.parametrize("args, message", [
    (["--data", "no-such-set"], "UCI data set 'no-such-set' not found"),
    (["--split", "30"], "split must be in 0..19"),
    (["--device", "gpu0"], "Invalid device string"),
    (["--epochs", "0"], "argument --epochs: must be positive, got 0"),
    (["--level", "1.5"], r"argument --level: must be in \(0, 1\), got 1.5"),
    (["--lr", "abc"], "argument --lr: expected a float, got 'abc'"),
    (["--hidden", "50", "0"], "argument --hidden: must be positive, got 0"),
    (["--threads", "0"], "argument --threads: must be positive, got 0"),
    (["--seed", "-1"], r"argument --seed: must be in \[0, 2\*\*32\), got -1"),  # numpy's seed range
    (["--seed", str(2**32)], r"argument --seed: must be in \[0, 2\*\*32\)"),
    (["--data", "yacht", "--plot", "no/such/folder/p.png"], "--plot: folder 'no/such/folder' does not exist"),
    (["--data", "yacht", "--save", "no/such/folder/m.pt"], "--save: folder 'no/such/folder' does not exist"),
    (["--data", "yacht", "--save", "."], "--save: '.' is a folder: give a file name"),
])
def test_bad_arguments_exit_with_a_usage_error(args, message, capsys):
    """A bad option ends with argparse's usage error (exit status 2) naming it, not a traceback."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
