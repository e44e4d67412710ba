"""Calibration maths (``core.calibration``, ``offline.evaluation.fit_precision``) and adaptive
sampling in the engine, without HTTP: coverage measured on exchangeable synthetic data."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from service.core.calibration import (
    Calibration,
    conformal_quantile,
    fit_temperature,
    interval_quantile,
    max_coverage,
    ood_scores,
    prediction_set_mask,
    scale_probabilities,
)
from service.core.engine import ADAPTIVE_FIRST_STAGE, MCResult, MLPEngine, mc_stages
from service.core.model import ModelConfig
from service.core.repository import load_model
from service.offline.evaluation import fit_precision, mc_log_likelihood
from service.serving.outputs import _few_mc_outputs, _mc_outputs, mc_outputs
from tests.helpers import ROOT, classifier_config, deep_regression_config, inputs, random_tensors


def test_conformal_quantile_is_the_finite_sample_order_statistic() -> None:
    scores = [float(i) for i in range(1, 20)]  # n = 19
    assert conformal_quantile(scores, 0.95) == 19.0  # ceil(20 * 0.95) = 19th
    assert conformal_quantile(scores, 0.9) == 18.0  # ceil(20 * 0.9) = 18th
    assert conformal_quantile(scores, 0.5) == 10.0
    assert conformal_quantile(scores, 0.951) is None  # ceil(19.02) = 20 > 19: unbounded
    assert max_coverage(19) == pytest.approx(0.95)


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_split_conformal_intervals_cover_what_they_claim(coverage: float) -> None:
    """Heteroscedastic data, a model whose spread is wrong by a factor of 3: the Gaussian
    interval misses, the conformal one holds its coverage (averaged over 200 calibrations)."""
    rng = np.random.default_rng(0)
    n_cal, n_test, repeats = 200, 500, 200
    covered, gaussian = [], []
    for _ in range(repeats):
        x_cal, x_test = rng.uniform(0.5, 2.0, n_cal), rng.uniform(0.5, 2.0, n_test)
        sd_cal, sd_test = x_cal, x_test  # true noise sd grows with x
        y_cal, y_test = rng.normal(0, sd_cal), rng.normal(0, sd_test)
        # The model believes sd = x / 3: right in shape, wrong in scale.
        cal = Calibration(
            scores=sorted((np.abs(y_cal) / (x_cal / 3)).tolist()),
            held_out_rows=n_cal,
            fitted_on="synthetic",
        )
        q = interval_quantile(cal, coverage)
        assert q is not None
        covered.append(np.mean(np.abs(y_test) <= q * x_test / 3))
        z = interval_quantile(None, coverage)
        assert z is not None
        gaussian.append(np.mean(np.abs(y_test) <= z * x_test / 3))
    mean = float(np.mean(covered))
    # At least the coverage, and at most coverage + 1 / (n + 1), up to the sampling error.
    assert coverage - 0.005 <= mean <= coverage + 1 / (n_cal + 1) + 0.005
    assert np.mean(gaussian) < coverage - 0.3  # the uncalibrated interval is far off


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, size=(4000, 5))
    true_t = 2.5  # labels drawn from softmax(logits / 2.5): the raw softmax is overconfident
    truth = scale_probabilities(np.exp(logits - logits.max(1, keepdims=True)), true_t)
    labels = np.array([rng.choice(5, p=p) for p in truth])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert fit_temperature(probs, labels) == pytest.approx(true_t, rel=0.08)


def test_scaling_by_one_changes_nothing_and_rows_sum_to_one() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.05, 0.05, 0.9]])
    np.testing.assert_allclose(scale_probabilities(probs, 1.0), probs, rtol=1e-12)
    hot = scale_probabilities(probs, 0.5)
    np.testing.assert_allclose(hot.sum(1), 1.0)
    assert hot[0, 0] > probs[0, 0]  # below 1 sharpens


def test_uncalibrated_sets_take_the_most_probable_classes_up_to_the_coverage() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.96, 0.03, 0.01]])
    sets = prediction_set_mask(probs, 0.85, None)
    assert sets is not None
    assert sets.tolist() == [
        [True, True, False],  # 0.6 < 0.85, then 0.9
        [True, True, True],  # 0.5, 0.8, then 1.0
        [True, False, False],  # 0.96 alone
    ]


def test_conformal_prediction_sets_cover_what_they_claim() -> None:
    rng = np.random.default_rng(2)
    n_cal, n_test, classes = 4000, 20000, 4
    logits = rng.normal(0, 2, size=(n_cal + n_test, classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    # The model's probabilities are flattened: softmax(logits / 3).
    model = scale_probabilities(probs, 3.0)
    scores = sorted((1 - model[np.arange(n_cal), labels[:n_cal]]).tolist())
    cal = Calibration(scores=scores, held_out_rows=n_cal, fitted_on="synthetic")
    for coverage in (0.8, 0.9, 0.95):
        sets = prediction_set_mask(model[n_cal:], coverage, cal)
        assert sets is not None
        hit = float(sets[np.arange(n_test), labels[n_cal:]].mean())
        assert coverage - 0.015 <= hit <= coverage + 0.015, (coverage, hit)


def test_ood_scores_are_the_largest_ratio_to_the_reference() -> None:
    stat = np.array([[0.5, 0.1], [2.0, 0.1], [0.5, 0.9]])
    scores = ood_scores(stat, [1.0, 0.3])
    np.testing.assert_allclose(scores, [0.5, 2.0, 3.0])
    assert (scores > 1).tolist() == [False, True, True]


def test_fit_precision_finds_the_noise_and_the_best_likelihood() -> None:
    rng = np.random.default_rng(3)
    n, t = 2000, 200
    mu = rng.normal(size=n)
    y = mu + rng.normal(scale=0.3, size=n)
    samples = mu[None] + rng.normal(scale=0.05, size=(t, n))  # small epistemic spread
    tau = fit_precision(y, samples)
    # Total variance 0.09 = 1/tau + 0.05^2: tau near 1 / (0.09 - 0.0025).
    assert tau == pytest.approx(1 / (0.09 - 0.0025), rel=0.1)
    best = mc_log_likelihood(y, samples, tau)
    for other in (tau * 0.9, tau * 1.1, 1.0, 100.0):
        assert mc_log_likelihood(y, samples, other) < best


def test_calibration_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="scores"):
        Calibration(scores=[], held_out_rows=1, fitted_on="x")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Calibration(scores=[-1.0], held_out_rows=1, fitted_on="x")
    with pytest.raises(ValueError, match="greater than 0"):
        Calibration(scores=[1.0], temperature=0.0, held_out_rows=1, fitted_on="x")


# -- adaptive sampling ------------------------------------------------------------------


@pytest.mark.parametrize("cap", [2, 31, 32, 33, 100, 1000])
def test_stages_double_the_total_up_to_the_cap(cap: int) -> None:
    stages = list(mc_stages(cap, 0.1))
    assert sum(stages) == cap
    assert stages[0] == min(ADAPTIVE_FIRST_STAGE, cap)
    totals = np.cumsum(stages)
    assert all(b == min(2 * a, cap) for a, b in itertools.pairwise(totals))
    assert list(mc_stages(cap, None)) == [cap]


def _engine() -> tuple[MLPEngine, torch.Tensor]:
    config = deep_regression_config()
    return MLPEngine(config, random_tensors(config, 1)), inputs(config, rows=6)


def test_adaptive_answers_meet_the_target_in_fewer_passes_and_replay() -> None:
    engine, x = _engine()
    fixed = engine.predict_mc(x, 4096, 7)
    worst_fixed = float((fixed.variance / 4096).sqrt().max())
    target = 4 * worst_fixed  # reachable with about 4096 / 16 passes
    a = engine.predict_mc(x, 4096, 7, target_se=target)
    b = engine.predict_mc(x, 4096, 7, target_se=target)
    assert a.n_samples < 4096
    assert float((a.variance / a.n_samples).sqrt().max()) <= target
    assert a.n_samples in set(np.cumsum(list(mc_stages(4096, target))).tolist())
    assert torch.equal(a.mean, b.mean)
    assert torch.equal(a.variance, b.variance)
    assert a.n_samples == b.n_samples


def test_an_unreachable_target_stops_at_the_cap() -> None:
    engine, x = _engine()
    result = engine.predict_mc(x, 100, 7, target_se=1e-12)
    assert result.n_samples == 100
    assert float((result.variance / 100).sqrt().max()) > 1e-12


def test_a_loose_target_stops_after_the_first_stage() -> None:
    engine, x = _engine()
    result = engine.predict_mc(x, 1000, 7, target_se=math.inf)
    assert result.n_samples == ADAPTIVE_FIRST_STAGE


def _few_cases() -> list[tuple[str, ModelConfig]]:
    deep = deep_regression_config()  # 2 outputs, noise variance
    cal = Calibration(scores=[0.5, 1.0, 2.0], held_out_rows=3, fitted_on="x")
    return [
        ("regression", deep),
        ("no noise", deep_regression_config(noise_variance=None)),
        (
            "ood",
            deep_regression_config(
                calibration=cal.model_copy(update={"ood_reference": [0.3, 2.0]})
            ),
        ),
        ("classification", classifier_config()),
        (
            "classification ood",
            classifier_config(calibration=cal.model_copy(update={"ood_reference": [0.2]})),
        ),
        ("shipped", load_model(ROOT / "models" / "concrete").config),
    ]


@pytest.mark.parametrize(
    ("name", "config"), _few_cases(), ids=lambda c: c if isinstance(c, str) else ""
)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_a_few_mc_outputs_in_python_are_the_bits_numpy_computes(
    name: str, config: ModelConfig, rows: int
) -> None:
    """Same names in the same order, dtypes, shapes and bytes, over variances from 0 to huge."""
    g = torch.Generator().manual_seed(rows)
    out = config.output_dim
    magnitude = 10.0 ** (torch.rand(rows, out, generator=g, dtype=torch.float64) * 40 - 30)
    variance = torch.rand(rows, out, generator=g, dtype=torch.float64) * magnitude
    variance[0, 0] = 0.0
    mi = (
        torch.rand(rows, generator=g, dtype=torch.float64)
        if config.task == "classification"
        else None
    )
    for n in (2, 100, 997):
        result = MCResult(
            mean=torch.randn(rows, out, generator=g, dtype=torch.float64),
            variance=variance,
            samples=torch.randn(n, rows, out, generator=g) if n == 2 else None,
            entropy=None if mi is None else mi * 2,
            mutual_information=mi,
            n_samples=n,
        )
        few = _few_mc_outputs(config, result)
        full = _mc_outputs(config, result, None)
        assert list(few) == list(full)
        for key, t in full.items():
            assert few[key].dtype == t.dtype, key
            assert few[key].shape == t.shape, key
            assert few[key].numpy().tobytes() == t.numpy().tobytes(), (name, key, n)
    assert mc_outputs(config, result) is not None
