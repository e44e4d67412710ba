"""Limits that keep the service answering under any load.

* ``BodySizeLimit``: bodies over the limit get 413 before they are parsed.
* ``Admission``: a bounded number of requests per model in the runtime at once (queued or
  computing); past it a fast 503 with Retry-After, never an unbounded queue. Each admitted
  request has a deadline; past it a 504 rather than a hang.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import DeadlineExceeded, Overloaded
from service.metrics import Metrics


class BodySizeLimit:
    """Refuse bodies over ``max_bytes``: at once by Content-Length, else while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPException from body reading; the app answers 413.
                    raise HTTPException(413, self._detail())
            return message

        await self.app(scope, limited, send)

    def _detail(self) -> str:
        return f"request body over the limit of {self.max_bytes} bytes"

    def _too_large(self) -> JSONResponse:
        return JSONResponse({"detail": self._detail()}, status_code=413)


class Admission:
    """Per-model admission control and deadlines for the runtime."""

    def __init__(self, max_pending: int, timeout_s: float, metrics: Metrics) -> None:
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._pending: Counter[str] = Counter()

    @asynccontextmanager
    async def admit(self, model: str) -> AsyncIterator[None]:
        """Hold one of ``model``'s slots for the body; raise ``Overloaded`` if none is free
        and ``DeadlineExceeded`` if the body outlives the deadline (its queued work is
        cancelled; a forward pass already running finishes in its thread, unobserved)."""
        if self._pending[model] >= self.max_pending:
            self.metrics.rejected.labels(model, "overloaded").inc()
            raise Overloaded(
                f"model {model!r} has {self.max_pending} requests in progress; retry later"
            )
        self._pending[model] += 1
        self.metrics.pending.labels(model).inc()
        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            self.metrics.rejected.labels(model, "deadline").inc()
            raise DeadlineExceeded(
                f"model {model!r} did not answer within {self.timeout_s:g} s"
            ) from None
        finally:
            self._pending[model] -= 1
            self.metrics.pending.labels(model).dec()
