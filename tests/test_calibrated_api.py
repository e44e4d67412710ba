"""Calibrated uncertainty over real HTTP: intervals and prediction sets at a requested
coverage, adaptive sampling to a standard error, out-of-distribution flags and their
Prometheus histograms, through v1, v2 (tritonclient) and the Python client, with the same
bits everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.client import Client
from service.core.calibration import Calibration, conformal_quantile, gaussian_z
from service.core.engine import MLPEngine
from service.core.repository import read_config
from service.offline.calibrating import calibrate
from service.settings import Settings
from tests.helpers import (
    LiveServer,
    classifier_config,
    deep_regression_config,
    free_port,
    inputs,
    live_server,
    random_tensors,
    scrape,
    tiny_regression_config,
    tiny_tensors,
    write_model,
)


def _calibrated(config, tensors, seed: int):  # type: ignore[no-untyped-def]
    """``config`` with a calibration fitted on 300 synthetic held-out rows."""
    engine = MLPEngine(config, tensors)
    x = inputs(config, rows=300, seed=seed)
    if config.task == "classification":
        y = engine.predict(x).argmax(1).numpy()
        y[::4] = (y[::4] + 1) % config.output_dim  # a quarter of the labels elsewhere
    else:
        y = engine.predict(x).double().numpy() + np.random.default_rng(seed).normal(size=(300, 2))
    cal = calibrate(engine, x.numpy(), y, 200, seed, "synthetic held-out rows")
    return config.model_copy(update={"calibration": cal})


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny (uncalibrated), deep and clf (calibrated), clf-raw (the same clf, uncalibrated),
    and small (calibrated on 9 rows: 90% at most)."""
    root = tmp_path_factory.mktemp("calibrated")
    write_model(root, tiny_regression_config(), tiny_tensors())
    deep = deep_regression_config(activation="relu")  # its spread grows with distance
    deep_w = random_tensors(deep, seed=1)
    write_model(root, _calibrated(deep, deep_w, 1), deep_w)
    clf = classifier_config()
    clf_w = random_tensors(clf, seed=2)
    write_model(root, _calibrated(clf, clf_w, 2), clf_w)
    write_model(root, classifier_config(name="clf-raw"), clf_w)
    small = deep_regression_config(name="small", activation="relu")
    cal = Calibration(scores=[float(i) for i in range(1, 10)], held_out_rows=9, fitted_on="x")
    write_model(root, small.model_copy(update={"calibration": cal}), deep_w)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[LiveServer]:
    settings = Settings(
        model_dir=repo, max_rows=64, max_n_samples=4096, batching=False, grpc_port=free_port()
    )
    with live_server(settings) as s:
        yield s


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def mc(http: httpx.Client, name: str, **body: object) -> dict:  # type: ignore[type-arg]
    r = http.post(f"/v1/models/{name}/predict/mc", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def rows(name: str, n: int = 5) -> list[list[float]]:
    width = {"tiny": 2, "deep": 4, "small": 4, "clf": 5, "clf-raw": 5}[name]
    return np.random.default_rng(n).standard_normal((n, width)).round(3).tolist()


# -- regression intervals --------------------------------------------------------------


def test_conformal_interval_is_the_mean_plus_minus_the_held_out_quantile(
    http: httpx.Client, repo: Path
) -> None:
    config = read_config(repo / "deep")
    assert config.calibration is not None
    a = mc(http, "deep", inputs=rows("deep"), n_samples=300, seed=4, coverage=0.9)
    interval = a["interval"]
    assert interval["coverage"] == 0.9
    assert interval["method"] == "conformal"
    q = conformal_quantile(config.calibration.scores, 0.9)
    assert q is not None
    mean, half = np.array(a["mean"]), q * np.sqrt(np.array(a["predictive_variance"]))
    np.testing.assert_array_equal(np.array(interval["lower"]), mean - half)
    np.testing.assert_array_equal(np.array(interval["upper"]), mean + half)
    # The same request without coverage: the same bits, no interval.
    b = mc(http, "deep", inputs=rows("deep"), n_samples=300, seed=4)
    assert "interval" not in b
    assert a["mean"] == b["mean"]


def test_uncalibrated_interval_is_gaussian(http: httpx.Client) -> None:
    a = mc(http, "tiny", inputs=[[1.0, 2.0]], n_samples=200, seed=1, coverage=0.95)
    assert a["interval"]["method"] == "gaussian"
    half = gaussian_z(0.95) * np.sqrt(np.array(a["predictive_variance"]))
    np.testing.assert_allclose(np.array(a["interval"]["upper"]), np.array(a["mean"]) + half)
    assert "ood_score" not in a  # no calibration, no reference


def test_every_mc_answer_reports_its_standard_error(http: httpx.Client) -> None:
    a = mc(http, "deep", inputs=rows("deep"), n_samples=250, seed=2)
    se = np.sqrt(np.array(a["variance"]) / 250)
    np.testing.assert_array_equal(np.array(a["mc_standard_error"]), se)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"coverage": 0.3}, "coverage", "coverage must be in [0.5, 0.999]"),
        ({"coverage": 1.0}, "coverage", "coverage must be in [0.5, 0.999]"),
        ({"coverage": "0.9"}, "coverage", "Input should be a valid number"),
        ({"target_se": 0.0}, "target_se", "target_se must be > 0"),
        ({"target_se": -1}, "target_se", "target_se must be > 0"),
        ({"target_se": True}, "target_se", "Input should be a valid number"),
    ],
)
def test_bad_coverage_and_target_se_are_422_naming_the_field(
    http: httpx.Client, body: dict[str, object], field: str, message: str
) -> None:
    r = http.post("/v1/models/deep/predict/mc", json={"inputs": rows("deep"), **body})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"][-1] == field
    assert message in error["msg"]


def test_a_coverage_beyond_the_held_out_rows_names_the_largest_it_can_give(
    http: httpx.Client,
) -> None:
    ok = mc(http, "small", inputs=rows("small"), seed=1, coverage=0.9)  # ceil(10 * 0.9) = 9
    assert ok["interval"]["method"] == "conformal"
    r = http.post("/v1/models/small/predict/mc", json={"inputs": rows("small"), "coverage": 0.95})
    assert r.status_code == 422
    assert "at most 0.9" in r.json()["detail"][0]["msg"]


# -- adaptive sampling -----------------------------------------------------------------


def test_target_se_stops_early_meets_the_target_and_replays(http: httpx.Client) -> None:
    fixed = mc(http, "deep", inputs=rows("deep"), n_samples=4096, seed=9)
    target = 4 * float(np.max(fixed["mc_standard_error"]))
    a = mc(http, "deep", inputs=rows("deep"), seed=9, target_se=target)  # cap: max_n_samples
    b = mc(http, "deep", inputs=rows("deep"), seed=9, target_se=target)
    assert a["n_samples"] < 4096
    assert np.max(a["mc_standard_error"]) <= target
    assert a == b
    capped = mc(http, "deep", inputs=rows("deep"), n_samples=40, seed=9, target_se=1e-9)
    assert capped["n_samples"] == 40


# -- classification --------------------------------------------------------------------


def test_conformal_prediction_sets_and_calibrated_probabilities(
    http: httpx.Client, repo: Path
) -> None:
    config = read_config(repo / "clf")
    cal = config.calibration
    assert cal is not None
    assert cal.temperature is not None
    a = mc(http, "clf", inputs=rows("clf", 8), n_samples=200, seed=3, coverage=0.9)
    assert a["prediction_set_method"] == "conformal"
    probs = np.array(a["calibrated_probabilities"])
    np.testing.assert_allclose(probs.sum(1), 1.0)
    q = conformal_quantile(cal.scores, 0.9)
    assert q is not None
    want = [np.flatnonzero(p >= 1 - q).tolist() for p in probs]
    assert a["prediction_sets"] == want
    assert len(a["ood_score"]) == 8
    flags = [s > 1 for s in a["ood_score"]]
    assert a["out_of_distribution"] == flags


def test_uncalibrated_sets_hold_the_most_probable_classes(http: httpx.Client) -> None:
    a = mc(http, "clf-raw", inputs=rows("clf-raw", 4), n_samples=200, seed=3, coverage=0.8)
    assert a["prediction_set_method"] == "probability"
    assert "calibrated_probabilities" not in a
    for p, members in zip(np.array(a["mean"]), a["prediction_sets"], strict=True):
        order = np.argsort(-p, kind="stable")
        k = int(np.searchsorted(np.cumsum(p[order]), 0.8)) + 1  # first total >= 0.8
        assert sorted(members) == sorted(order[:k].tolist())


# -- out of distribution ---------------------------------------------------------------


def test_far_rows_are_flagged_and_near_ones_are_not(http: httpx.Client) -> None:
    near = rows("deep", 20)
    far = (np.array(near) * 200).tolist()  # far outside the held-out inputs
    a = mc(http, "deep", inputs=near + far, n_samples=200, seed=5)
    flags = a["out_of_distribution"]
    assert sum(flags[20:]) == 20
    assert sum(flags[:20]) <= 2  # the reference is a 99th percentile


def test_metrics_histograms_count_every_served_row(server: LiveServer, http: httpx.Client) -> None:
    def count(metric: str, model: str) -> float:
        return scrape(server.url).get((f"{metric}_count", (("model", model),)), 0.0)

    before = {m: count("dropout_mc_std", m) for m in ("deep", "tiny")}
    before_mi = count("dropout_mc_mutual_information", "clf")
    before_ood = count("dropout_ood_score", "deep")
    mc(http, "deep", inputs=rows("deep", 3), n_samples=50, seed=1)  # 3 rows x 2 outputs
    mc(http, "tiny", inputs=[[1.0, 2.0]], n_samples=50, seed=1)
    mc(http, "clf", inputs=rows("clf", 4), n_samples=50, seed=1)
    assert count("dropout_mc_std", "deep") == before["deep"] + 6
    assert count("dropout_mc_std", "tiny") == before["tiny"] + 1
    assert count("dropout_mc_mutual_information", "clf") == before_mi + 4
    assert count("dropout_ood_score", "deep") == before_ood + 3
    assert count("dropout_ood_score", "tiny") == 0  # uncalibrated: no score served


# -- v2 and the client: the same bits ------------------------------------------------


@pytest.fixture
def triton_client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)
    yield c
    c.close()


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("name", ["deep", "clf", "tiny"])
def test_v2_carries_the_same_bits_as_v1(
    http: httpx.Client, triton_client: triton.InferenceServerClient, name: str, binary: bool
) -> None:
    x = np.array(rows(name), dtype=np.float32)
    params = {"n_samples": 300, "seed": 11, "coverage": 0.9}
    v1 = mc(http, name, inputs=x.tolist(), **params)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = triton_client.infer(name, [tensor], parameters=params)
    response = result.get_response()
    method = "conformal" if name != "tiny" else "gaussian"
    assert response["parameters"] == {
        "n_samples": 300,
        "seed": 11,
        "coverage": 0.9,
        "coverage_method": method,
    }
    for key in ("mean", "std", "mc_standard_error"):
        np.testing.assert_array_equal(result.as_numpy(key), np.array(v1[key]))
    if name == "clf":
        sets = result.as_numpy("prediction_sets")
        assert sets.dtype == np.bool_
        assert [np.flatnonzero(r).tolist() for r in sets] == v1["prediction_sets"]
    else:
        np.testing.assert_array_equal(result.as_numpy("interval_lower"), v1["interval"]["lower"])
        np.testing.assert_array_equal(result.as_numpy("interval_upper"), v1["interval"]["upper"])
    if name != "tiny":
        flags = result.as_numpy("out_of_distribution")
        assert flags.dtype == np.bool_
        assert flags.tolist() == v1["out_of_distribution"]
        np.testing.assert_array_equal(result.as_numpy("ood_score"), v1["ood_score"])


@pytest.mark.parametrize("name", ["deep", "clf", "tiny"])
def test_grpc_carries_rest_v2s_bits_for_every_calibrated_output(
    server: LiveServer, triton_client: triton.InferenceServerClient, name: str
) -> None:
    import tritonclient.grpc as tg

    x = np.array(rows(name), dtype=np.float32)
    params = {"n_samples": 300, "seed": 11, "coverage": 0.95}
    rest_tensor = triton.InferInput("input", list(x.shape), "FP32")
    rest_tensor.set_data_from_numpy(x, binary_data=True)
    rest = triton_client.infer(name, [rest_tensor], parameters=params)
    with tg.InferenceServerClient(server.grpc_url) as c:
        tensor = tg.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        over_grpc = c.infer(name, [tensor], parameters=params)
    names = [o["name"] for o in rest.get_response()["outputs"]]
    assert [o.name for o in over_grpc.get_response().outputs] == names
    assert {"mean", "mc_standard_error"} <= set(names)
    assert ("prediction_sets" if name == "clf" else "interval_lower") in names
    for output in names:
        a, b = over_grpc.as_numpy(output), rest.as_numpy(output)
        assert a.dtype == b.dtype, output
        assert a.tobytes() == b.tobytes(), output
    answered = over_grpc.get_response(as_json=True)["parameters"]
    values = {k: next(iter(v.values())) for k, v in answered.items()}
    assert values["coverage"] == 0.95
    assert values["coverage_method"] == rest.get_response()["parameters"]["coverage_method"]


def test_v2_target_se_and_bad_coverage(
    http: httpx.Client, triton_client: triton.InferenceServerClient
) -> None:
    x = np.array(rows("deep"), dtype=np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = triton_client.infer("deep", [tensor], parameters={"seed": 2, "target_se": 0.05})
    v1 = mc(http, "deep", inputs=x.tolist(), seed=2, target_se=0.05)
    assert result.get_response()["parameters"]["n_samples"] == v1["n_samples"]
    np.testing.assert_array_equal(result.as_numpy("mean"), v1["mean"])
    with pytest.raises(InferenceServerException) as e:
        triton_client.infer("deep", [tensor], parameters={"coverage": 2.0})
    assert e.value.status() == "400"
    assert "coverage must be in [0.5, 0.999]" in e.value.message()


def test_model_metadata_lists_the_calibrated_outputs(
    triton_client: triton.InferenceServerClient,
) -> None:
    outputs = {o["name"]: o for o in triton_client.get_model_metadata("deep")["outputs"]}
    assert outputs["out_of_distribution"] == {
        "name": "out_of_distribution",
        "datatype": "BOOL",
        "shape": [-1],
    }
    assert outputs["interval_lower"]["shape"] == [-1, 2]
    clf = {o["name"] for o in triton_client.get_model_metadata("clf")["outputs"]}
    assert {"prediction_sets", "calibrated_probabilities", "ood_score"} <= clf
    raw = {o["name"] for o in triton_client.get_model_metadata("clf-raw")["outputs"]}
    assert "ood_score" not in raw


def test_python_client_returns_arrays_of_the_same_bits(
    server: LiveServer, http: httpx.Client
) -> None:
    v1 = mc(http, "deep", inputs=rows("deep"), n_samples=300, seed=6, coverage=0.95)
    v1_sets = mc(http, "clf", inputs=rows("clf"), n_samples=300, seed=6, coverage=0.9)
    with Client(server.url) as client:
        got = client.predict_mc("deep", rows("deep"), n_samples=300, seed=6, coverage=0.95)
        sets = client.predict_mc("clf", rows("clf"), n_samples=300, seed=6, coverage=0.9)
    assert got.coverage == 0.95
    assert got.coverage_method == "conformal"
    assert got.interval_lower is not None
    assert got.interval_upper is not None
    np.testing.assert_array_equal(got.interval_lower, v1["interval"]["lower"])
    np.testing.assert_array_equal(got.interval_upper, v1["interval"]["upper"])
    np.testing.assert_array_equal(got.mc_standard_error, v1["mc_standard_error"])
    assert got.out_of_distribution is not None
    assert got.out_of_distribution.dtype == np.bool_
    assert sets.prediction_sets is not None
    assert sets.prediction_sets.shape == (5, 3)
    assert sets.coverage == 0.9
    assert sets.calibrated_probabilities is not None
    assert [np.flatnonzero(r).tolist() for r in sets.prediction_sets] == v1_sets["prediction_sets"]


def test_v1_metadata_summarises_the_calibration(http: httpx.Client) -> None:
    small = http.get("/v1/models/small").json()["calibration"]
    assert small == {
        "held_out_rows": 9,
        "fitted_on": "x",
        "max_coverage": 0.9,
        "temperature": None,
        "out_of_distribution": False,
    }
    clf = http.get("/v1/models/clf").json()["calibration"]
    assert clf["temperature"] > 0
    assert clf["out_of_distribution"] is True
    assert http.get("/v1/models/tiny").json()["calibration"] is None
