"""Calibration maths: what a model folder stores about its held-out rows, and how the service
turns it into intervals, prediction sets and out-of-distribution flags.

- Regression: split-conformal intervals on the normalised score
  ``|y - mean| / sqrt(predictive_variance)`` of held-out rows (Lei et al. 2018; the score
  normalised by the model's own predictive spread, so intervals widen where the model is
  unsure). For coverage ``c`` the quantile is the ``ceil((n + 1) c)``-th smallest of the
  ``n`` scores, which covers a new row with probability at least ``c`` when it is
  exchangeable with the held-out ones.
- Classification: temperature scaling of the MC mean probabilities, fitted by held-out
  negative log-likelihood (Guo et al. 2017), then conformal prediction sets on the score
  ``1 - p(y)`` of the scaled probabilities (Sadinle et al. 2019).
- Out of distribution: the epistemic statistic (the MC std of each output for regression,
  the mutual information for classification) against its 99th percentile on held-out
  in-distribution rows; a row whose statistic exceeds it is flagged (by construction about
  1% of in-distribution rows are).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]

#: The percentile of the held-out statistic that bounds in-distribution rows.
OOD_QUANTILE = 0.99


class Calibration(BaseModel):
    """What a model folder keeps of its held-out rows (``config.json``'s ``calibration``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scores: list[NonNegative] = Field(
        min_length=1, description="Sorted conformal scores of the held-out rows."
    )
    temperature: Positive | None = Field(
        None, description="Classification: the temperature of the MC mean probabilities."
    )
    ood_reference: list[Positive] | None = Field(
        None,
        description="The 99th percentile, on held-out rows, of the MC std of each output "
        "(regression) or of the mutual information (classification, one value).",
    )
    held_out_rows: int = Field(ge=1)
    fitted_on: str = Field(description="Where the held-out rows came from.")


def conformal_quantile(scores: list[float], coverage: float) -> float | None:
    """The split-conformal quantile of sorted ``scores`` at ``coverage``; None when the
    scores are too few for it (``ceil((n + 1) coverage) > n``: the interval is unbounded)."""
    n = len(scores)
    k = math.ceil((n + 1) * coverage)
    return None if k > n else scores[k - 1]


def max_coverage(n: int) -> float:
    """The largest coverage ``n`` scores bound: ``n / (n + 1)``."""
    return n / (n + 1)


def gaussian_z(coverage: float) -> float:
    """The two-sided normal quantile: ``mean +- z sd`` holds ``coverage`` of a normal."""
    return NormalDist().inv_cdf(0.5 + coverage / 2)


def interval_quantile(cal: Calibration | None, coverage: float) -> float | None:
    """``q`` of the interval ``mean +- q sqrt(predictive_variance)``: the conformal quantile
    of the held-out scores, or the normal quantile without a calibration; None when the
    scores are too few for ``coverage``."""
    return gaussian_z(coverage) if cal is None else conformal_quantile(cal.scores, coverage)


def prediction_set_mask(
    probs: np.ndarray, coverage: float, cal: Calibration | None
) -> np.ndarray | None:
    """``(B, C)`` membership at ``coverage``: conformal (the classes whose calibrated
    probability is at least one minus the held-out quantile of ``1 - p(label)``) or, without
    a calibration, the most probable classes until their probabilities add up to
    ``coverage``. None when the scores are too few for ``coverage``."""
    if cal is not None:
        q = conformal_quantile(cal.scores, coverage)
        if q is None:
            return None
        member: np.ndarray = probs >= 1.0 - q
        return member
    order = np.argsort(-probs, axis=-1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=-1)
    before = np.cumsum(ranked, axis=-1) - ranked  # mass of the classes ranked above
    keep = before < coverage
    member = np.zeros_like(keep)
    np.put_along_axis(member, order, keep, axis=-1)
    return member


def regression_scores(
    y: np.ndarray, mean: np.ndarray, predictive_variance: np.ndarray
) -> list[float]:
    """Sorted normalised scores ``|y - mean| / sqrt(predictive_variance)``, every output of
    every row (``(N, out)`` arrays)."""
    return sorted((np.abs(y - mean) / np.sqrt(predictive_variance)).reshape(-1).tolist())


def scale_probabilities(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / temperature)`` over the last axis."""
    logits = np.log(np.clip(probs, 1e-300, None)) / temperature
    logits -= logits.max(-1, keepdims=True)
    scaled: np.ndarray = np.exp(logits)
    scaled /= scaled.sum(-1, keepdims=True)
    return scaled


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` under the scaled
    ``probs`` (``(N, C)``): a log-spaced search, then a finer one around the best."""

    def nll(t: float) -> float:
        p = scale_probabilities(probs, t)[np.arange(len(labels)), labels]
        return float(-np.log(np.clip(p, 1e-300, None)).mean())

    grid = np.exp(np.linspace(math.log(0.05), math.log(20.0), 121))
    best = min(grid, key=nll)
    fine = np.exp(np.linspace(math.log(best) - 0.06, math.log(best) + 0.06, 61))
    return float(min(fine, key=nll))


def class_scores(probs: np.ndarray, labels: np.ndarray) -> list[float]:
    """Sorted conformal scores ``1 - p(label)`` of held-out rows."""
    return sorted((1.0 - probs[np.arange(len(labels)), labels]).tolist())


def ood_reference(statistic: np.ndarray) -> list[float]:
    """The held-out statistic's 99th percentile per column (``(N, k)``), kept above zero."""
    q = np.quantile(statistic.reshape(len(statistic), -1), OOD_QUANTILE, axis=0)
    return np.maximum(q, 1e-12).tolist()  # type: ignore[no-any-return]


def ood_scores(statistic: np.ndarray, reference: list[float]) -> np.ndarray:
    """Per row: the largest ratio of its statistic to the held-out reference (``> 1``: out
    of distribution). ``statistic`` is ``(B, k)`` or ``(B,)``."""
    ratio = statistic.reshape(len(statistic), -1) / np.asarray(reference)
    return ratio.max(1)  # type: ignore[no-any-return]
