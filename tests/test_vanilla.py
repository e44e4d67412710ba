"""Vanilla dropout: the torch module, training with it, and serving what it trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from service.cli import main
from service.core.engine import MLPEngine, dropout_noise
from service.core.model import VanillaDropout, build_sequential
from service.core.repository import load_model
from service.offline.datasets import UCIDataset
from service.offline.options import TrainOptions
from service.offline.training import train_uci_regression
from tests import test_training
from tests.helpers import tiny_regression_config

uci_folder = test_training.uci_folder  # the same 300-row toy data set in the UCI format


def test_vanilla_dropout_masks_like_f_dropout_without_scaling() -> None:
    x = torch.randn(64, 32)
    layer = VanillaDropout(0.3).train()
    with torch.random.fork_rng():
        torch.manual_seed(4)
        got = layer(x)
    expected = x * dropout_noise(tuple(x.shape), 0.3, torch.Generator().manual_seed(4), "vanilla")
    assert torch.equal(got, expected)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        inverted = torch.nn.functional.dropout(x, 0.3, training=True)
    torch.testing.assert_close(got, inverted * 0.7)  # the same mask, without 1/(1-p)


def test_vanilla_dropout_eval_multiplies_by_keep_probability() -> None:
    x = torch.randn(10, 4)
    layer = VanillaDropout(0.25).eval()
    state = torch.random.get_rng_state()
    assert torch.equal(layer(x), x * 0.75)
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match="dropout probability"):
        VanillaDropout(1.0)


def test_build_sequential_picks_the_scaling_of_the_config() -> None:
    vanilla = build_sequential(tiny_regression_config(dropout_scaling="vanilla"))
    inverted = build_sequential(tiny_regression_config())
    assert sum(isinstance(m, VanillaDropout) for m in vanilla) == 2
    assert not any(isinstance(m, torch.nn.Dropout) for m in vanilla)
    assert sum(isinstance(m, torch.nn.Dropout) for m in inverted) == 2


def test_training_with_vanilla_scaling_serves_with_x_1_minus_p(
    uci_folder: Path, tmp_path: Path
) -> None:
    opts = TrainOptions(
        hidden=(32,),
        dropout=0.3,
        input_dropout=False,
        epochs=30,
        mc_samples=200,
        progress=False,
        scaling="vanilla",
    )
    report = train_uci_regression(UCIDataset.load(uci_folder), 0, tmp_path / "toy", opts)
    model = load_model(tmp_path / "toy")
    assert model.config.dropout_scaling == "vanilla"
    assert "--scaling vanilla" in (tmp_path / "toy" / "README.md").read_text()
    assert report.metrics["test_rmse_eval"] < 1.0  # it learnt: y's std is about 2.2
    # Served with x (1-p), eval sits on the MC mean of the unscaled masks it was trained
    # with; the same weights served with the identity (torch's rule) are far from it.
    x = torch.as_tensor(UCIDataset.load(uci_folder).split(0).x_test, dtype=torch.float32)
    mc_mean = model.engine.predict_mc(x, 4000, seed=0).mean.float()
    inverted = model.config.model_copy(update={"dropout_scaling": "inverted"})
    wrong = MLPEngine(inverted, load_file(model.path / model.config.weights_file))
    right_error = float((model.engine.predict(x) - mc_mean).abs().mean())
    wrong_error = float((wrong.predict(x) - mc_mean).abs().mean())
    assert right_error < 0.2 * wrong_error, (right_error, wrong_error)


def test_cli_train_takes_scaling(uci_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli" / "toy"
    argv = ["train", str(uci_folder), "--out", str(out), "--epochs", "1", "--hidden", "4"]
    assert main([*argv, "--mc-samples", "10", "--quiet", "--scaling", "vanilla"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dropout_scaling"] == "vanilla"
    assert config["training"]["options"]["scaling"] == "vanilla"
