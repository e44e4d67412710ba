"""Where an eval request's time goes: the ASGI apps called in process, no sockets.

Each variant is one app answering the same one-row eval request of the shipped concrete
model; the variants run round-robin, so a slow patch of a shared machine hits them alike,
and the table reports each one's median time per request. Differences between rows are the
cost of what the rows differ by: the HTTP server and the load generator are not in it.
Run: python bench/request_path.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch
from bare_app import app as bare_app

from service.app import create_app
from service.protocols.http.schemas_v1 import PredictRequest
from service.serving.batching import blocked_predict
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
ROW = [540.0, 0.0, 0.0, 162.0, 2.5, 1040.0, 676.0, 28.0]
BODY = orjson.dumps({"inputs": [ROW]})
ANSWER = b'{"model":"bare","version":"1","outputs":[[0.0]]}'

ASGI = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@dataclass
class Variant:
    name: str
    what: str
    one: Callable[[], Awaitable[int]]  # serves one request, returns its status


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Pure ASGI: read the body, validate it with the same pydantic model, send a constant."""
    message = await receive()
    PredictRequest.model_validate_json(message["body"])
    headers = [(b"content-type", b"application/json"), (b"content-length", b"48")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


async def call(app: ASGI, path: str, chunked: bool = False) -> int:
    """One POST through ``app``; returns the status."""
    headers = [(b"host", b"bench"), (b"content-type", b"application/json")]
    if not chunked:
        headers.append((b"content-length", str(len(BODY)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    delivered = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


class _Uncounted:
    """A live count that counts nothing."""

    value = 0  # as a live count reads

    def inc(self, *_: object) -> None: ...
    def dec(self, *_: object) -> None: ...


def no_metrics(metrics: Any) -> None:
    """Turn one app's Prometheus updates into no-ops (its ``Metrics`` instance only)."""
    uncounted = _Uncounted()
    metrics.add = lambda *_: None
    metrics.in_flight = uncounted


async def started(settings: Settings) -> tuple[ASGI, asyncio.Task[None]]:
    """The service app with its lifespan run and its models loaded."""
    app = create_app(settings)
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await messages.put({"type": "lifespan.startup"})
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, messages.get, replies.put)
    )
    assert (await replies.get())["type"] == "lifespan.startup.complete"
    while app.state.plane.repository is None:
        await asyncio.sleep(0.01)
    return app, lifespan


async def variants() -> tuple[list[Variant], list[asyncio.Task[None]]]:
    # No gRPC door: these apps share one process, and measure the HTTP path.
    base = {"model_dir": ROOT / "models", "torch_threads": 1, "grpc_port": 0}
    service, a = await started(Settings(**base))
    threads, b = await started(Settings(**base, inline_max_macs=0))
    unbatched, c = await started(Settings(**base, batching=False))
    quiet, d = await started(Settings(**base, access_log=False))
    uncounted, e = await started(Settings(**base))
    no_metrics(uncounted.state.plane.metrics)  # type: ignore[attr-defined]
    passless, f = await started(Settings(**base))
    answer = torch.zeros(1, 1)
    passless_engine = passless.state.plane.model("concrete").engine  # type: ignore[attr-defined]
    passless_engine.predict = lambda *_: answer
    passless_engine.predict_block = lambda *_: answer
    engine = service.state.plane.model("concrete").engine  # type: ignore[attr-defined]
    x = torch.tensor([ROW])

    def post(app: ASGI, path: str = "/v1/models/concrete/predict", **kw: bool) -> Any:
        return lambda: call(app, path, **kw)

    block_rows = Settings().eval_block_rows

    async def forward_pass() -> int:
        blocked_predict(engine, x, block_rows)
        return 200

    return [
        Variant("pure ASGI", "read the body, validate it with pydantic, send a constant",
                post(raw_app, "/predict")),
        Variant("bare FastAPI", "bench/bare_app.py: FastAPI's routing, body parsing, response",
                post(bare_app, "/predict")),
        Variant("forward pass", f"the {block_rows}-row padded eval block alone (blocked_predict)",
                forward_pass),
        Variant("service", "default settings (hot path, inline compute, batching)",
                post(service)),
        Variant("service, access log off", "DROPOUT_ACCESS_LOG=false", post(quiet)),
        Variant("service, batching off", "DROPOUT_BATCHING=false", post(unbatched)),
        Variant("service, metrics off", "that app's Prometheus updates made no-ops",
                post(uncounted)),
        Variant("service, no forward pass", "that app's engine answers a constant at once",
                post(passless)),
        Variant("service, every job on the threads", "DROPOUT_INLINE_MAX_MACS=0",
                post(threads)),
        Variant("service through FastAPI", "no Content-Length, so the hot path passes it on",
                post(service, chunked=True)),
    ], [a, b, c, d, e, f]  # fmt: skip


async def measure(rounds: int) -> list[tuple[Variant, float]]:
    chosen, lifespans = await variants()
    times: dict[str, list[float]] = {v.name: [] for v in chosen}
    for v in chosen:  # warm-up, and every variant must answer 200
        for _ in range(50):
            assert await v.one() == 200, v.name
    for _ in range(rounds):
        for v in chosen:
            start = time.perf_counter()
            for _ in range(10):
                await v.one()
            times[v.name].append((time.perf_counter() - start) / 10)
    for task in lifespans:
        task.cancel()
    return [(v, statistics.median(times[v.name])) for v in chosen]


def run(rounds: int = 300) -> list[tuple[Variant, float]]:
    """Median seconds per request of each variant; the access log written to /dev/null."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return asyncio.run(measure(rounds))


def table(results: list[tuple[Variant, float]]) -> list[str]:
    bare = next(s for v, s in results if v.name == "bare FastAPI")
    lines = ["| app | what it is | us per request | vs bare FastAPI |", "|---|---|---|---|"]
    for v, seconds in results:
        lines.append(f"| {v.name} | {v.what} | {seconds * 1e6:.0f} | {seconds / bare:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    print("\n".join(table(run(args.rounds))))


if __name__ == "__main__":
    main()
