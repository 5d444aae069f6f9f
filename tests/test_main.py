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


def test_help_documents_the_options():
    out = subprocess.run([sys.executable, "-m", "bnnpyro", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in ("--data", "--split", "--model", "--guide", "--epochs", "--seed", "--device", "--plot", "--jit"):
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
    (["--seed", "-1"], r"argument --seed: must be in \[0, 2\*\*32\), got -1"),  # numpy's seed range
    (["--seed", str(2**32)], r"argument --seed: must be in \[0, 2\*\*32\)"),
    (["--data", "yacht", "--plot", "no/such/folder/p.png"], "--plot: folder 'no/such/folder' does not exist"),
])
def test_bad_arguments_exit_with_a_usage_error(args, message, capsys):
    """A bad option ends with argparse's usage error (exit status 2) naming it, not a traceback."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
