"""Training from a CSV file: a header row, numeric feature columns, one target column.

The same recipe as the UCI path: inputs standardised with training statistics; for
regression the target too, ``noise_variance`` estimated on a held-out 20% of the training
rows and the model refitted on all of them; for classification cross-entropy on the target's
classes (its distinct values, sorted). A seeded share of the rows (``test_fraction``) is held
out for the metrics of the card.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from service.core.engine import MLPEngine
from service.core.model import ModelConfig
from service.offline.evaluation import accuracy, expected_calibration_error, negative_log_likelihood
from service.offline.options import TrainOptions
from service.offline.training import (
    TrainReport,
    classification_uncertainty_metrics,
    fit_classifier,
    fit_regression,
    publish,
    regression_config,
    score_regression,
    standardise,
    standardization,
)

Task = Literal["regression", "classification"]
MIN_ROWS = 10


class DataError(ValueError):
    """A CSV file that cannot be trained on; the message is one line, naming the cell."""


@dataclass(frozen=True)
class Table:
    features: list[str]
    x: np.ndarray  # (N, D) float64
    y: np.ndarray  # (N,) float64 targets, or int64 class indices
    labels: list[str] | None  # the classes, for classification


def read_csv(
    path: Path,
    target: str,
    task: Task,
    features: list[str] | None = None,
    *,
    min_classes: int = 2,
) -> Table:
    """The feature columns and the target of ``path``, checked cell by cell (at least
    ``min_classes`` classes for classification: training needs two, held-out rows one)."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise DataError(f"{path}: no header row")
    header = [name.strip() for name in rows[0]]
    body = [row for row in rows[1:] if any(cell.strip() for cell in row)]
    if target not in header:
        raise DataError(f"{path}: no column {target!r}; columns: {', '.join(header)}")
    chosen = features or [name for name in header if name != target]
    missing = [name for name in chosen if name not in header]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; columns: {', '.join(header)}")
    if not chosen:
        raise DataError(f"{path}: no feature column besides the target {target!r}")
    if len(body) < MIN_ROWS:
        raise DataError(f"{path}: {len(body)} data rows; training needs at least {MIN_ROWS}")
    index = {name: i for i, name in enumerate(header)}
    x = np.empty((len(body), len(chosen)))
    raw_target: list[str] = []
    for r, row in enumerate(body, start=2):  # line numbers as an editor shows them
        if len(row) != len(header):
            raise DataError(f"{path}: line {r} has {len(row)} cells; the header has {len(header)}")
        for c, name in enumerate(chosen):
            x[r - 2, c] = _number(row[index[name]], path, r, name)
        raw_target.append(row[index[target]].strip())
    if task == "classification":
        labels = sorted(set(raw_target))
        if len(labels) < min_classes:
            raise DataError(f"{path}: column {target!r} holds one class; classification needs two")
        lookup = {label: i for i, label in enumerate(labels)}
        y = np.array([lookup[v] for v in raw_target], dtype=np.int64)
        return Table(chosen, x, y, labels)
    y = np.array([_number(v, path, r, target) for r, v in enumerate(raw_target, start=2)])
    return Table(chosen, x, y, None)


def _number(cell: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise DataError(
            f"{path}: line {line}, column {column!r}: {cell.strip()[:40]!r} is not a number"
        ) from None
    if not np.isfinite(value):
        raise DataError(f"{path}: line {line}, column {column!r}: {cell.strip()} is not finite")
    return value


def train_csv(
    path: Path,
    out: Path,
    opts: TrainOptions,
    *,
    target: str,
    task: Task = "regression",
    features: list[str] | None = None,
    version: str = "1",
    test_fraction: float = 0.2,
) -> TrainReport:
    """Train on ``path``'s rows, score the held-out ones, and write ``out``."""
    start = time.perf_counter()
    table = read_csv(path, target, task, features)
    order = np.random.default_rng(opts.seed).permutation(len(table.x))
    n_test = max(1, round(test_fraction * len(order)))
    test, train = order[:n_test], order[n_test:]
    x_train, x_test = table.x[train], table.x[test]
    # The columns name the inputs; the first held-out row is an example to start from.
    described = {"feature_names": list(table.features), "example": x_test[0].tolist()}
    if task == "regression":
        config = regression_config(out.name, version, x_train.shape[1], opts)
        config = config.model_copy(update=described)
        y_train, y_test = table.y[train, None], table.y[test, None]
        config, tensors = fit_regression(config, x_train, y_train, opts)
        metrics = score_regression(config, tensors, x_test, y_test, opts)
    else:
        assert table.labels is not None
        config = _classifier_config(out.name, version, x_train.shape[1], table.labels, opts)
        config = config.model_copy(update=described)
        config, tensors = _fit_classifier(config, x_train, table.y[train], opts)
        metrics = classification_metrics(MLPEngine(config, tensors), x_test, table.y[test], opts)
    return publish(
        out,
        config,
        tensors,
        metrics,
        opts,
        start,
        csv_card,
        dataset=str(path),
        target=target,
        features=table.features,
        n_train=len(train),
        n_test=len(test),
    )


def _classifier_config(
    name: str, version: str, input_dim: int, labels: list[str], opts: TrainOptions
) -> ModelConfig:
    return ModelConfig(
        name=name,
        version=version,
        task="classification",
        input_dim=input_dim,
        hidden=list(opts.hidden),
        output_dim=len(labels),
        activation=opts.activation,
        dropout=[opts.dropout] * len(opts.hidden),
        input_dropout=opts.dropout if opts.input_dropout else 0.0,
        dropout_scaling=opts.scaling,
        labels=labels,
        sha256="0" * 64,
    )


def _fit_classifier(
    config: ModelConfig, x: np.ndarray, y: np.ndarray, opts: TrainOptions
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Inputs standardised with the training rows' statistics; class indices as they are;
    calibrated on a held-out 20% of the rows."""
    sx = standardization(x)
    config = config.model_copy(update={"input_standardization": sx})
    return fit_classifier(config, x, standardise(sx, x), y, opts)


def classification_metrics(
    engine: MLPEngine, x: np.ndarray, y: np.ndarray, opts: TrainOptions
) -> dict[str, float]:
    """Eval against MC on held-out rows: accuracy, NLL, 15-bin ECE, mean mutual information."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    eval_probs = engine.predict(xt).double().numpy()
    mc = engine.predict_mc(xt, opts.mc_samples, opts.seed)
    assert mc.mutual_information is not None
    mc_probs = mc.mean.numpy()
    metrics = {
        "test_accuracy_eval": accuracy(eval_probs, y),
        "test_accuracy_mc": accuracy(mc_probs, y),
        "test_nll_eval": negative_log_likelihood(eval_probs, y),
        "test_nll_mc": negative_log_likelihood(mc_probs, y),
        "test_ece15_eval": expected_calibration_error(eval_probs, y, 15),
        "test_ece15_mc": expected_calibration_error(mc_probs, y, 15),
        "test_mean_mutual_information": float(mc.mutual_information.numpy().mean()),
    }
    return {
        **{k: round(v, 4) for k, v in metrics.items()},
        **classification_uncertainty_metrics(engine.config, mc, y),
        "mc_samples": opts.mc_samples,
    }


def csv_card(config: ModelConfig, opts: TrainOptions) -> str:
    t, m = config.training, config.metrics
    rows = "\n".join(f"| {k} | {v} |" for k, v in m.items())
    what = (
        f"classification into {config.labels}"
        if config.task == "classification"
        else "regression; `noise_variance` and the calibration from a held-out 20% of the "
        "training rows"
    )
    return f"""# {config.name} (version {config.version})

Trained by `dropout-service train {t["dataset"]} --target {t["target"]}` on {t["n_train"]}
rows; {t["n_test"]} rows held out for the metrics below.

## Data

`{t["dataset"]}`: features {", ".join(t["features"])}; target `{t["target"]}`.

## Model and training

- {config.input_dim} -> {" -> ".join(str(h) for h in config.hidden)} -> {config.output_dim},
  {config.activation}, dropout p = {opts.dropout}; {what}.
- Inputs standardised with training statistics (stored in `config.json`).
- Adam, lr {opts.lr}, weight decay {opts.weight_decay}, batch {opts.batch_size},
  {opts.epochs} epochs, seed {opts.seed}; {t["seconds"]} s.

## Held-out metrics (MC with T = {opts.mc_samples})

| metric | value |
|---|---|
{rows}

## Intended use

Whatever the data supports: the service knows no more about it than this card.
"""
