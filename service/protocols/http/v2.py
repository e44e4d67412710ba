"""The Open Inference Protocol (KServe V2) over REST, beside v1 on the same data plane.

The protocol's rules (the input, the outputs, the MC parameters) are in ``protocols.oip``;
this module carries them in JSON or in the binary tensor extension. Errors are the
protocol's ``{"error": "..."}`` (``errors.v2_error_response``).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.routing import Match

from service import __version__
from service.core.errors import RETRY_AFTER_SECONDS, InvalidInput
from service.core.model import ModelConfig
from service.core.repository import LoadedModel
from service.protocols import oip
from service.protocols.http.asgi import RawResponse
from service.protocols.http.deps import PlaneDep
from service.protocols.http.errors import v2_error_response
from service.protocols.http.schemas_v2 import (
    ErrorV2,
    InferenceRequest,
    InferenceResponse,
    InferParameters,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
    request_body_schema,
)
from service.protocols.tensors import (
    HEADER_LENGTH,
    binary_chunks,
    datatype_of,
    from_bytes,
    rows_from_json,
    split_body,
    to_bytes,
    to_json,
)
from service.serving.dataplane import DataPlane, InferAnswer, InferRequest


class V2Route(APIRoute):
    """Answers errors of v2 routes as ``{"error": ...}``; v1 keeps its own format."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                answer = v2_error_response(exc)
                if answer is None:
                    raise
                return answer

        return route


router = APIRouter(prefix="/v2", tags=["v2"], route_class=V2Route)

ModelName = Path(description="Model name, as GET /v1/models lists.", max_length=256)
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorV2, "description": "Bad input."},
    404: {"model": ErrorV2, "description": "Unknown model or version."},
    503: {"model": ErrorV2, "description": "Not ready or overloaded; retry after Retry-After."},
}


def _version(
    version: str = Path(description="Model version, as its config.json states.", max_length=64),
) -> None:
    """Validates and documents ``{version}`` on the versioned paths."""


_VERSIONED: dict[str, Any] = {"dependencies": [Depends(_version)]}


def served(plane: DataPlane, request: Request, name: str) -> LoadedModel:
    """The model the path names, in the version it names."""
    return plane.model(name, request.path_params.get("version"))


def model_metadata(plane: DataPlane, model: LoadedModel) -> ModelMetadata:
    def tensors(specs: list[oip.TensorSpec]) -> list[TensorMetadata]:
        return [TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in specs]

    return ModelMetadata(
        name=model.config.name,
        versions=[model.config.version],
        platform=oip.PLATFORM,
        inputs=tensors(oip.input_specs(model.config)),
        outputs=tensors(oip.output_specs(model.config)),
        parameters=dict(plane.replay_scope(model)),
    )


@router.get("/health/live", response_model=ServerLive)
async def live() -> ServerLive:
    """200 while the process lives."""
    return ServerLive(live=True)


@router.get("/health/ready", response_model=ServerReady, responses={503: {"model": ServerReady}})
async def ready(plane: PlaneDep) -> Response:
    """200 when /readyz is: every model loaded (or partial readiness allowed); else 503."""
    ok = plane.readiness().status == "ready"
    body = ServerReady(ready=ok).model_dump_json()
    if ok:
        return Response(body, media_type="application/json")
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return Response(body, status_code=503, headers=retry, media_type="application/json")


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """Server name, version and protocol extensions."""
    return ServerMetadata(name="dropout-service", version=__version__, extensions=oip.EXTENSIONS)


@router.get("/models/{name}", response_model=ModelMetadata, responses=_ERRORS)
@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=_ERRORS,
    **_VERSIONED,
)
async def get_model(plane: PlaneDep, request: Request, name: str = ModelName) -> ModelMetadata:
    """Inputs and outputs with datatypes and shapes (-1: any number of rows), and in
    `parameters` what a replay of an answer depends on."""
    return model_metadata(plane, served(plane, request, name))


@router.get("/models/{name}/ready", response_model=ModelReady, responses=_ERRORS)
@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=ModelReady,
    responses=_ERRORS,
    **_VERSIONED,
)
async def model_ready(plane: PlaneDep, request: Request, name: str = ModelName) -> ModelReady:
    """200 once the model is loaded; 404 unknown, 503 while loading."""
    return ModelReady(name=served(plane, request, name).config.name, ready=True)


_INFER: dict[str, Any] = {
    "response_model": None,
    "responses": {200: {"model": InferenceResponse}, **_ERRORS},
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": request_body_schema()}},
        }
    },
}


@router.post("/models/{name}/infer", **_INFER)
@router.post("/models/{name}/versions/{version}/infer", **_INFER, **_VERSIONED)
async def infer(plane: PlaneDep, request: Request, name: str = ModelName) -> Response:
    """Eval prediction, or MC dropout when parameters name `n_samples`, `seed`,
    `return_samples`, `coverage` or `target_se`. The body is JSON (any or no Content-Type),
    or a JSON header of `Inference-Header-Content-Length` bytes followed by binary tensors."""
    version = request.path_params.get("version")
    body = await request.body()
    return await infer_response(plane, name, version, body, request.headers.get(HEADER_LENGTH))


async def infer_response(
    plane: DataPlane, name: str, version: str | None, body: bytes, header_length: str | None
) -> Response:
    """The answer to an infer body (the route and the hot path both call this)."""
    model = plane.model(name, version)
    header, tail = split_body(body, header_length)
    request = InferenceRequest.model_validate_json(header)
    x = input_tensor(model.config, request, tail)
    params = request.parameters or _NO_PARAMETERS
    mc = oip.mc_params(
        params.n_samples, params.seed, params.return_samples, params.coverage, params.target_se
    )
    answer = await plane.infer(InferRequest(model.config.name, x, version, mc))
    return encode(answer, request, params)


_NO_PARAMETERS = InferParameters()


def input_tensor(
    config: ModelConfig, body: InferenceRequest, tail: bytes
) -> np.ndarray | list[list[float]]:
    """The one ``input`` tensor, ``(rows, input_dim)`` FP32, from JSON data or binary bytes."""
    names = [i.name for i in body.inputs]
    spec = body.inputs[0]
    where = oip.check_input(config, names, spec.datatype, spec.shape)
    size = spec.parameters.binary_data_size if spec.parameters else None
    (raw,) = binary_chunks([size], tail)
    if raw is not None:
        if spec.data is not None:
            raise InvalidInput(["inputs", 0], f"{where} has both data and binary_data_size")
        return from_bytes(raw, spec.shape, spec.datatype, where)
    if spec.data is None:
        raise InvalidInput(["inputs", 0], f"{where} has neither data nor binary_data_size")
    return rows_from_json(spec.data, spec.shape, spec.datatype, where)


def encode(answer: InferAnswer, body: InferenceRequest, params: InferParameters) -> Response:
    """The response: JSON, or a JSON header followed by the outputs asked for as binary."""
    requested = {o.name: o for o in body.outputs or ()}
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, t in oip.pick_outputs(answer.outputs, list(requested)):
        entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "datatype": datatype_of(t)}
        out = requested.get(name)
        flag = out.parameters.binary_data if out is not None and out.parameters else None
        if params.binary_data_output if flag is None else flag:
            chunks.append(to_bytes(t))
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = to_json(t)
        entries.append(entry)
    config = answer.model.config
    head: dict[str, Any] = {"model_name": config.name, "model_version": config.version}
    if body.id is not None:
        head["id"] = body.id
    if answer.n_samples is not None:
        head["parameters"] = oip.answer_parameters(answer)
    header = orjson.dumps({**head, "outputs": entries})
    if not chunks:
        return RawResponse(header, b"application/json")
    return RawResponse(
        b"".join([header, *chunks]),
        b"application/octet-stream",
        (HEADER_LENGTH.lower().encode(), str(len(header)).encode()),
    )


def catch_all(*served: APIRouter) -> APIRouter:
    """A last router for ``/v2/...``: what the ``served`` routers lack answers in the
    protocol's format, 405 where the path exists with other methods, else 404."""
    fallback = APIRouter(prefix="/v2")

    @fallback.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False
    )
    async def unsupported(request: Request, path: str) -> Response:
        allowed = sorted(  # it also meets PUT /v2/health/live: that path exists, 405
            method
            for r in served
            for route in r.routes
            if isinstance(route, APIRoute) and route.matches(request.scope)[0] is Match.PARTIAL
            for method in route.methods or ()
        )
        if allowed:
            return Response(
                orjson.dumps({"error": f"method {request.method} not allowed; use {allowed}"}),
                status_code=405,
                media_type="application/json",
                headers={"Allow": ", ".join(allowed)},
            )
        return Response(
            orjson.dumps({"error": f"/v2/{path[:128]} is not an endpoint of this server"}),
            status_code=404,
            media_type="application/json",
        )

    return fallback
