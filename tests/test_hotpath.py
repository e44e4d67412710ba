"""The hot path for v1 predict and v2 infer: what it takes, what it passes on, same answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.exceptions import HTTPException

from service.core.repository import ModelRepository
from service.protocols.http import v1, v2
from service.protocols.http.hotpath import HotPath
from service.serving.dataplane import DataPlane
from service.settings import Settings

ROW = [1.0, 2.0]
JSON = "application/json"


class Inner:
    """Stands for FastAPI behind the middleware: records what reaches it, answers 299."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(message.get("body", b""))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})


def call(
    app: Any,
    path: str,
    body: bytes,
    *,
    method: str = "POST",
    content_type: str | None = JSON,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, bytes]:
    headers = [(b"content-length", str(len(body)).encode()), *(extra or [])]
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def fast(model_dir: Path) -> Iterator[tuple[HotPath, Inner]]:
    plane = DataPlane(Settings(model_dir=model_dir, batching=False))
    plane.repository = ModelRepository.load(model_dir)
    inner = Inner()
    routes = {r.path: r for r in [*v1.router.routes, *v2.router.routes]}  # type: ignore[attr-defined]
    yield HotPath(inner, plane, routes, max_json_depth=4), inner
    plane.close()


V2_BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": ROW}]}
).encode()


def test_well_formed_predict_mc_and_infer_are_answered_without_fastapi(
    fast: tuple[HotPath, Inner],
) -> None:
    app, inner = fast
    status, body = call(app, "/v1/models/tiny/predict", json.dumps({"inputs": [ROW]}).encode())
    assert (status, json.loads(body)) == (
        200,
        {"model": "tiny", "version": "3", "outputs": [[6.5]]},
    )
    mc = json.dumps({"inputs": [ROW], "n_samples": 10, "seed": 3}).encode()
    status, body = call(app, "/v1/models/tiny/predict/mc", mc)
    assert status == 200
    assert json.loads(body)["seed"] == 3
    for path in ("/v2/models/tiny/infer", "/v2/models/tiny/versions/3/infer"):
        for content_type in (JSON, None, "application/octet-stream"):
            status, body = call(app, path, V2_BODY, content_type=content_type)
            assert status == 200
            assert json.loads(body)["outputs"][0]["data"] == [6.5]
    assert inner.bodies == []


@pytest.mark.parametrize(
    ("path", "body", "kwargs"),
    [
        ("/v1/models/tiny/predict", b'{"inputs": [[1, "2"]]}', {}),  # does not validate
        ("/v1/models/tiny/predict", b'{"inputs": [[1, 2]], "x": 1}', {}),  # extra field
        ("/v1/models/tiny/predict", b'{"inputs": [[1, 2]]', {}),  # not JSON
        ("/v1/models/tiny/predict", b'{"inputs": [[1, 2]]}', {"content_type": "text/plain"}),
        ("/v1/models/tiny/predict", b'{"inputs": [[1, 2]]}', {"content_type": None}),
        ("/v1/models/tiny/predict", b'{"inputs": [[1, 2]]}', {"method": "PUT"}),
        ("/v1/models/tiny/compare", b'{"inputs": [[1, 2]]}', {}),
        ("/v1/models/" + "n" * 257 + "/predict", b'{"inputs": [[1, 2]]}', {}),
        ("/v1/models/tiny/predict/mc", b'{"inputs": [[1, 2]], "seed": -1}', {}),
        ("/v1/models/tiny/predict", b'{"inputs": [[1, 2]], "x": [[[[1]]]]}', {}),  # too deep
        ("/v2/models/tiny/infer", V2_BODY, {"method": "PUT"}),
        ("/v2/models/tiny/ready", V2_BODY, {}),
        ("/v2/models/tiny/versions/" + "9" * 65 + "/infer", V2_BODY, {}),
        ("/v2/models/tiny/infer", b'{"inputs": [[[[1]]]]}', {}),  # too deep, for JSONGuard
    ],
)
def test_anything_else_goes_on_to_fastapi_with_its_body(
    fast: tuple[HotPath, Inner], path: str, body: bytes, kwargs: dict[str, Any]
) -> None:
    app, inner = fast
    assert call(app, path, body, **kwargs) == (299, b"inner")
    assert inner.bodies == [body]


def test_domain_errors_get_each_protocols_answers(fast: tuple[HotPath, Inner]) -> None:
    app, inner = fast
    status, body = call(app, "/v1/models/nope/predict", b'{"inputs": [[1, 2]]}')
    assert status == 404
    assert "nope" in json.loads(body)["detail"]
    status, body = call(app, "/v1/models/tiny/predict", b'{"inputs": [[1, 2, 3]]}')
    assert status == 422
    assert json.loads(body)["detail"][0]["loc"] == ["body", "inputs", 0]
    status, body = call(app, "/v2/models/nope/infer", V2_BODY)
    assert (status, list(json.loads(body))) == (404, ["error"])
    status, body = call(app, "/v2/models/tiny/versions/2/infer", V2_BODY)
    assert status == 404
    assert "no version '2'" in json.loads(body)["error"]
    status, body = call(app, "/v2/models/tiny/infer", b'{"inputs": []}')
    assert status == 400
    assert "inputs: List should have at least 1 item" in json.loads(body)["error"]
    assert inner.bodies == []


V2_DEEP = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.5] * 4}]}
V2_CLF = {"inputs": [{"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [0.1] * 5}]}


def chunked(body: dict[str, Any]) -> Iterator[bytes]:
    """A body without Content-Length (chunked): the hot path passes it on to FastAPI."""
    yield json.dumps(body).encode()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/models/tiny/predict", {"inputs": [ROW, [0.0, -1.5]]}),
        ("/v1/models/clf/predict", {"inputs": [[0.1, 0.2, 0.3, 0.4, 0.5]]}),
        ("/v1/models/deep/predict/mc", {"inputs": [[0.5, -1.0, 2.0, 0.0]], "seed": 9}),
        ("/v1/models/clf/predict/mc", {"inputs": [[0.1] * 5], "n_samples": 7, "seed": 2}),
        ("/v1/models/tiny/predict/mc", {"inputs": [ROW], "seed": 1, "return_samples": True}),
        ("/v1/models/nope/predict", {"inputs": [ROW]}),
        ("/v1/models/tiny/predict", {"inputs": [[1.0, 2.0, 3.0]]}),
        ("/v1/models/tiny/predict/mc", {"inputs": [ROW], "n_samples": 10**6}),
        ("/v2/models/tiny/infer", json.loads(V2_BODY)),
        ("/v2/models/deep/infer", {**V2_DEEP, "parameters": {"seed": 4}}),
        (
            "/v2/models/clf/versions/1/infer",
            {**V2_CLF, "parameters": {"n_samples": 9, "seed": 1}, "id": "a"},
        ),
        ("/v2/models/tiny/versions/7/infer", json.loads(V2_BODY)),
        ("/v2/models/tiny/infer", {"inputs": [{**json.loads(V2_BODY)["inputs"][0], "shape": [1]}]}),
        ("/v2/models/tiny/infer", {**json.loads(V2_BODY), "outputs": [{"name": "mean"}]}),
    ],
)
def test_both_ways_through_answer_the_same(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    fast = client.post(path, json=body)
    slow = client.post(path, content=chunked(body), headers={"content-type": JSON})
    assert fast.status_code == slow.status_code
    assert fast.headers["content-type"] == slow.headers["content-type"]
    assert fast.json() == slow.json()


def test_a_body_cut_off_by_the_size_limit_gets_413(fast: tuple[HotPath, Inner]) -> None:
    app, inner = fast
    headers = [(b"content-length", b"20"), (b"content-type", JSON.encode())]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/models/tiny/predict",
        "headers": headers,
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:  # what BodyLimits's receive does past the limit
        raise HTTPException(413, "request body over the limit of 10 bytes")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"]) == {"detail": "request body over the limit of 10 bytes"}
    assert inner.bodies == []
