"""The short way through for v1 predict: what it takes, what it passes on, same answers."""

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
from service.protocols.http import v1
from service.protocols.http.hotpath import FastPredict
from service.serving.dataplane import Runtime
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
    app: Any, path: str, body: bytes, *, method: str = "POST", content_type: str | None = JSON
) -> tuple[int, bytes]:
    headers = [(b"content-length", str(len(body)).encode())]
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
def fast(model_dir: Path) -> Iterator[tuple[FastPredict, Inner]]:
    runtime = Runtime(Settings(model_dir=model_dir, batching=False))
    runtime.repository = ModelRepository.load(model_dir)
    inner = Inner()
    routes = {route.path: route for route in v1.router.routes}  # type: ignore[attr-defined]
    yield FastPredict(inner, runtime, routes, max_json_depth=3), inner
    runtime.close()


def test_well_formed_predict_and_mc_are_answered_without_fastapi(
    fast: tuple[FastPredict, Inner],
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
        ("/v1/models/tiny/predict", b'{"inputs": [[1, 2]], "x": [[[1]]]}', {}),  # too deep
    ],
)
def test_anything_else_goes_on_to_fastapi_with_its_body(
    fast: tuple[FastPredict, Inner], path: str, body: bytes, kwargs: dict[str, Any]
) -> None:
    app, inner = fast
    assert call(app, path, body, **kwargs) == (299, b"inner")
    assert inner.bodies == [body]


def test_runtime_errors_get_the_service_error_answers(fast: tuple[FastPredict, Inner]) -> None:
    app, inner = fast
    status, body = call(app, "/v1/models/nope/predict", b'{"inputs": [[1, 2]]}')
    assert status == 404
    assert "nope" in json.loads(body)["detail"]
    status, body = call(app, "/v1/models/tiny/predict", b'{"inputs": [[1, 2, 3]]}')
    assert status == 422
    assert json.loads(body)["detail"][0]["loc"] == ["body", "inputs", 0]
    assert inner.bodies == []


def chunked(body: dict[str, Any]) -> Iterator[bytes]:
    """A body without Content-Length (chunked): the short way passes it on to FastAPI."""
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


def test_a_body_cut_off_by_the_size_limit_gets_413(fast: tuple[FastPredict, Inner]) -> None:
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
