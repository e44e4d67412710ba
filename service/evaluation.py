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


def gaussian_log_likelihood(y: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> float:
    """Mean log density of ``y`` under N(mean, variance), elementwise."""
    return float(np.mean(-0.5 * (np.log(2 * math.pi * variance) + (y - mean) ** 2 / variance)))


def interval_coverage(
    y: np.ndarray, mean: np.ndarray, variance: np.ndarray, level: float = 0.95
) -> float:
    """Fraction of ``y`` inside the central ``level`` Gaussian interval mean +- z sd."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return float(np.mean(np.abs(y - mean) <= z * np.sqrt(variance)))
