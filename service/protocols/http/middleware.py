"""The ASGI middleware every HTTP request passes first: its id, its metrics, its access line.

``Observed`` is pure ASGI (nothing buffered). It takes the caller's ``X-Request-ID`` when it
looks like an id (else makes one), echoes it in the response, counts and times the request
by route template, model and status, and writes its access line (``serving.observe``):
``{"ts", "request_id", "method", "path", "endpoint", "status", "latency_ms", "model", ...}``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.protocols.http.asgi import headers
from service.serving import observe
from service.serving.jobs import ClientGone, client_gone
from service.serving.metrics import Metrics

HEADER = b"x-request-id"


def request_id(scope: Scope) -> str:
    """The caller's ``X-Request-ID`` when it looks like an id, else a fresh one."""
    value = headers(scope).get(HEADER)
    return observe.request_id(None if value is None else value.decode("latin-1"))


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
        client = _Client(receive)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER, rid.encode())]
            await send(message)

        gone_token = client_gone.set(client.wait_gone)
        self.metrics.in_flight.inc()
        with observe.record() as fields:
            try:
                await self.app(scope, client.receive, send_with_id)
            except (ClientGone, ClientDisconnect):
                client.gone = True
            finally:
                seconds = time.perf_counter() - start
                client_gone.reset(gone_token)
                self.metrics.in_flight.dec()
                if client.gone and status == 500:  # nothing, or only our 500, was sent
                    status = CLIENT_CLOSED
                endpoint = getattr(scope.get("route"), "path", None)
                name = scope.get("path_params", {}).get("name")
                model = name if name and self.known_model(name) else ""
                observe.answered(
                    self.metrics,
                    self.access_log,
                    rid,
                    fields,
                    protocol="http",
                    method=scope["method"],
                    path=scope["path"],
                    endpoint=endpoint,
                    model=model,
                    status=status,
                    seconds=seconds,
                )
