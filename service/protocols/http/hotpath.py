"""A short way through for the two hot routes: ``POST /v1/models/{name}/predict[/mc]``.

FastAPI's request machinery (matching every route, solving dependencies, its exception
middleware, response models) costs about 95 us a request on this machine, more than the
forward pass of a small model (docs/benchmarks.md). ``FastPredict`` answers a well-formed
request to the two predict routes itself: it validates the body with the routes' own pydantic
models, calls the same runtime and writes the same JSON fields as the FastAPI handlers in
``api/v1.py`` (which stay, for the OpenAPI document and for everything else).

Anything it does not recognise as well formed goes on to FastAPI unchanged (the buffered body
replayed), so the answers to bad input keep one source: another method or path, a path
parameter FastAPI would refuse, no Content-Length (a chunked body), a Content-Type that is not
JSON, a body that does not validate or that ``JSONGuard`` would refuse. Errors the runtime
raises (unknown model, wrong width, overload, deadline) get ``error_response``, the answer
FastAPI's handlers give them.
It sits inside ``BodyLimits`` (a Content-Length over the limit never reaches it) and
outside ``JSONGuard`` (pydantic's JSON parser does not recurse; what it refuses goes on).
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.errors import ServiceError, error_response, is_json_media_type
from service.protocols.http.asgi import header, headers, read_body, replay
from service.protocols.http.limits import http_error_response, json_problem
from service.protocols.http.schemas_v1 import MCRequest, PredictRequest
from service.protocols.http.v1 import MODEL_NAME_MAX, eval_fields, mc_fields
from service.serving.dataplane import Runtime

_PATH = re.compile(r"/v1/models/([^/]+)/predict(/mc)?")
_JSON = (b"content-type", b"application/json")


class FastPredict:
    """Serves well-formed v1 predict and predict/mc requests without FastAPI's machinery."""

    def __init__(
        self, app: ASGIApp, runtime: Runtime, routes: dict[str, Any], max_json_depth: int
    ) -> None:
        self.app = app
        self.runtime = runtime
        self.max_json_depth = max_json_depth  # deeper bodies go on, for JSONGuard's 422
        # The FastAPI routes these requests would have matched, keyed by path template: the
        # metrics and the access log read the template from ``scope["route"]``.
        self.eval_route = routes["/v1/models/{name}/predict"]
        self.mc_route = routes["/v1/models/{name}/predict/mc"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] != "POST" or len(match[1]) > MODEL_NAME_MAX:
            await self.app(scope, receive, send)
            return
        if b"content-length" not in headers(scope) or not is_json_media_type(
            header(scope, b"content-type")
        ):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive)
        except HTTPException as exc:  # BodyLimits: a body over the limit, or too slow
            await http_error_response(exc)(scope, receive, send)
            return
        if body is None:  # the client went away mid-body: nobody to answer
            return
        name, mc = match[1], match[2] is not None
        try:
            if json_problem(body, self.max_json_depth) is not None:
                raise ValueError("not for the short way")
            request = (MCRequest if mc else PredictRequest).model_validate_json(body)
        except ValueError:  # pydantic's ValidationError too: JSONGuard or FastAPI word the 4xx
            await self.app(scope, replay(body, receive), send)
            return
        scope["route"] = self.mc_route if mc else self.eval_route
        scope["path_params"] = {"name": name}
        try:
            if isinstance(request, MCRequest):
                payload = await self._mc(name, request)
            else:
                model, outputs = await self.runtime.predict(name, request.inputs)
                payload = eval_fields(model.config, outputs)
        except ServiceError as exc:
            await error_response(exc)(scope, receive, send)
            return
        answer = orjson.dumps(payload)
        length = (b"content-length", str(len(answer)).encode())
        await send({"type": "http.response.start", "status": 200, "headers": [length, _JSON]})
        await send({"type": "http.response.body", "body": answer})

    async def _mc(self, name: str, request: MCRequest) -> dict[str, Any]:
        answer = await self.runtime.predict_mc(
            name, request.inputs, request.n_samples, request.seed, request.return_samples
        )
        return mc_fields(answer.model.config, answer.n_samples, answer.seed, answer.result)
