"""Plain ASGI helpers the middlewares share: one view of a request's headers, its body.

Every middleware reads headers through ``headers``: parsed once per request, the first of
repeated headers winning as in Starlette's ``Request.headers``, so that the size limit, the
JSON guard, the hot path and the handlers never disagree about a Content-Type.
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Message, Receive, Scope

_HEADERS = "dropout.headers"


def headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by (lower-case) name; the first of repeated ones."""
    view: dict[bytes, bytes] | None = scope.get(_HEADERS)
    if view is None:
        view = {}
        for name, value in scope["headers"]:
            view.setdefault(name, value)
        scope[_HEADERS] = view
    return view


def header(scope: Scope, name: bytes) -> str:
    """One header's value as text ("" when absent)."""
    return headers(scope).get(name, b"").decode("latin-1")


async def read_body(receive: Receive) -> bytes | None:
    """The whole body, or None if the client went away before sending it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands over the buffered body once, then defers to the client's."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


class RawResponse(Response):
    """A 200 whose headers are given as they go on the wire: Starlette's header building,
    skipped, is a measurable part of a hot request."""

    def __init__(self, body: bytes, media_type: bytes, *headers: tuple[bytes, bytes]) -> None:
        self.status_code = 200
        self.body = body
        self.background = None
        self.raw_headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", media_type),
            *headers,
        ]
