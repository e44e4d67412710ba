"""Limits that keep the service answering under any load and any input.

* ``BodyLimits``: bodies over the limit get 413 before they are parsed; bodies that do not
  arrive in time get 408.
* ``JSONGuard``: JSON bodies that are not UTF-8 or nest too deep get a 422 (v2: 400) before
  any parser runs; checked in linear time without recursion.
"""

from __future__ import annotations

import asyncio
import re

import numpy as np
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import InvalidInput
from service.protocols.http.asgi import header, headers, read_body, replay
from service.protocols.http.errors import (
    is_json_media_type,
    v1_error_response,
    v2_error_response,
)

# A JSON string, possibly unterminated. Possessive quantifiers keep the match linear: a body
# of a million backslashes and quotes cannot make the regex backtrack.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


class BodyLimits:
    """Refuse bodies over ``max_bytes`` with 413: at once by Content-Length, else while
    streaming. A body not complete ``read_timeout_s`` after its headers gets 408, and the
    connection closes: a client that stalls mid-body holds nothing for long."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = headers(scope).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        received = 0
        complete = False
        deadline = asyncio.get_running_loop().time() + self.read_timeout_s

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # past the body: a wait for the disconnect, which may be long
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                # FastAPI re-raises HTTPException from body reading; the app answers 408.
                raise HTTPException(408, self._late(), {"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._detail())
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)

    def _detail(self) -> str:
        return f"request body over the limit of {self.max_bytes} bytes"

    def _late(self) -> str:
        return f"request body not received within {self.read_timeout_s:g} s"

    def _too_large(self) -> JSONResponse:
        return JSONResponse({"detail": self._detail()}, status_code=413)


async def buffer_body(scope: Scope, receive: Receive, send: Send) -> bytes | None:
    """The whole body; or None when there is nobody to hand it to: the client went away
    mid-body, or ``BodyLimits`` refused it (over the limit, or too slow), and its answer
    has been sent."""
    try:
        return await read_body(receive)
    except HTTPException as exc:
        await JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)(
            scope, receive, send
        )
        return None


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays and objects in ``body``: linear time, no recursion."""
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    if not brackets:
        return 0
    b = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((b == ord("[")) | (b == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def json_problem(body: bytes, max_depth: int) -> str | None:
    """Why ``body`` must not reach the JSON parser, or None when it may."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"body is not UTF-8 (byte {exc.start}); JSON must be sent as UTF-8"
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return None  # too few brackets to nest deeper, wherever they stand
    depth = json_depth(body)
    if depth > max_depth:
        return f"JSON nested {depth} levels deep; the limit is {max_depth}"
    return None


class JSONGuard:
    """422 for a JSON body that is not UTF-8 or nests deeper than ``max_depth``, unparsed.

    Python's JSON parser recurses once per level: a body of ``[[[[...`` would otherwise end
    in a RecursionError inside FastAPI, answered as an undocumented 400 at a depth that
    depends on the stack at hand. Sits inside ``BodyLimits``, so the body it buffers is
    bounded (and a body over the limit still gets its 413).
    """

    def __init__(self, app: ASGIApp, max_depth: int) -> None:
        self.app = app
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_json_media_type(header(scope, b"content-type")):
            await self.app(scope, receive, send)
            return
        body = await buffer_body(scope, receive, send)
        if body is None:
            return
        problem = json_problem(body, self.max_depth)
        if problem is not None:
            error = InvalidInput([], problem)
            # Each protocol answers bad input its own way: v2 with 400 {"error": ...}.
            v2 = scope["path"].startswith("/v2/") and v2_error_response(error)
            await (v2 or v1_error_response(error))(scope, receive, send)
            return
        await self.app(scope, replay(body, receive), send)
