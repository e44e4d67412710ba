"""Held-out metrics of predictions and of their uncertainty (numpy only: no HTTP, no torch)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def rmse(y: np.ndarray, prediction: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - prediction) ** 2)))


def mc_log_likelihood(y: np.ndarray, samples: np.ndarray, tau: float) -> float:
    """Mean test log-likelihood under MC dropout (Gal & Ghahramani 2016, eq. 8).

    ``y`` is ``(N,)``, ``samples`` ``(T, N)``, both in target units; ``tau`` the precision.
    Per point: logsumexp_t(-tau/2 (y - y_t)^2) - log T - log(2 pi)/2 + log(tau)/2.
    """
    t = samples.shape[0]
    a = -0.5 * tau * (y[None, :] - samples) ** 2  # (T, N)
    amax = a.max(0)
    lse = amax + np.log(np.exp(a - amax).sum(0))
    ll = lse - math.log(t) - 0.5 * math.log(2 * math.pi) + 0.5 * math.log(tau)
    return float(ll.mean())


def fit_precision(y: np.ndarray, samples: np.ndarray) -> float:
    """The noise precision tau that maximises the MC log-likelihood (eq. 8) of ``y (N,)``
    under ``samples (T, N)``: a continuous fit where the paper picks from three values.

    The likelihood is searched over log tau, on a grid of steps of 0.25 from e^-2 to e^10
    times the moment-matched precision ``1 / mean((y - y_t)^2)``, then by golden section
    within one step of the best point.
    """
    sq = (y[None, :] - samples) ** 2
    t = samples.shape[0]

    def ll(log_tau: float) -> float:
        a = -0.5 * math.exp(log_tau) * sq
        amax = a.max(0)
        lse = amax + np.log(np.exp(a - amax).sum(0))
        return float(lse.mean()) - math.log(t) + 0.5 * log_tau

    centre = -math.log(max(float(sq.mean()), 1e-300))
    grid = centre + np.arange(-2.0, 10.0 + 1e-9, 0.25)
    best = float(max(grid, key=ll))
    low, high = best - 0.25, best + 0.25
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = ll(a), ll(b)
    for _ in range(30):  # the bracket shrinks to 0.5 * 0.618**30: 1e-7 in log tau
        if fa >= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = ll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = ll(b)
    return math.exp((low + high) / 2)


def interval_width(variance: np.ndarray, q: float) -> float:
    """Mean width ``2 q sqrt(variance)`` of the intervals ``mean +- q sd``."""
    return float(np.mean(2.0 * q * np.sqrt(variance)))


def gaussian_log_likelihood(y: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> float:
    """Mean log density of ``y`` under N(mean, variance), elementwise."""
    return float(np.mean(-0.5 * (np.log(2 * math.pi * variance) + (y - mean) ** 2 / variance)))


def interval_coverage(
    y: np.ndarray,
    mean: np.ndarray,
    variance: np.ndarray,
    level: float = 0.95,
    q: float | None = None,
) -> float:
    """Fraction of ``y`` inside the interval mean +- q sd: ``q`` the central ``level``
    Gaussian quantile unless given (a conformal one)."""
    if q is None:
        q = NormalDist().inv_cdf(0.5 + level / 2)
    return float(np.mean(np.abs(y - mean) <= q * np.sqrt(variance)))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose most probable class is the label; ``probs (N, C)``, ``labels (N,)``."""
    return float(np.mean(probs.argmax(1) == labels))


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean ``-log p(label)`` in nats; ``eps`` keeps a confident mistake finite."""
    p = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(p, eps))))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-class confidence (Guo et al. 2017): equal-width bins on (0, 1].

    Sum over bins of (rows in bin / N) * |accuracy in bin - mean confidence in bin|.
    """
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    # Bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 joins bin 0.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats over the last axis, with 0 log 0 = 0."""
    logs = np.log(np.where(probs > 0, probs, 1.0))
    h: np.ndarray = -(probs * logs).sum(-1)
    return h


def mutual_information(samples: np.ndarray) -> np.ndarray:
    """BALD per row from MC probabilities ``(T, N, C)``: H(mean_t p_t) - mean_t H(p_t)."""
    mi: np.ndarray = entropy(samples.mean(0)) - entropy(samples).mean(0)
    return mi


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of a score that should be higher on ``positive``.

    The Mann-Whitney form: the chance that a random positive outscores a random negative,
    ties counting one half.
    """
    diff = positive[:, None] - negative[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))
