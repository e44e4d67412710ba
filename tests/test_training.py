"""Training writes a servable, reproducible model folder; the CLI drives it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.core.repository import load_model
from service.offline.datasets import UCIDataset
from service.offline.options import TrainOptions
from service.offline.training import train_uci_regression
from tests.helpers import write_uci_folder

QUICK = TrainOptions(hidden=(16,), epochs=3, batch_size=32, mc_samples=50, progress=False)


@pytest.fixture
def uci_folder(tmp_path: Path) -> Path:
    """A 300-row data set in the UCI format: y = x0 - 2 x1 + noise, two published splits."""
    return write_uci_folder(tmp_path / "toy", rows=300, train_rows=250, splits=2, noise=0.1, seed=0)


def test_train_writes_a_servable_model(uci_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "toy"
    report = train_uci_regression(UCIDataset.load(uci_folder), 1, out, QUICK)
    model = load_model(out)
    config = model.config
    assert config.task == "regression"
    assert config.input_dim == 3
    assert config.noise_variance is not None
    assert config.noise_variance[0] > 0
    assert config.training["split"] == 1
    assert config.training["n_train"] == 250
    assert config.metrics == report.metrics
    for key in ("test_rmse_eval", "test_rmse_mc", "test_log_likelihood_mc", "test_coverage_95"):
        assert np.isfinite(config.metrics[key])
    card = (out / "README.md").read_text()
    assert str(config.metrics["test_rmse_mc"]) in card


def test_training_is_reproducible(uci_folder: Path, tmp_path: Path) -> None:
    data = UCIDataset.load(uci_folder)
    a = train_uci_regression(data, 0, tmp_path / "a" / "toy", QUICK)
    b = train_uci_regression(data, 0, tmp_path / "b" / "toy", QUICK)
    assert a.config.sha256 == b.config.sha256
    assert a.metrics == b.metrics


def test_more_epochs_fit_better(uci_folder: Path, tmp_path: Path) -> None:
    data = UCIDataset.load(uci_folder)
    short = train_uci_regression(data, 0, tmp_path / "s" / "toy", QUICK)
    longer = QUICK.__class__(**{**QUICK.__dict__, "epochs": 60})
    long = train_uci_regression(data, 0, tmp_path / "l" / "toy", longer)
    assert long.metrics["test_rmse_eval"] < short.metrics["test_rmse_eval"]
    assert long.metrics["test_rmse_eval"] < 0.5  # the noise std is 0.1, y's std is about 2.2


def test_cli_train(uci_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli" / "toy"
    argv = [
        "train",
        str(uci_folder),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--hidden",
        "8",
        "--mc-samples",
        "20",
        "--quiet",
    ]
    assert main(argv) == 0
    assert "test_rmse_mc" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["hidden"] == [8]
    assert config["training"]["options"]["epochs"] == 2


def test_unknown_dataset_names_the_shipped_ones() -> None:
    with pytest.raises(FileNotFoundError, match="concrete"):
        UCIDataset.load("no-such-data")


def test_shipped_concrete_data_matches_the_published_split() -> None:
    data = UCIDataset.load("concrete")
    assert data.x.shape == (1030, 8)
    split = data.split(0)
    assert len(split.x_train) + len(split.x_test) == 1030
    assert data.n_splits() == 20
