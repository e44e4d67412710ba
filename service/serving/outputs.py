"""The named output tensors of an answer, shared by every front door.

v1 sends them as JSON lists, v2 as tensors; both take them from here, so the two APIs serve
the same bits for the same model, inputs, parameters and seed. What the model's calibration
adds (intervals, prediction sets, out-of-distribution scores) is computed here too, from
``core.calibration``.
"""

from __future__ import annotations

import math
import operator
from typing import Literal

import numpy as np
import torch

from service.core.calibration import (
    conformal_quantile,
    interval_quantile,
    max_coverage,
    ood_scores,
    prediction_set_mask,
    scale_probabilities,
)
from service.core.engine import MCResult
from service.core.errors import InvalidInput
from service.core.model import ModelConfig

#: The eval answer's one output (float32, ``(rows, output_dim)``).
OUTPUT = "output"

Method = Literal["conformal", "gaussian", "probability"]


#: MC answers of at most this many values per summary are computed in Python.
FEW_VALUES = 64


def mc_outputs(
    config: ModelConfig, result: MCResult, coverage: float | None = None
) -> dict[str, torch.Tensor]:
    """``mean``, ``variance``, ``std``, ``mc_standard_error`` and the task's extras, float64
    (``samples`` float32, flags bool); with ``coverage``, the interval or prediction sets.

    Computed with numpy on the host (a numpy call on these few values costs a fraction of a
    torch call, and both round every IEEE operation alike) and handed out as tensors; a few
    values without coverage or temperature are computed in Python (``_few_mc_outputs``)."""
    cal = config.calibration
    if (
        coverage is None
        and result.mean.numel() <= FEW_VALUES
        and (cal is None or cal.temperature is None or config.task == "regression")
    ):
        return _few_mc_outputs(config, result)
    return _mc_outputs(config, result, coverage)


def _few_mc_outputs(config: ModelConfig, result: MCResult) -> dict[str, torch.Tensor]:
    """``mc_outputs`` of a few values, in Python: the same bits (a square root, a division
    and an addition of doubles are correctly rounded in Python as in numpy), without
    numpy's calls, whose code is cold on a served request (a one-row MC T=100 request
    spent about a seventh of its time in them: docs/benchmarks.md, "Where a one-client
    request's time goes")."""
    variance = result.variance.tolist()
    n = max(result.n_samples, 1)
    std = [list(map(math.sqrt, row)) for row in variance]
    outputs = {
        "mean": result.mean,
        "variance": result.variance,
        "std": torch.tensor(std, dtype=torch.float64),
        "mc_standard_error": torch.tensor(
            [[math.sqrt(v / n) for v in row] for row in variance], dtype=torch.float64
        ),
    }
    if config.noise_variance is not None:
        noise = config.noise_variance
        predictive = [list(map(operator.add, row, noise)) for row in variance]
        outputs["predictive_variance"] = torch.tensor(predictive, dtype=torch.float64)
    if result.entropy is not None and result.mutual_information is not None:
        outputs["entropy"] = result.entropy
        outputs["mutual_information"] = result.mutual_information
    cal = config.calibration
    if cal is not None and cal.ood_reference is not None:
        if config.task == "regression":
            stat = std
        else:
            assert result.mutual_information is not None
            stat = [[v] for v in result.mutual_information.tolist()]
        reference = cal.ood_reference
        score = [max(map(operator.truediv, row, reference)) for row in stat]
        outputs["ood_score"] = torch.tensor(score, dtype=torch.float64)
        outputs["out_of_distribution"] = torch.tensor([v > 1.0 for v in score])
    if result.samples is not None:
        outputs["samples"] = result.samples
    return outputs


def _mc_outputs(
    config: ModelConfig, result: MCResult, coverage: float | None
) -> dict[str, torch.Tensor]:
    """``mc_outputs`` with numpy."""
    mean, variance = result.mean.numpy(), result.variance.numpy()
    std = np.sqrt(variance)
    outputs = {"mean": result.mean, "variance": result.variance, "std": torch.from_numpy(std)}
    outputs["mc_standard_error"] = torch.from_numpy(np.sqrt(variance / max(result.n_samples, 1)))
    predictive = variance
    if config.noise_variance is not None:
        predictive = variance + np.asarray(config.noise_variance, dtype=np.float64)
        outputs["predictive_variance"] = torch.from_numpy(predictive)
    if result.entropy is not None and result.mutual_information is not None:
        outputs["entropy"] = result.entropy
        outputs["mutual_information"] = result.mutual_information
    cal = config.calibration
    probs = mean
    if config.task == "classification" and cal is not None and cal.temperature is not None:
        probs = scale_probabilities(probs, cal.temperature)
        outputs["calibrated_probabilities"] = torch.from_numpy(probs)
    if coverage is not None:
        if config.task == "regression":
            half = interval_half_width(config, predictive, coverage)
            outputs["interval_lower"] = torch.from_numpy(mean - half)
            outputs["interval_upper"] = torch.from_numpy(mean + half)
        else:
            outputs["prediction_sets"] = torch.from_numpy(prediction_sets(config, probs, coverage))
    if cal is not None and cal.ood_reference is not None:
        stat = std if config.task == "regression" else result.mutual_information
        assert stat is not None
        score = ood_scores(np.asarray(stat), cal.ood_reference)
        outputs["ood_score"] = torch.from_numpy(score)
        outputs["out_of_distribution"] = torch.from_numpy(score > 1.0)
    if result.samples is not None:
        outputs["samples"] = result.samples
    return outputs


def coverage_method(config: ModelConfig) -> Method:
    """How ``coverage`` is met: conformal with a calibration, else the Gaussian interval
    (regression) or the most probable classes (classification)."""
    if config.calibration is not None:
        return "conformal"
    return "gaussian" if config.task == "regression" else "probability"


#: The coverages an interval or prediction set may be asked for.
COVERAGE_RANGE = (0.5, 0.999)


def check_coverage(config: ModelConfig, coverage: float) -> None:
    """Refuse a coverage outside ``COVERAGE_RANGE`` or beyond what the calibration's
    held-out rows can bound."""
    low, high = COVERAGE_RANGE
    if not low <= coverage <= high:
        raise InvalidInput(["coverage"], f"coverage must be in [{low}, {high}], got {coverage}")
    cal = config.calibration
    if cal is not None and conformal_quantile(cal.scores, coverage) is None:
        raise _too_few(config, coverage)


def interval_half_width(
    config: ModelConfig, predictive_variance: np.ndarray, coverage: float
) -> np.ndarray:
    """``q sqrt(predictive_variance)``: q the conformal quantile of the held-out scores, or
    the normal quantile without a calibration."""
    q = interval_quantile(config.calibration, coverage)
    if q is None:
        raise _too_few(config, coverage)
    return q * np.sqrt(predictive_variance)  # type: ignore[no-any-return]


def prediction_sets(config: ModelConfig, probs: np.ndarray, coverage: float) -> np.ndarray:
    """``(B, C)`` membership of each row's prediction set (``core.calibration``)."""
    member = prediction_set_mask(probs, coverage, config.calibration)
    if member is None:
        raise _too_few(config, coverage)
    return member


def _too_few(config: ModelConfig, coverage: float) -> InvalidInput:
    assert config.calibration is not None
    n = len(config.calibration.scores)
    return InvalidInput(
        ["coverage"],
        f"coverage {coverage:g} needs more than the {n} held-out rows model "
        f"{config.name!r} was calibrated on: ask for at most {max_coverage(n):.4g}",
    )


def mc_output_names(config: ModelConfig) -> list[str]:
    """The outputs an MC answer of this model holds without ``coverage`` (``samples`` only
    when asked for)."""
    names = ["mean", "variance", "std", "mc_standard_error"]
    if config.noise_variance is not None:
        names.append("predictive_variance")
    if config.task == "classification":
        names += ["entropy", "mutual_information"]
        if config.calibration is not None and config.calibration.temperature is not None:
            names.append("calibrated_probabilities")
    if config.calibration is not None and config.calibration.ood_reference is not None:
        names += ["ood_score", "out_of_distribution"]
    return names
