"""The Open Inference Protocol (KServe V2) REST API, beside v1 on the same data plane.

Eval requests answer output ``output`` (FP32, as the engine computes it). Request parameters
``n_samples``, ``seed`` or ``return_samples`` select Monte-Carlo dropout, answered as FP64
tensors ``mean``, ``variance``, ``std`` and the task's extras: the engine's float64 summaries,
so v2 and v1 carry the same bits. Errors are the protocol's ``{"error": "..."}``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
import torch
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.routing import Match

from service import __version__
from service.core.errors import (
    RETRY_AFTER_SECONDS,
    InvalidInput,
    VersionNotFound,
    v2_error_response,
)
from service.core.model import ModelConfig
from service.core.repository import LoadedModel
from service.protocols.http import health
from service.protocols.http.deps import RuntimeDep
from service.protocols.http.schemas_v2 import (
    ErrorV2,
    InferenceRequest,
    InferenceResponse,
    InferParameters,
    ModelMetadata,
    ModelReady,
    RequestOutput,
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
    from_json,
    split_body,
    to_bytes,
    to_json,
)
from service.serving.outputs import mc_outputs

INPUT = "input"
OUTPUT = "output"
INPUT_DATATYPE = "FP32"
EXTENSIONS = ["binary_tensor_data"]


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


def served(request: Request, runtime: RuntimeDep, name: str = ModelName) -> LoadedModel:
    """The model the path names, in the version it names (``_version`` declares that)."""
    model = runtime.model(name)
    version = request.path_params.get("version")
    if version is not None and version != model.config.version:
        raise VersionNotFound(name, version, model.config.version)
    return model


def _version(
    version: str = Path(description="Model version, as its config.json states.", max_length=64),
) -> None:
    """Validates and documents ``{version}`` on the versioned paths; ``served`` reads it."""


ServedModel = Annotated[LoadedModel, Depends(served)]
_VERSIONED: dict[str, Any] = {"dependencies": [Depends(_version)]}


def model_metadata(config: ModelConfig, replay: dict[str, str | int]) -> ModelMetadata:
    rows, out = -1, config.output_dim
    mc = ["mean", "variance", "std"]
    if config.noise_variance is not None:
        mc.append("predictive_variance")
    outputs = [TensorMetadata(name=OUTPUT, datatype="FP32", shape=[rows, out])]
    outputs += [TensorMetadata(name=n, datatype="FP64", shape=[rows, out]) for n in mc]
    if config.task == "classification":
        outputs += [
            TensorMetadata(name=n, datatype="FP64", shape=[rows])
            for n in ("entropy", "mutual_information")
        ]
    outputs.append(TensorMetadata(name="samples", datatype="FP32", shape=[-1, rows, out]))
    return ModelMetadata(
        name=config.name,
        versions=[config.version],
        platform="pytorch",
        inputs=[
            TensorMetadata(name=INPUT, datatype=INPUT_DATATYPE, shape=[rows, config.input_dim])
        ],
        outputs=outputs,
        parameters=dict(replay),
    )


@router.get("/health/live", response_model=ServerLive)
async def live() -> ServerLive:
    """200 while the process lives."""
    return ServerLive(live=True)


@router.get("/health/ready", response_model=ServerReady, responses={503: {"model": ServerReady}})
async def ready(runtime: RuntimeDep) -> Response:
    """200 when /readyz is: every model loaded (or partial readiness allowed); else 503."""
    ok = health.readiness(runtime).status == "ready"
    body = ServerReady(ready=ok).model_dump_json()
    if ok:
        return Response(body, media_type="application/json")
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return Response(body, status_code=503, headers=retry, media_type="application/json")


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """Server name, version and protocol extensions."""
    return ServerMetadata(name="dropout-service", version=__version__, extensions=EXTENSIONS)


@router.get("/models/{name}", response_model=ModelMetadata, responses=_ERRORS)
@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=_ERRORS,
    **_VERSIONED,
)
async def get_model(model: ServedModel, runtime: RuntimeDep) -> ModelMetadata:
    """Inputs and outputs with datatypes and shapes (-1: any number of rows), and in
    `parameters` what a replay of an answer depends on."""
    return model_metadata(model.config, runtime.replay_scope(model))


@router.get("/models/{name}/ready", response_model=ModelReady, responses=_ERRORS)
@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=ModelReady,
    responses=_ERRORS,
    **_VERSIONED,
)
async def model_ready(model: ServedModel) -> ModelReady:
    """200 once the model is loaded; 404 unknown, 503 while loading."""
    return ModelReady(name=model.config.name, ready=True)


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
async def infer(request: Request, runtime: RuntimeDep, model: ServedModel) -> Response:
    """Eval prediction, or MC dropout when parameters name `n_samples`, `seed` or
    `return_samples`. The body is JSON (any or no Content-Type), or a JSON header of
    `Inference-Header-Content-Length` bytes followed by binary tensors."""
    header, tail = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
    body = InferenceRequest.model_validate_json(header)
    x = input_tensor(model.config, body, tail)
    params = body.parameters or InferParameters()
    answer_params: dict[str, Any] | None = None
    if params.monte_carlo:
        mc = await runtime.predict_mc(
            model.config.name, x, params.n_samples, params.seed, bool(params.return_samples)
        )
        outputs = mc_outputs(mc.model.config, mc.result)
        answer_params = {"n_samples": mc.n_samples, "seed": mc.seed}
    else:
        _, y = await runtime.predict(model.config.name, x)
        outputs = {OUTPUT: y}
    return encode(model.config, body, params, outputs, answer_params)


def input_tensor(config: ModelConfig, body: InferenceRequest, tail: bytes) -> torch.Tensor:
    """The one ``input`` tensor, ``(rows, input_dim)`` FP32, from JSON data or binary bytes."""
    if len(body.inputs) != 1 or body.inputs[0].name != INPUT:
        names = [i.name[:64] for i in body.inputs]
        raise InvalidInput(
            ["inputs"], f"inputs {names}: model {config.name!r} takes one input, {INPUT!r}"
        )
    spec = body.inputs[0]
    where = f"input {INPUT!r}"
    if spec.datatype != INPUT_DATATYPE:
        raise InvalidInput(
            ["inputs", 0, "datatype"],
            f"{where} has datatype {spec.datatype[:16]!r}; model {config.name!r} takes "
            f"{INPUT_DATATYPE}",
        )
    if len(spec.shape) != 2 or spec.shape[0] < 1 or spec.shape[1] != config.input_dim:
        raise InvalidInput(
            ["inputs", 0, "shape"],
            f"{where} has shape {spec.shape[:8]}; model {config.name!r} takes "
            f"[rows >= 1, {config.input_dim}]",
        )
    size = spec.parameters.binary_data_size if spec.parameters else None
    (raw,) = binary_chunks([size], tail)
    if raw is not None:
        if spec.data is not None:
            raise InvalidInput(["inputs", 0], f"{where} has both data and binary_data_size")
        return from_bytes(raw, spec.shape, spec.datatype, where)
    if spec.data is None:
        raise InvalidInput(["inputs", 0], f"{where} has neither data nor binary_data_size")
    return from_json(spec.data, spec.shape, spec.datatype, where)


def encode(
    config: ModelConfig,
    body: InferenceRequest,
    params: InferParameters,
    outputs: dict[str, torch.Tensor],
    answer_params: dict[str, Any] | None,
) -> Response:
    """The response: JSON, or a JSON header followed by the outputs asked for as binary."""
    requested = body.outputs or [RequestOutput(name=n) for n in outputs]
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in requested:
        t = outputs.get(out.name)
        if t is None:
            raise InvalidInput(["outputs"], unknown_output(out.name, list(outputs)))
        entry: dict[str, Any] = {
            "name": out.name,
            "shape": list(t.shape),
            "datatype": datatype_of(t),
        }
        flag = out.parameters.binary_data if out.parameters else None
        if params.binary_data_output if flag is None else flag:
            chunks.append(to_bytes(t))
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = to_json(t)
        entries.append(entry)
    answer: dict[str, Any] = {"model_name": config.name, "model_version": config.version}
    if body.id is not None:
        answer["id"] = body.id
    if answer_params is not None:
        answer["parameters"] = answer_params
    answer["outputs"] = entries
    header = orjson.dumps(answer)
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def unknown_output(name: str, available: list[str]) -> str:
    hint = ""
    if name == "samples":
        hint = "; set parameter return_samples to true"
    elif name != OUTPUT and OUTPUT in available:
        hint = "; MC outputs need parameter n_samples, seed or return_samples"
    return f"output {name[:64]!r} is not in this answer: {available}{hint}"


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
async def unsupported(request: Request, path: str) -> Response:
    """Endpoints of protocol extensions this server lacks answer in the protocol's format."""
    allowed = sorted(  # this catch-all also meets PUT /v2/health/live: that path exists, 405
        method
        for route in router.routes
        if isinstance(route, APIRoute) and route.endpoint is not unsupported
        if route.matches(request.scope)[0] is Match.PARTIAL
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
