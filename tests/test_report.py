"""`dropout-service report` on small models: every figure written, readable, and on the page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.cli import main
from service.offline.options import ReportOptions
from service.offline.report import fig_uncertainty_1d
from tests.helpers import (
    deep_regression_config,
    random_tensors,
    tiny_regression_config,
    write_model,
)

FIGURES = [
    "fig1_train_mode_spread.png",
    "fig2_mc_convergence.png",
    "fig3_latency.png",
    "fig4_uncertainty_1d.png",
    "fig5_inverted_vs_vanilla.png",
]
QUICK = ["--repeats", "60", "--max-samples", "300", "--latency-repeats", "3", "--toy-epochs", "5"]


def run_report(models: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert (
        main(["report", "--model", "deep", "--models", str(models), "--out", str(out), *QUICK]) == 0
    )
    assert "5 figures" in capsys.readouterr().out
    numbers: dict[str, Any] = json.loads((out / "report.json").read_text())
    return numbers


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    deep = deep_regression_config()
    write_model(root, deep, random_tensors(deep, seed=1))
    return root


def test_report_writes_five_valid_figures_on_one_page(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    report = run_report(models, out, capsys)
    page = (out / "report.md").read_text()
    for name in FIGURES:
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(out / name) as image:
            image.verify()
            assert image.size[0] >= 600
        assert f"]({name})" in page
    assert [f["file"] for f in report["figures"]] == FIGURES
    for f in report["figures"]:
        assert f["caption"] in page
    n = report["numbers"]
    assert n["train_mode_spread"]["eval_distinct_values"] == 1
    assert n["train_mode_spread"]["train_distinct_values"] > 10
    assert n["mc_convergence"]["n_samples"][-1] == 300
    assert n["latency"]["mc_ms"][-1] > 0
    assert n["uncertainty_1d"]["model"].startswith("a 1 -> 64")
    v = n["inverted_vs_vanilla"]
    mismatch = v["activation_mismatch"]
    assert mismatch["vanilla, identity at eval"] > 5 * mismatch["vanilla"]
    assert "dropout-service report --model deep" in page


def test_figure_4_uses_the_shipped_1d_model_when_there_is_one(models: Path, tmp_path: Path) -> None:
    gap = tiny_regression_config(
        name="sine-gap",
        input_dim=1,
        hidden=[8],
        dropout=[0.2],
        training={"intervals": [[-4, -1.5], [1.5, 4]]},
    )
    write_model(models, gap, random_tensors(gap, seed=3))
    figure, numbers = fig_uncertainty_1d(models, ReportOptions(max_samples=200), tmp_path)
    assert numbers["model"] == "models/sine-gap (version 3)"
    assert numbers["n_samples"] == 200
    assert numbers["std_in_gap"] > 0
    assert (tmp_path / figure.file).is_file()


def test_unknown_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["report", "--model", "nope", "--models", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "nope" in capsys.readouterr().err


def test_missing_matplotlib_is_a_clear_error(
    models: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("service.cli.find_spec", lambda name: None)
    argv = ["report", "--model", "deep", "--models", str(models), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert ".[report]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
