"""Uncertainty metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.core.engine import entropy as engine_entropy
from service.offline.evaluation import (
    accuracy,
    auroc,
    entropy,
    expected_calibration_error,
    gaussian_log_likelihood,
    interval_coverage,
    mc_log_likelihood,
    mutual_information,
    negative_log_likelihood,
)


def test_negative_log_likelihood_by_hand() -> None:
    probs = np.array([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]])
    labels = np.array([0, 1, 1])
    expected = -(math.log(0.5) + math.log(0.75) + math.log(0.1)) / 3
    assert negative_log_likelihood(probs, labels) == pytest.approx(expected)
    # argmax: 0 (tie, first wins), 1, 0: rows 0 and 1 right, row 2 wrong.
    assert accuracy(probs, labels) == pytest.approx(2 / 3)


def test_negative_log_likelihood_of_a_certain_mistake_is_finite() -> None:
    nll = negative_log_likelihood(np.array([[1.0, 0.0]]), np.array([1]))
    assert nll == pytest.approx(-math.log(1e-12))


def test_mc_log_likelihood_by_hand() -> None:
    # Two samples, one point: y = 1, y_t in {0, 2}, tau = 2. Each term exp(-0.5*2*1) = e^-1.
    # logsumexp = log(2 e^-1) = log 2 - 1; minus log T (log 2) gives -1.
    ll = mc_log_likelihood(np.array([1.0]), np.array([[0.0], [2.0]]), tau=2.0)
    assert ll == pytest.approx(-1 - 0.5 * math.log(2 * math.pi) + 0.5 * math.log(2.0))


def test_mc_log_likelihood_with_one_sample_is_the_gaussian_density() -> None:
    y, yt, tau = np.array([0.3, -1.0]), np.array([[0.0, 0.5]]), 4.0
    expected = gaussian_log_likelihood(y, yt[0], np.full(2, 1 / tau))
    assert mc_log_likelihood(y, yt, tau) == pytest.approx(expected)


def test_expected_calibration_error_by_hand() -> None:
    # Confidences 0.95, 0.95 (bin 15: one right, one wrong) and 0.6 (bin 9, right):
    # ECE = 2/3 * |0.5 - 0.95| + 1/3 * |1 - 0.6| = 0.3 + 0.1333...
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.4, 0.6]])
    labels = np.array([0, 1, 1])
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(0.3 + 0.4 / 3)
    # Perfect calibration: confidence 1 and always right.
    assert expected_calibration_error(np.eye(3), np.arange(3), 15) == 0.0


def test_expected_calibration_error_bins_are_closed_on_the_right() -> None:
    # 0.6 sits exactly on the edge 9/15: it must share bin 9 with 0.55, not go to bin 10.
    probs = np.array([[0.6, 0.4], [0.55, 0.45]])
    labels = np.array([0, 1])
    # One bin holding both: |accuracy 0.5 - mean confidence 0.575|.
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(0.075)


def test_entropy_by_hand_and_matches_the_engine() -> None:
    probs = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    expected = [math.log(2), 0.0, 1.5 * math.log(2)]
    assert entropy(probs) == pytest.approx(expected)
    assert engine_entropy(torch.tensor(probs)).numpy() == pytest.approx(expected)


def test_mutual_information_by_hand() -> None:
    # Two confident samples that disagree: mean [0.5, 0.5] has entropy log 2, each sample 0.
    disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert mutual_information(disagree) == pytest.approx([math.log(2)])
    # Two identical uncertain samples: all the entropy is aleatoric, MI 0.
    agree = np.array([[[0.5, 0.5]], [[0.5, 0.5]]])
    assert mutual_information(agree) == pytest.approx([0.0])


def test_auroc_by_hand() -> None:
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0])) == 0.0
    # Pairs (1 vs 1) tie = 0.5, (1 vs 0) win, (0 vs 1) loss, (0 vs 0) tie: 2 / 4.
    assert auroc(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.5


def test_interval_coverage_by_hand() -> None:
    y = np.array([0.0, 1.0, 2.5])
    # z(95%) = 1.96: with unit variance the points at 0 and 1 are in, 2.5 is out.
    assert interval_coverage(y, np.zeros(3), np.ones(3)) == pytest.approx(2 / 3)
