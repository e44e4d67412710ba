"""The hot routes answered without FastAPI's machinery: v1 predict and predict/mc, and v2
infer (with or without a version).

FastAPI's request handling (matching every route, solving dependencies, its exception
middleware) costs about as much as the bare app's whole request, more than the forward pass
of a small model (docs/benchmarks.md). ``HotPath`` matches the three routes itself, reads
the body and calls the very functions the FastAPI routes call (``v1.answer``,
``v2.infer_response``), so an answer is the same bytes whichever way it came, and both go
through the one data plane.

Error answers keep one source per protocol: a v1 body that does not validate, or that
``JSONGuard`` would refuse, goes on to FastAPI unchanged (the buffered body replayed), whose
handlers word every 422; domain errors get ``v1_error_response``, what FastAPI's handler
for them sends. v2 errors all come from ``v2_error_response``, as on v2's FastAPI routes. A
request without Content-Length (a chunked body), with a path parameter FastAPI would
refuse, or to any other route goes on to FastAPI too.

It sits inside ``BodyLimits`` (a Content-Length over the limit never reaches it) and
outside ``JSONGuard``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.errors import ServiceError
from service.protocols.http import v1, v2
from service.protocols.http.asgi import header, headers, replay
from service.protocols.http.errors import (
    is_json_media_type,
    v1_error_response,
    v2_error_response,
)
from service.protocols.http.limits import buffer_body, json_problem
from service.protocols.http.schemas_v1 import MCRequest, PredictRequest
from service.protocols.tensors import HEADER_LENGTH
from service.serving.dataplane import DataPlane

_V1 = re.compile(r"/v1/models/(?P<name>[^/]{1,256})/predict(?P<mc>/mc)?")
_V2 = re.compile(r"/v2/models/(?P<name>[^/]{1,256})(?:/versions/(?P<version>[^/]{1,64}))?/infer")
_HEADER_LENGTH = HEADER_LENGTH.lower().encode()

#: Answers a matched request from its body; None passes it on to FastAPI.
Handler = Callable[[re.Match[str], Scope, bytes], Awaitable[Response | None]]


class HotPath:
    """Serves well-formed requests to the hot routes through the data plane directly."""

    def __init__(
        self, app: ASGIApp, plane: DataPlane, routes: dict[str, Any], max_json_depth: int
    ) -> None:
        self.app = app
        self.plane = plane
        self.max_json_depth = max_json_depth  # deeper JSON goes on, for JSONGuard's answer
        # The FastAPI routes these requests would have matched, by path template: metrics
        # and the access log read the template from ``scope["route"]``.
        self.routes = routes
        self._handlers: list[tuple[re.Pattern[str], Handler]] = [
            (_V1, self._v1),
            (_V2, self._v2),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        found = next(
            ((m, h) for p, h in self._handlers if (m := p.fullmatch(scope["path"])) is not None),
            None,
        )
        if found is None:
            await self.app(scope, receive, send)
            return
        match, handle = found
        if b"content-length" not in headers(scope):
            await self.app(scope, receive, send)
            return
        body = await buffer_body(scope, receive, send)
        if body is None:
            return
        scope["path_params"] = {k: v for k, v in match.groupdict().items() if v is not None}
        response = await handle(match, scope, body)
        if response is None:
            await self.app(scope, replay(body, receive), send)
            return
        await response(scope, receive, send)

    def _route(self, scope: Scope, template: str) -> None:
        scope["route"] = self.routes[template]

    async def _v1(self, match: re.Match[str], scope: Scope, body: bytes) -> Response | None:
        if not is_json_media_type(header(scope, b"content-type")):
            return None
        mc = match["mc"] is not None
        try:
            if json_problem(body, self.max_json_depth) is not None:
                return None
            request = (MCRequest if mc else PredictRequest).model_validate_json(body)
        except ValueError:  # pydantic's ValidationError too: FastAPI words the 422
            return None
        self._route(scope, "/v1/models/{name}/predict" + ("/mc" if mc else ""))
        try:
            payload = await v1.answer(self.plane, match["name"], request)
        except ServiceError as exc:
            return v1_error_response(exc)
        return v1.json_response(payload)

    async def _v2(self, match: re.Match[str], scope: Scope, body: bytes) -> Response | None:
        json = is_json_media_type(header(scope, b"content-type"))
        if json and json_problem(body, self.max_json_depth) is not None:
            return None
        versioned = "/versions/{version}" if match["version"] is not None else ""
        self._route(scope, f"/v2/models/{{name}}{versioned}/infer")
        length = headers(scope).get(_HEADER_LENGTH)
        try:
            return await v2.infer_response(
                self.plane,
                match["name"],
                match["version"],
                body,
                None if length is None else length.decode("latin-1"),
            )
        except Exception as exc:
            response = v2_error_response(exc)
            if response is None:
                raise
            return response
