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


# -- calibration: fitted by train, or afterwards by calibrate --------------------------


def test_trained_regression_carries_a_calibration_from_its_held_out_rows(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "houses.csv", ["a", "b", "c", "price"], regression_rows(200))
    out = tmp_path / "models" / "houses"
    assert main(["train", str(data), "--target", "price", "--out", str(out), *QUICK]) == 0
    config = load_model(out).config
    cal = config.calibration
    assert cal is not None
    assert cal.held_out_rows == 32  # 20% of the 160 training rows
    assert len(cal.scores) == 32
    assert cal.scores == sorted(cal.scores)
    assert cal.ood_reference is not None
    assert len(cal.ood_reference) == 1
    for key in ("conformal_coverage_90", "conformal_width_95", "test_ood_flagged"):
        assert key in config.metrics
    assert config.metrics["conformal_width_90"] < config.metrics["conformal_width_95"]
    assert "| conformal_coverage_95 |" in (out / "README.md").read_text()


def test_trained_classifier_carries_a_temperature_and_set_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 2))
    kinds = np.where(x[:, 0] + 0.3 * rng.normal(size=150) > 0, "spam", "ham")
    rows = [[a, b, k] for (a, b), k in zip(x.tolist(), kinds, strict=True)]
    data = write_csv(tmp_path / "mail.csv", ["x1", "x2", "kind"], rows)
    out = tmp_path / "models" / "mail"
    argv = ["train", str(data), "--target", "kind", "--task", "classification"]
    assert main([*argv, "--out", str(out), *QUICK, "--epochs", "30", "--lr", "0.01"]) == 0
    config = load_model(out).config
    assert config.calibration is not None
    assert config.calibration.temperature is not None
    for key in ("temperature", "test_ece15_mc_calibrated", "set_coverage_90", "set_size_90"):
        assert key in config.metrics
    assert 1.0 <= config.metrics["set_size_90"] <= 2.0


@pytest.fixture
def houses(tmp_path: Path) -> tuple[Path, Path]:
    """A regression model trained on one CSV file, and 300 fresh rows of the same data."""
    data = write_csv(tmp_path / "houses.csv", ["a", "b", "c", "price"], regression_rows(100))
    out = tmp_path / "models" / "houses"
    assert main(["train", str(data), "--target", "price", "--out", str(out), *QUICK]) == 0
    fresh = write_csv(tmp_path / "fresh.csv", ["a", "b", "c", "price"], regression_rows(300, 7))
    return out, fresh


def test_calibrate_fits_and_stores_a_calibration_without_touching_the_weights(
    houses: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, fresh = houses
    before = load_model(out).config
    capsys.readouterr()
    assert main(["calibrate", str(out), str(fresh), "--target", "price", "--mc-samples", "50"]) == 0
    printed = capsys.readouterr().out
    assert "conformal quantile at 0.95:" in printed
    after = load_model(out).config
    assert after.sha256 == before.sha256
    assert after.calibration is not None
    assert after.calibration.held_out_rows == 300
    assert after.calibration.fitted_on == f"{fresh}: 300 rows"
    assert after.calibration != before.calibration
    assert after.model_copy(update={"calibration": None}) == before.model_copy(
        update={"calibration": None}
    )


def test_calibrate_maps_class_names_onto_the_model_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 2))
    kinds = np.where(x[:, 0] > 0, "spam", "ham")
    rows = [[a, b, k] for (a, b), k in zip(x.tolist(), kinds, strict=True)]
    data = write_csv(tmp_path / "mail.csv", ["x1", "x2", "kind"], rows)
    out = tmp_path / "models" / "mail"
    argv = ["train", str(data), "--target", "kind", "--task", "classification"]
    assert main([*argv, "--out", str(out), *QUICK]) == 0
    only_spam = [r for r in rows if r[2] == "spam"][:20]  # one class present: still "spam" = 1
    held = write_csv(tmp_path / "held.csv", ["x1", "x2", "kind"], only_spam)
    assert main(["calibrate", str(out), str(held), "--target", "kind", "--mc-samples", "20"]) == 0
    cal = load_model(out).config.calibration
    assert cal is not None
    assert cal.held_out_rows == 20


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ([], "a CSV file needs --target COLUMN"),
        (["--target", "price", "--features", "a,b"], "rows of 2 features; model 'houses' takes 3"),
        (["--target", "nope"], "no column 'nope'"),
    ],
)
def test_calibrate_errors_are_one_line(
    houses: tuple[Path, Path], capsys: pytest.CaptureFixture[str], extra: list[str], says: str
) -> None:
    out, fresh = houses
    before = (out / "config.json").read_bytes()
    assert main(["calibrate", str(out), str(fresh), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    assert says in err
    assert "\n" not in err
    assert (out / "config.json").read_bytes() == before


def test_calibrate_refuses_unknown_classes_and_missing_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 2))
    rows = [[a, b, "ham" if a > 0 else "spam"] for a, b in x.tolist()]
    data = write_csv(tmp_path / "mail.csv", ["x1", "x2", "kind"], rows)
    out = tmp_path / "models" / "mail"
    argv = ["train", str(data), "--target", "kind", "--task", "classification"]
    assert main([*argv, "--out", str(out), *QUICK]) == 0
    odd = write_csv(tmp_path / "odd.csv", ["x1", "x2", "kind"], [[0.1, 0.2, "eggs"]] * 12)
    capsys.readouterr()
    assert main(["calibrate", str(out), str(odd), "--target", "kind"]) == 2
    assert "class 'eggs' is not one of ['ham', 'spam']" in capsys.readouterr().err
    assert main(["calibrate", str(out), "concrete"]) == 2
    assert "the UCI data sets are regression" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "nowhere"), str(odd), "--target", "kind"]) == 2
    assert "config.json" in capsys.readouterr().err
