"""How uvicorn serves the app: the HTTP protocol with read deadlines, and the server options
that both ``dropout-service serve`` and the tests use.

uvicorn has no deadline for reading a request: a client that sends half its headers, or
headers and the start of a body, then stalls, holds its connection for as long as it likes
(nginx answers such clients 408 after ``client_header_timeout`` and ``client_body_timeout``).
``ReadTimeoutProtocol`` gives the headers ``read_timeout_s`` from the connection's start or
the request's first byte; ``limits.BodyLimits`` gives the body as long again.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.serving.metrics import MULTIPROC_DIR
from service.settings import Settings


def timeout_response(what: str, seconds: float) -> tuple[str, bytes]:
    """The detail and JSON body of a 408 for ``what`` ("headers" or "body")."""
    detail = f"request {what} not received within {seconds:g} s"
    return detail, orjson.dumps({"detail": detail})


class ReadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline for the request headers."""

    def __init__(self, *args: Any, read_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s
        self._headers_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._headers_timer = self.loop.call_later(self.read_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _headers_late(self) -> None:
        self._headers_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm()  # a pipelined request waits for the one being answered
            return
        _, body = timeout_response("headers", self.read_timeout_s)
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()


def uvicorn_options(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` or ``uvicorn.Config`` from the settings."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,  # service.serving.observe writes one JSON line per request instead
        # asyncio's own event loop, not uvloop: with small jobs computing on the loop and 64
        # clients, uvloop left a few percent of requests waiting about a second before their
        # handler ran (MC T=100: p99 1.1 s against p50 54 ms), where asyncio's loop serves
        # them in turn (p99 56 ms) at the same requests/s (bench/loops.py, benchmarks.md).
        "loop": "asyncio",
        # A partial of a module-level class: workers are spawned, and it must pickle.
        "http": functools.partial(ReadTimeoutProtocol, read_timeout_s=settings.read_timeout_s),
        # uvicorn answers 503 once this many connections are open, counting the new one.
        "limit_concurrency": settings.max_connections + 1,
    }
    return {**options, **overrides}


@contextmanager
def metrics_dir(workers: int) -> Iterator[None]:
    """With several workers, a folder where each writes its metrics, so that any worker's
    /metrics counts them all (prometheus_client's multiprocess mode). The workers inherit
    ``PROMETHEUS_MULTIPROC_DIR``; a folder the operator named is emptied first, as
    prometheus_client requires, and one made here is removed at the end."""
    if workers == 1 and not os.environ.get(MULTIPROC_DIR):
        yield
        return
    named = os.environ.get(MULTIPROC_DIR)
    folder = Path(named) if named else Path(tempfile.mkdtemp(prefix="dropout-service-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_DIR] = str(folder)
    try:
        yield
    finally:
        if not named:
            shutil.rmtree(folder, ignore_errors=True)
