"""Every tutorial notebook runs top to bottom (with ``BNNPYRO_SMALL=1``) and prints its metrics."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"

# notebook -> names that the final cell's output must contain
EXPECTED = {
    "01_hidden_layer.ipynb": ["test RMSE", "test log-likelihood", "95% coverage"],
    "02_regression_uncertainty.ipynb": ["coverage", "RMSE", "LL", "hand", "AnalyticAutoNormal", "AutoLowRankMVN"],
    "03_classification_calibration.ipynb": ["accuracy", "nll", "ece", "mi_in", "mi_ood", "auroc_entropy", "auroc_mi"],
    "04_bayesian_lstm.ipynb": ["accuracy", "ece", "mi_in", "auroc_mi", "val_perplexity"],
    "05_to_bayesian.ipynb": ["deterministic", "bayesian", "accuracy", "nll", "ece", "auroc_mi", "grad_var"],
}


def _notebooks():
    return sorted(p.name for p in TUTORIALS.glob("*.ipynb"))


def test_every_notebook_has_expectations():
    assert _notebooks(), "no tutorials found"
    assert set(_notebooks()) <= set(EXPECTED), set(_notebooks()) - set(EXPECTED)


def _stream_text(cell) -> str:
    return "".join(
        out.get("text", "") if out.get("output_type") == "stream" else "".join(out.get("data", {}).get("text/plain", ""))
        for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("name", _notebooks())
def test_tutorial_runs(name, monkeypatch):
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    # committed with outputs cleared
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{name}: outputs not cleared"
    # the kernel inherits the environment of this process
    monkeypatch.setenv("BNNPYRO_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(TUTORIALS)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code_cells:
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert "small run" in _stream_text(code_cells[0])
    final = _stream_text(code_cells[-1])
    for metric in EXPECTED[name]:
        assert metric in final, f"{name}: final cell does not print {metric!r}:\n{final}"
