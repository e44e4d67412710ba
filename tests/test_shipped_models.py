"""The shipped digits and sine-gap models load, answer through the API, and hold their claims."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.core.repository import load_model
from service.settings import Settings
from tests.helpers import live_server

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"

# A "0" from the digits data set (pixels 0..16, row by row).
ZERO = [
    [0, 0, 5, 13, 9, 1, 0, 0],
    [0, 0, 13, 15, 10, 15, 5, 0],
    [0, 3, 15, 2, 0, 11, 8, 0],
    [0, 4, 12, 0, 0, 8, 8, 0],
    [0, 5, 8, 0, 0, 9, 8, 0],
    [0, 4, 11, 0, 1, 12, 7, 0],
    [0, 2, 14, 5, 10, 12, 0, 0],
    [0, 0, 6, 13, 10, 0, 0, 0],
]
ZERO_ROW = [float(v) for row in ZERO for v in row]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    settings = Settings(model_dir=MODELS)
    with live_server(settings) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_shipped_configs_carry_their_metrics() -> None:
    digits = load_model(MODELS / "digits").config
    assert digits.task == "classification"
    assert digits.labels == [str(d) for d in range(10)]
    m = digits.metrics
    assert m["test_accuracy_mc"] > 0.9
    for key in ("test_nll_eval", "test_nll_mc", "test_ece15_eval", "test_ece15_mc"):
        assert 0 <= m[key] < 1, key
    assert m["ood_uniform_noise_auroc_mutual_information"] > 0.9
    assert m["ood_shuffled_pixels_auroc_mutual_information"] > 0.8
    sine = load_model(MODELS / "sine-gap").config
    assert sine.metrics["std_ratio_gap"] > 1.2
    assert sine.metrics["std_ratio_outside"] > 1.5
    assert 0.85 <= sine.metrics["test_coverage_95"] <= 1.0
    for name in ("digits", "sine-gap"):
        card = (MODELS / name / "README.md").read_text()
        assert "Reproduce" in card


def test_digits_answers_with_the_classification_fields(client: httpx.Client) -> None:
    meta = client.get("/v1/models/digits").json()
    assert meta["task"] == "classification"
    assert meta["labels"] == [str(d) for d in range(10)]
    eval_ = client.post("/v1/models/digits/predict", json={"inputs": [ZERO_ROW]}).json()
    probs = eval_["outputs"][0]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert int(np.argmax(probs)) == 0
    body = {"inputs": [ZERO_ROW], "n_samples": 500, "seed": 3}
    mc = client.post("/v1/models/digits/predict/mc", json=body).json()
    for key in ("mean", "variance", "std", "entropy", "mutual_information"):
        assert mc.get(key) is not None, key
    assert int(np.argmax(mc["mean"][0])) == 0
    assert 0 <= mc["mutual_information"][0] <= mc["entropy"][0]
    assert "predictive_variance" not in mc or mc["predictive_variance"] is None


def test_digits_is_less_sure_of_noise_than_of_a_digit(client: httpx.Client) -> None:
    noise = np.random.default_rng(0).uniform(0, 16, size=(20, 64)).tolist()
    body = {"inputs": [ZERO_ROW, *noise], "n_samples": 500, "seed": 4}
    mi = client.post("/v1/models/digits/predict/mc", json=body).json()["mutual_information"]
    assert np.median(mi[1:]) > mi[0]


def test_sine_gap_std_grows_off_the_data(client: httpx.Client) -> None:
    xs = [[-3.0], [3.5], [0.0], [7.0], [-7.0]]
    body = {"inputs": xs, "n_samples": 1000, "seed": 5}
    mc = client.post("/v1/models/sine-gap/predict/mc", json=body).json()
    std = [s[0] for s in mc["std"]]
    on_data = max(std[:2])
    assert min(std[2:]) > on_data
    assert mc["mean"][0][0] == pytest.approx(np.sin(-3.0), abs=0.25)
    assert all(p > v for (p,), (v,) in zip(mc["predictive_variance"], mc["variance"], strict=True))


def test_shipped_models_carry_calibrations_fitted_on_held_out_rows() -> None:
    for name in ("concrete", "digits", "sine-gap"):
        cal = load_model(MODELS / name).config.calibration
        assert cal is not None, name
        assert cal.ood_reference is not None, name
        assert cal.held_out_rows >= 60, name  # 20% of the training rows: 95% is boundable
    digits = load_model(MODELS / "digits").config
    assert digits.calibration is not None
    assert digits.calibration.temperature is not None
    m = digits.metrics
    assert m["set_coverage_90"] >= 0.85
    # The flag is a 99th-percentile threshold: few test digits, many times more noise images.
    assert m["test_ood_flagged"] < 0.05
    assert m["ood_uniform_noise_flagged"] > 5 * m["test_ood_flagged"]


def test_concrete_intervals_cover_its_test_split_through_the_api(client: httpx.Client) -> None:
    """The published test split 0 (held out from training and calibration), in one request."""
    from service.offline.datasets import UCIDataset

    split = UCIDataset.load("concrete").split(0)
    body = {"inputs": split.x_test.tolist(), "n_samples": 1000, "seed": 1, "coverage": 0.95}
    answer = client.post("/v1/models/concrete/predict/mc", json=body).json()
    assert answer["interval"]["method"] == "conformal"
    y = split.y_test
    lower, upper = np.array(answer["interval"]["lower"]), np.array(answer["interval"]["upper"])
    covered = float(np.mean((lower <= y) & (y <= upper)))
    assert covered >= 0.88  # 103 rows: 0.95 asked, sampling error about 0.02
    assert sum(answer["out_of_distribution"]) <= 5


def test_digit_noise_is_flagged_and_a_digit_is_not(client: httpx.Client) -> None:
    noise = np.random.default_rng(0).uniform(0, 16, size=(20, 64)).tolist()
    body = {"inputs": [ZERO_ROW, *noise], "n_samples": 500, "seed": 4, "coverage": 0.95}
    answer = client.post("/v1/models/digits/predict/mc", json=body).json()
    assert answer["out_of_distribution"][0] is False
    assert sum(answer["out_of_distribution"][1:]) >= 3  # about a third of noise images
    assert 0 in answer["prediction_sets"][0]
