"""Structured access log: one JSON line per request, with a request id, never input data.

``Observed`` is a pure ASGI middleware (nothing buffered). It takes the caller's
``X-Request-ID`` when it looks like an id (else makes one), echoes it in the response, and
when the response ends writes ``{"request_id", "method", "path", "endpoint", "model",
"status", "latency_ms", ...}``. Code serving the request adds fields (model, rows,
n_samples, queue and compute times) with ``annotate``: it writes to a record that the
middleware put in a context variable, so the runtime needs no handle on the HTTP request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.protocols.http.asgi import headers
from service.serving.jobs import ClientGone, client_gone
from service.serving.metrics import Metrics

LOGGER = "dropout.access"
HEADER = b"x-request-id"

#: Incoming ids are echoed and logged, so only plain, bounded ones are taken.
_VALID_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")

_record: ContextVar[dict[str, Any] | None] = ContextVar("access_record", default=None)

log = logging.getLogger(LOGGER)


def annotate(**fields: Any) -> None:
    """Add fields to the access-log line of the request being served (if any)."""
    record = _record.get()
    if record is not None:
        record.update(fields)


class BatchedStdout(logging.Handler):
    """Writes each record's message as a line on stdout, gathered for ``FLUSH_S`` seconds.

    A write and flush per request cost more than the forward pass of a small model under
    load (docs/benchmarks.md); this handler holds the lines of one short window and writes
    them at once, from the event loop, so a line trails its response by ``FLUSH_S`` at most.
    Outside an event loop (and at interpreter exit, via ``logging.shutdown``) it writes
    at once.
    """

    FLUSH_S = 0.05

    def __init__(self) -> None:
        super().__init__()
        self._lines: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush awaits on

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.append(record.getMessage())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: nothing would flush later
            self.flush()
            return
        if self._flush_on is not loop:  # none pending, or pending on a loop since stopped
            self._flush_on = loop
            loop.call_later(self.FLUSH_S, self.flush)

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._flush_on = None
            if self._lines:
                lines, self._lines = self._lines, []
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()


def flush_access_log() -> None:
    """Write out the access lines still gathered (at shutdown)."""
    for handler in log.handlers:
        handler.flush()


def configure_access_log() -> None:
    """Send access lines, bare JSON, to stdout (batched, see ``BatchedStdout``). Each app
    says whether it writes them (``Observed``); other handlers can be added to the
    ``dropout.access`` logger as to any other, and its level silences every app."""
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    log.propagate = False
    if not any(isinstance(h, BatchedStdout) for h in log.handlers):
        log.addHandler(BatchedStdout())


def request_id(scope: Scope) -> str:
    """The caller's ``X-Request-ID`` when it looks like an id, else a fresh one."""
    value = headers(scope).get(HEADER)
    if value is not None and _VALID_ID.fullmatch(value):
        return value.decode("ascii")
    return uuid.uuid4().hex


#: nginx's status for a client that closed the connection before its answer was sent.
CLIENT_CLOSED = 499


class _Client:
    """Watches a request's ``receive`` for the end of its body and for a disconnect."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.body_done = False
        self.gone = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.gone = True
        elif not message.get("more_body", False):
            self.body_done = True
        return message

    async def wait_gone(self) -> None:
        """Return once the client has disconnected (asked only after the body was read)."""
        while not self.gone:
            if not self.body_done:  # the app still reads the body: not ours to take
                await asyncio.Event().wait()
            await self.receive()


class Observed:
    """What every HTTP request leaves behind, in one pure-ASGI wrapper: its id (taken from
    or added as ``X-Request-ID``), its Prometheus count and latency (``Metrics``), and its
    access-log line (when ``access_log``). Outermost, so the latency covers the whole answer.

    A client that disconnects before its answer is counted and logged as 499, with nothing
    sent: mid-body, or while its job computes (the job stops: ``jobs.client_gone``).
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        known_model: Callable[[str], bool],
        access_log: bool = True,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.known_model = known_model  # keeps the model label's values bounded
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        record: dict[str, Any] = {"model": None, "n_samples": None}
        client = _Client(receive)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER, rid.encode())]
            await send(message)

        token = _record.set(record)
        gone_token = client_gone.set(client.wait_gone)
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, client.receive, send_with_id)
        except (ClientGone, ClientDisconnect):
            client.gone = True
        finally:
            seconds = time.perf_counter() - start
            client_gone.reset(gone_token)
            _record.reset(token)
            self.metrics.in_flight.dec()
            if client.gone and status == 500:  # nothing, or only our 500, was sent
                status = CLIENT_CLOSED
            self.metrics.observe_request(scope, status, seconds, self.known_model)
            if self.access_log and log.isEnabledFor(logging.INFO):
                self._write(scope, rid, status, seconds, record)

    @staticmethod
    def _write(scope: Scope, rid: str, status: int, seconds: float, record: dict[str, Any]) -> None:
        route = scope.get("route")
        line = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": rid,
            "method": scope["method"],
            "path": scope["path"],
            "endpoint": getattr(route, "path", None),
            "status": status,
            "latency_ms": round(seconds * 1000, 3),
            **record,
        }
        # makeRecord + handle is log.info without findCaller's walk up the stack: the caller
        # is always this line.
        message = orjson.dumps(line).decode()
        log.handle(log.makeRecord(LOGGER, logging.INFO, __file__, 0, message, (), None))
