"""Fitting a model's calibration on held-out rows (``core.calibration`` holds the maths the
service applies). Trainers call it on the rows they hold out; ``dropout-service calibrate``
calls it for a model trained elsewhere.

The held-out rows go through the serving engine's own MC path, so the scores are those of
the answers the service will give.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from service.core.calibration import (
    Calibration,
    class_scores,
    fit_temperature,
    ood_reference,
    regression_scores,
    scale_probabilities,
)
from service.core.engine import MCResult, MLPEngine
from service.core.repository import load_model, write_config

#: Fewer held-out rows than this cannot bound a 90% interval (``ceil((n + 1) 0.9) <= n``).
MIN_ROWS = 9


def predictive_variance(engine: MLPEngine, mc: MCResult) -> np.ndarray:
    """MC variance plus the model's noise variance, when it has one: what ``coverage``
    intervals are scaled by."""
    variance = mc.variance.numpy()
    noise = engine.config.noise_variance
    return variance + np.asarray(noise) if noise is not None else variance


def regression_calibration(
    engine: MLPEngine, mc: MCResult, y: np.ndarray, fitted_on: str
) -> Calibration:
    """Conformal scores of ``y (N, out)`` against the MC answer ``mc`` of those rows, and
    the 99th percentile of each output's MC std."""
    mean = mc.mean.numpy()
    return Calibration(
        scores=regression_scores(y, mean, predictive_variance(engine, mc)),
        ood_reference=ood_reference(mc.variance.sqrt().numpy()),
        held_out_rows=len(y),
        fitted_on=fitted_on,
    )


def classification_calibration(mc: MCResult, labels: np.ndarray, fitted_on: str) -> Calibration:
    """The temperature of the MC mean probabilities (held-out NLL), conformal scores of the
    scaled probabilities, and the 99th percentile of the mutual information."""
    assert mc.mutual_information is not None
    probs = mc.mean.numpy()
    temperature = fit_temperature(probs, labels)
    return Calibration(
        scores=class_scores(scale_probabilities(probs, temperature), labels),
        temperature=temperature,
        ood_reference=ood_reference(mc.mutual_information.numpy()[:, None]),
        held_out_rows=len(labels),
        fitted_on=fitted_on,
    )


def calibrate(
    engine: MLPEngine, x: np.ndarray, y: np.ndarray, n_samples: int, seed: int, fitted_on: str
) -> Calibration:
    """MC over the held-out rows ``x``, then the task's calibration against ``y`` (targets
    ``(N, out)`` or class indices ``(N,)``)."""
    mc = engine.predict_mc(torch.as_tensor(x, dtype=torch.float32), n_samples, seed)
    if engine.config.task == "classification":
        return classification_calibration(mc, y.astype(np.int64), fitted_on)
    return regression_calibration(engine, mc, y.reshape(len(y), -1), fitted_on)


def calibrate_folder(
    folder: Path, x: np.ndarray, y: np.ndarray, n_samples: int, seed: int, fitted_on: str
) -> Calibration:
    """Fit the calibration of the model in ``folder`` on held-out rows and store it in its
    ``config.json`` (the weights and their sha256 are untouched); a running service picks it
    up when the model is loaded again."""
    if len(x) < MIN_ROWS:
        raise ValueError(f"{len(x)} held-out rows; a calibration needs at least {MIN_ROWS}")
    model = load_model(folder)
    width = model.config.input_dim
    if x.shape[1] != width:
        raise ValueError(
            f"rows of {x.shape[1]} features; model {model.config.name!r} takes {width}"
        )
    calibration = calibrate(model.engine, x, y, n_samples, seed, fitted_on)
    write_config(folder, model.config.model_copy(update={"calibration": calibration}))
    return calibration
