"""`dropout-service train data.csv --target COLUMN`: regression and classification from a CSV
file through the UCI path's recipe, and one-line errors for files it cannot train on."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from service.cli import main
from service.core.repository import load_model

QUICK = ["--hidden", "16", "--epochs", "5", "--mc-samples", "50", "--quiet"]


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def regression_rows(n: int, seed: int = 0) -> list[list[object]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = 3 * x[:, 0] - x[:, 2] + 0.1 * rng.normal(size=n) + 10
    return [[*row, target] for row, target in zip(x.tolist(), y.tolist(), strict=True)]


def test_regression_from_a_csv_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_csv(tmp_path / "houses.csv", ["a", "b", "c", "price"], regression_rows(200))
    out = tmp_path / "models" / "houses"
    assert main(["train", str(data), "--target", "price", "--out", str(out), *QUICK]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model = load_model(out)
    config = model.config
    assert (config.task, config.input_dim, config.output_dim) == ("regression", 3, 1)
    assert config.noise_variance is not None  # estimated on held-out rows, as the UCI path
    assert config.training["target"] == "price"
    assert config.training["features"] == ["a", "b", "c"]
    assert (config.training["n_train"], config.training["n_test"]) == (160, 40)
    assert "test_rmse_mc" in config.metrics
    card = (out / "README.md").read_text()
    assert "--target price" in card
    assert "| test_rmse_mc |" in card
    y = model.engine.predict(torch.tensor([[1.0, 0.0, 0.0]]))
    assert 5 < float(y) < 20  # about 13, after five epochs


def test_classification_from_a_csv_file_with_named_classes_and_chosen_features(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 2))
    kinds = np.where(x[:, 0] + x[:, 1] > 0, "spam", "ham")
    rows = [[a, b, "ignored", k] for (a, b), k in zip(x.tolist(), kinds, strict=True)]
    data = write_csv(tmp_path / "mail.csv", ["x1", "x2", "note", "kind"], rows)
    out = tmp_path / "models" / "mail"
    argv = ["train", str(data), "--target", "kind", "--task", "classification"]
    longer = ["--epochs", "60", "--lr", "0.01"]  # the last of a repeated flag counts
    assert main([*argv, "--features", "x1,x2", "--out", str(out), *QUICK, *longer]) == 0
    config = load_model(out).config
    assert config.task == "classification"
    assert config.labels == ["ham", "spam"]
    assert config.input_dim == 2
    assert config.metrics["test_accuracy_mc"] > 0.8  # a linear boundary; chance is 0.5


@pytest.mark.parametrize(
    ("header", "rows", "argv", "says"),
    [
        (
            ["a", "y"],
            regression_rows(20),
            ["--target", "price"],
            "no column 'price'; columns: a, y",
        ),
        (["a", "y"], [[1, 2]] * 20, ["--target", "y", "--features", "a,z"], "no column 'z'"),
        (["a", "y"], [[1, 2]] * 5, ["--target", "y"], "5 data rows; training needs at least 10"),
        (["a", "y"], [[1, 2]] * 11 + [["n/a", 3]], ["--target", "y"], "line 13, column 'a'"),
        (["a", "y"], [[1, 2]] * 11 + [[1]], ["--target", "y"], "line 13 has 1 cells"),
        (["a", "y"], [[1, "x"]] * 12, ["--target", "y"], "'x' is not a number"),
        (["a", "y"], [[1, "x"]] * 12, ["--target", "y", "--task", "classification"], "one class"),
        (["y"], [[1]] * 12, ["--target", "y"], "no feature column"),
        (["a", "y"], [[1, 2]] * 12, [], "a CSV file needs --target COLUMN"),
        (["a", "y"], [[float("nan"), 2]] * 12, ["--target", "y"], "nan is not finite"),
    ],
)
def test_a_csv_file_it_cannot_train_on_gets_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    header: list[str],
    rows: list[list[object]],
    argv: list[str],
    says: str,
) -> None:
    data = write_csv(tmp_path / "data.csv", header, rows)
    out = tmp_path / "models" / "data"
    assert main(["train", str(data), *argv, "--out", str(out), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    assert says in err
    assert "\n" not in err
    assert not out.exists()


def test_csv_flags_are_refused_for_a_uci_data_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "concrete", "--target", "y", *QUICK]) == 2
    assert "are for a CSV file" in capsys.readouterr().err
