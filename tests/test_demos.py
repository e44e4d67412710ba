"""The demo trainers (digits, sine-gap) write servable, reproducible models with their evidence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.core.repository import load_model
from service.offline.demos import (
    SINE_INTERVALS,
    ood_images,
    sine_gap_data,
    train_digits,
    train_sine_gap,
)
from service.offline.options import TrainOptions
from tests.helpers import write_uci_folder

QUICK = TrainOptions(
    hidden=(32,), dropout=0.2, input_dropout=False, epochs=4, mc_samples=50, progress=False
)


def test_sine_gap_data_leaves_the_gap_empty() -> None:
    x, y = sine_gap_data(0)
    (a, b), (c, d) = SINE_INTERVALS
    inside = ((x >= a) & (x <= b)) | ((x >= c) & (x <= d))
    assert inside.all()
    assert (x < 0).any()
    assert (x > 0).any()
    assert np.std(y - np.sin(x)) == pytest.approx(0.1, abs=0.02)


def test_ood_images_keep_the_pixel_range() -> None:
    x = np.arange(2 * 64, dtype=float).reshape(2, 64) % 17
    ood = ood_images(x, 0)
    assert sorted(ood["shuffled_pixels"][0]) == sorted(x[0])
    assert not np.array_equal(ood["shuffled_pixels"], x)
    assert ood["uniform_noise"].min() >= 0
    assert ood["uniform_noise"].max() <= 16


def test_train_sine_gap_writes_its_ratios(tmp_path: Path) -> None:
    out = tmp_path / "sine-gap"
    report = train_sine_gap(out, QUICK)
    config = load_model(out).config
    assert config.metrics == report.metrics
    for key in ("std_ratio_gap", "std_ratio_outside", "std_ratio_off_data", "test_coverage_95"):
        assert np.isfinite(config.metrics[key]), key
    card = (out / "README.md").read_text()
    assert f"**{config.metrics['std_ratio_off_data']}**" in card
    assert "--epochs 4" in card  # the reproduce command names what differs from the defaults


def test_train_digits_scores_eval_and_mc(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    report = train_digits(out, QUICK)
    config = load_model(out).config
    assert config.task == "classification"
    assert config.output_dim == 10
    m = report.metrics
    assert m["test_accuracy_eval"] > 0.5  # 4 short epochs; chance is 0.1
    for key in ("test_nll_mc", "test_ece15_mc", "ood_uniform_noise_auroc_mutual_information"):
        assert np.isfinite(m[key]), key
    assert "| accuracy |" in (out / "README.md").read_text()


def test_cli_train_sine_gap_is_reproducible(tmp_path: Path) -> None:
    argv = ["train-sine-gap", "--hidden", "16", "--epochs", "3", "--mc-samples", "20", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "a" / "sine-gap")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b" / "sine-gap")]) == 0
    a, b = (json.loads((tmp_path / d / "sine-gap" / "config.json").read_text()) for d in "ab")
    assert a["sha256"] == b["sha256"]
    assert a["metrics"] == b["metrics"]


@pytest.mark.parametrize("command", ["train-digits", "train-sine-gap", "train"])
def test_every_training_flag_reaches_the_model(tmp_path: Path, command: str) -> None:
    """No flag is accepted and ignored: each shows in the written config."""
    out = tmp_path / "model"
    data = []
    if command == "train":
        data = [str(write_uci_folder(tmp_path / "uci", rows=60, train_rows=50, splits=1,
                                     noise=0.1, seed=0)), "--no-input-dropout"]  # fmt: skip
    flags = ["--hidden", "16", "8", "--dropout", "0.3", "--scaling", "vanilla", "--version", "7"]
    flags += ["--epochs", "2", "--mc-samples", "20", "--seed", "5", "--batch-size", "16"]
    flags += ["--lr", "0.002", "--weight-decay", "0.0001", "--quiet", "--out", str(out)]
    assert main([command, *data, *flags]) == 0
    config = load_model(out).config
    assert config.hidden == [16, 8]
    assert config.dropout == [0.3, 0.3]
    assert config.input_dropout == 0.0
    assert config.dropout_scaling == "vanilla"
    assert config.version == "7"
    options = config.training["options"]
    assert (options["epochs"], options["mc_samples"], options["seed"]) == (2, 20, 5)
    assert (options["batch_size"], options["lr"], options["weight_decay"]) == (16, 0.002, 0.0001)
