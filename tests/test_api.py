"""Every v1 endpoint through a real uvicorn server (bad input: tests/test_bad_input.py)."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from service.core.engine import MC_CHUNK_ELEMENTS, MC_TILE_ELEMENTS
from service.core.repository import load_model
from service.protocols.http.schemas_v1 import MCResponse, PredictResponse
from service.serving.batching import choose_block
from service.settings import Settings

MC_BODY = {"inputs": [[1.0, 2.0]], "n_samples": 200, "seed": 42}
# What an MC answer holds (no field of another task, nor samples unasked, even as null).
REGRESSION_OUTPUTS = ("mean", "variance", "std", "mc_standard_error", "predictive_variance")
CLASSIFIER_OUTPUTS = (
    "mean",
    "variance",
    "std",
    "mc_standard_error",
    "entropy",
    "mutual_information",
)


def test_healthz(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_lists_models(client: httpx.Client) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "models": ["clf", "deep", "tiny"], "failed": {}}


def test_list_models(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["clf", "deep", "tiny"]


def test_model_metadata(client: httpx.Client) -> None:
    meta = client.get("/v1/models/tiny").json()
    assert {k: meta[k] for k in ("name", "version", "task", "input_dim", "output_dim")} == {
        "name": "tiny",
        "version": "3",
        "task": "regression",
        "input_dim": 2,
        "output_dim": 1,
    }
    assert meta["dropout"] == [0.5]
    assert meta["dropout_scaling"] == "inverted"
    assert len(meta["sha256"]) == 64
    assert client.get("/v1/models/clf").json()["labels"] == ["a", "b", "c"]


def test_model_metadata_states_what_a_replay_depends_on(
    client: httpx.Client, settings: Settings
) -> None:
    """DESIGN.md contract 6: the torch build, the CPU kind and the engine's shape constants."""
    replay = client.get("/v1/models/deep").json()["replay"]
    assert replay == {
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": "cpu",
        "mask_mode": settings.mc_mask,
        "mc_chunk_elements": MC_CHUNK_ELEMENTS,
        "mc_tile_elements": MC_TILE_ELEMENTS,
        # the setting, unless this machine's kernels move a row's bits in such blocks
        "eval_block_rows": choose_block(
            load_model(settings.model_dir / "deep").engine, settings.eval_block_rows
        ),
    }
    listed = {m["name"]: m["replay"] for m in client.get("/v1/models").json()["models"]}
    assert listed["deep"] == replay
    assert client.get("/v2/models/deep").json()["parameters"] == replay


def test_predict_known_answer(client: httpx.Client) -> None:
    r = client.post("/v1/models/tiny/predict", json={"inputs": [[1, 2], [0.0, 0.0]]})
    assert r.status_code == 200
    assert r.json() == {"model": "tiny", "version": "3", "outputs": [[6.5], [0.5]]}


def test_predict_classifier_gives_probabilities(client: httpx.Client) -> None:
    r = client.post("/v1/models/clf/predict", json={"inputs": [[0.1, 0.2, 0.3, 0.4, 0.5]]})
    probs = r.json()["outputs"][0]
    assert len(probs) == 3
    assert sum(probs) == pytest.approx(1.0, abs=1e-6)


def test_predict_mc_regression_fields_and_replay(client: httpx.Client) -> None:
    first = client.post("/v1/models/tiny/predict/mc", json=MC_BODY).json()
    again = client.post("/v1/models/tiny/predict/mc", json=MC_BODY).json()
    assert first == again
    assert first["n_samples"] == 200
    assert first["seed"] == 42
    (mean,), (var,), (std,), (pvar,) = (
        first[k][0] for k in ("mean", "variance", "std", "predictive_variance")
    )
    assert var > 0
    assert std == pytest.approx(math.sqrt(var))
    assert pvar == pytest.approx(var + 0.25)
    assert 4.0 < mean < 9.0
    assert set(first) == {"model", "version", "n_samples", "seed", *REGRESSION_OUTPUTS}


def test_predict_mc_without_seed_returns_one_that_replays(client: httpx.Client) -> None:
    body = {"inputs": [[1.0, 2.0]], "n_samples": 50}
    drawn = client.post("/v1/models/tiny/predict/mc", json=body).json()
    assert 0 <= drawn["seed"] < 2**63
    replay = client.post("/v1/models/tiny/predict/mc", json={**body, "seed": drawn["seed"]}).json()
    assert replay == drawn


def test_predict_mc_default_n_samples(client: httpx.Client) -> None:
    r = client.post("/v1/models/tiny/predict/mc", json={"inputs": [[1.0, 2.0]], "seed": 1})
    assert r.json()["n_samples"] == 100


def test_predict_mc_samples_match_summary(client: httpx.Client) -> None:
    body = {**MC_BODY, "n_samples": 30, "return_samples": True}
    r = client.post("/v1/models/tiny/predict/mc", json=body).json()
    samples = [s[0][0] for s in r["samples"]]
    assert len(samples) == 30
    mean = sum(samples) / 30
    assert r["mean"][0][0] == pytest.approx(mean, rel=1e-12)
    assert r["variance"][0][0] == pytest.approx(
        sum((s - mean) ** 2 for s in samples) / 30, rel=1e-9
    )


def test_predict_mc_classifier_fields(client: httpx.Client) -> None:
    body = {"inputs": [[0.1, 0.2, 0.3, 0.4, 0.5]] * 2, "n_samples": 100, "seed": 5}
    r = client.post("/v1/models/clf/predict/mc", json=body).json()
    assert len(r["entropy"]) == 2
    assert len(r["mutual_information"]) == 2
    assert 0 <= r["mutual_information"][0] <= r["entropy"][0] <= math.log(3) + 1e-9
    assert sum(r["mean"][0]) == pytest.approx(1.0)
    assert set(r) == {"model", "version", "n_samples", "seed", *CLASSIFIER_OUTPUTS}


@pytest.mark.parametrize(
    ("path", "body", "model"),
    [
        ("/v1/models/tiny/predict", {"inputs": [[1.0, 2.0]]}, PredictResponse),
        ("/v1/models/tiny/predict/mc", MC_BODY, MCResponse),
        ("/v1/models/clf/predict/mc", {"inputs": [[0.1] * 5], "seed": 1}, MCResponse),
        ("/v1/models/tiny/predict/mc", {**MC_BODY, "return_samples": True}, MCResponse),
    ],
)
def test_hand_encoded_answers_are_exactly_their_documented_models(
    client: httpx.Client, path: str, body: dict[str, object], model: type[BaseModel]
) -> None:
    # The predict routes encode their bodies with orjson, bypassing FastAPI's response
    # model: every required field present, none undocumented, all valid, and no null (an
    # optional field that does not apply is left out).
    r = client.post(path, json=body)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    fields = model.model_fields
    assert {k for k, f in fields.items() if f.is_required()} <= set(r.json()) <= set(fields)
    assert None not in r.json().values()
    parsed = model.model_validate_json(r.content).model_dump(mode="json", exclude_none=True)
    assert parsed == r.json()


def test_openapi_documents_endpoints_with_examples(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for path in (
        "/healthz",
        "/readyz",
        "/v1/models",
        "/v1/models/{name}",
        "/v1/models/{name}/predict",
        "/v1/models/{name}/predict/mc",
        "/metrics",
    ):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert schemas["MCRequest"]["examples"][0]["seed"] == 7
    assert client.get("/docs").status_code == 200


def test_metrics_exposition_counts_requests(client: httpx.Client) -> None:
    client.post("/v1/models/tiny/predict", json={"inputs": [[1.0, 2.0]]})
    client.post("/v1/models/tiny/predict", json={"inputs": [[1.0]]})
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["dropout_http_requests"]
    counts = {
        (s.labels["endpoint"], s.labels["model"], s.labels["status"]): s.value
        for s in requests.samples
        if s.name == "dropout_http_requests_total"
    }
    assert counts[("/v1/models/{name}/predict", "tiny", "200")] >= 1
    assert counts[("/v1/models/{name}/predict", "tiny", "422")] >= 1
    info = families["dropout_model_info"]
    assert {s.labels["name"] for s in info.samples} == {"clf", "deep", "tiny"}
