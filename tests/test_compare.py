"""POST /v1/models/{name}/compare over real HTTP: its fields and how they relate."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import torch

from service.core.engine import MLPEngine
from service.core.model import ModelConfig
from service.serving.dataplane import train_pass_seeds
from tests.helpers import LiveServer, cases, inputs

ROWS = {
    "tiny": [[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]],
    "deep": [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]],
    "clf": [[0.1, -0.2, 0.3, 1.0, 2.0]],
}


def compare(client: httpx.Client, name: str, **body: Any) -> dict[str, Any]:
    r = client.post(f"/v1/models/{name}/compare", json={"inputs": ROWS[name], **body})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


@pytest.mark.parametrize("name", sorted(ROWS))
def test_eval_field_equals_predict(client: httpx.Client, name: str) -> None:
    answer = compare(client, name, n_samples=50, seed=1)
    r = client.post(f"/v1/models/{name}/predict", json={"inputs": ROWS[name]})
    assert answer["eval"] == r.json()["outputs"]


@pytest.mark.parametrize("name", sorted(ROWS))
def test_mc_fields_equal_predict_mc_with_the_same_seed(client: httpx.Client, name: str) -> None:
    answer = compare(client, name, n_samples=300, seed=42)
    mc = client.post(
        f"/v1/models/{name}/predict/mc",
        json={"inputs": ROWS[name], "n_samples": 300, "seed": 42},
    ).json()
    assert answer["mc_mean"] == mc["mean"]
    assert answer["mc_std"] == mc["std"]
    assert (answer["n_samples"], answer["seed"]) == (300, 42)
    for m_row, e_row, g_row in zip(answer["mc_mean"], answer["eval"], answer["gap"], strict=True):
        assert g_row == pytest.approx([m - e for m, e in zip(m_row, e_row, strict=True)])


@pytest.mark.parametrize("name", sorted(ROWS))
def test_train_passes_differ_from_each_other_and_replay(client: httpx.Client, name: str) -> None:
    answer = compare(client, name, n_samples=10, seed=3, n_train_passes=6)
    passes = answer["train_passes"]
    assert len(passes) == 6
    assert all(len(p) == len(ROWS[name]) for p in passes)
    assert len({repr(p) for p in passes}) == 6  # six identical calls, six different answers
    assert answer["train_pass_seeds"] == train_pass_seeds(3, 6)
    assert compare(client, name, n_samples=10, seed=3, n_train_passes=6)["train_passes"] == passes
    assert compare(client, name, n_samples=10, seed=4, n_train_passes=6)["train_passes"] != passes


@pytest.mark.parametrize(("config", "tensors"), cases())
def test_a_train_pass_is_the_one_sample_of_mc_with_its_seed(
    config: ModelConfig, tensors: dict[str, torch.Tensor]
) -> None:
    engine, x = MLPEngine(config, tensors), inputs(config)
    state = torch.random.get_rng_state()
    for seed in train_pass_seeds(5, 3):
        one = engine.predict_mc(x, 1, seed, return_samples=True).samples
        assert one is not None
        assert torch.equal(engine.train_pass(x, seed), one[0])
    assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG read


def test_timings_and_drawn_seed(client: httpx.Client) -> None:
    answer = compare(client, "tiny")
    assert 0 <= answer["seed"] < 2**63
    assert answer["n_samples"] == 100  # the default setting
    t = answer["timing_ms"]
    assert t["eval"] > 0
    assert t["mc"] > 0
    assert len(t["train_passes"]) == 5
    assert all(ms > 0 for ms in t["train_passes"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n_train_passes": 1}, "n_train_passes"),
        ({"n_train_passes": 33}, "n_train_passes"),
        ({"n_samples": 1}, "n_samples"),
        ({"n_samples": 5001}, "n_samples"),
        ({"seed": -1}, "seed"),
        ({"inputs": [[1.0]]}, "inputs"),
    ],
)
def test_bad_requests_get_422_naming_the_field(
    client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/models/tiny/compare", json={"inputs": ROWS["tiny"], **body})
    assert r.status_code == 422
    assert field in {str(part) for e in r.json()["detail"] for part in e["loc"]}


def test_unknown_model_is_404_and_openapi_has_an_example(client: httpx.Client) -> None:
    assert client.post("/v1/models/nope/compare", json={"inputs": [[1.0]]}).status_code == 404
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/models/{name}/compare"]["post"]
    assert "CompareRequest" in op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schemas = spec["components"]["schemas"]
    assert schemas["CompareRequest"]["examples"][0]["seed"] == 7
    assert "gap" in schemas["CompareResponse"]["examples"][0]


def test_concurrent_compares_replay_and_leave_eval_untouched(
    server: LiveServer, client: httpx.Client
) -> None:
    bodies = [{"inputs": ROWS["deep"], "n_samples": 200, "seed": s} for s in range(24)]
    eval_body = {"inputs": ROWS["deep"]}

    def without_timing(answer: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in answer.items() if k != "timing_ms"}

    solo = [without_timing(client.post("/v1/models/deep/compare", json=b).json()) for b in bodies]
    solo_eval = client.post("/v1/models/deep/predict", json=eval_body).json()

    async def together() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            calls = [c.post("/v1/models/deep/compare", json=b) for b in bodies]
            calls += [c.post("/v1/models/deep/predict", json=eval_body) for _ in range(16)]
            responses = await asyncio.gather(*calls)
        assert all(r.status_code == 200 for r in responses)
        return [r.json() for r in responses]

    answers = asyncio.run(together())
    assert [without_timing(a) for a in answers[: len(bodies)]] == solo
    assert all(a == solo_eval for a in answers[len(bodies) :])
    assert len({repr(a["train_passes"]) for a in solo}) == len(bodies)
