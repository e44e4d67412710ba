"""The Open Inference Protocol over gRPC, on the data plane REST uses.

``start`` runs a ``grpc.aio`` server on the service's event loop (each worker's, from the
app's lifespan): the calls of ``inference.GRPCInferenceService`` that tritonclient.grpc makes,
with the same checks, the same parameters and the same bits as REST v2 (``protocols.oip``).
Inputs come in ``raw_input_contents`` (as tritonclient sends them) or ``contents``; every
output goes out in ``raw_output_contents``, the one form tritonclient reads for every type.

Each call passes ``_observed``: its request id (``x-request-id`` metadata, echoed in the
trailing metadata), its count and latency (``protocol="grpc"``), its access line, and its
errors as status codes (``STATUS``): bad input ``INVALID_ARGUMENT`` with REST's message,
unknown model or version ``NOT_FOUND``, overload and loading ``UNAVAILABLE`` with
``retry-after`` in the trailing metadata, past the deadline ``DEADLINE_EXCEEDED``. A bug is
``INTERNAL`` naming the request id, never a traceback sent to the client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from pydantic import ValidationError

from service import __version__
from service.core.errors import (
    RETRY_AFTER_SECONDS,
    ControlRefused,
    DeadlineExceeded,
    InvalidInput,
    ModelLoadFailed,
    ModelNotFound,
    NotReady,
    Overloaded,
    ServiceError,
    VersionNotFound,
)
from service.core.model import ModelConfig
from service.protocols import oip
from service.protocols.grpc import predict_v2_pb2 as pb
from service.protocols.http.schemas_v2 import InferParameters
from service.protocols.tensors import datatype_of, from_bytes, to_bytes
from service.serving import observe
from service.serving.dataplane import DataPlane, InferAnswer, InferRequest
from service.serving.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

#: The name clients call; the messages live in a private package (see predict_v2.proto).
SERVICE = "inference.GRPCInferenceService"

#: The status code of each domain error (REST v2's table is ``http.errors.V2_STATUS``).
STATUS: dict[type[ServiceError], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    VersionNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelLoadFailed: grpc.StatusCode.INVALID_ARGUMENT,
    ControlRefused: grpc.StatusCode.FAILED_PRECONDITION,
}
#: Model control's refusals, by the HTTP status REST gives them.
_AUTH_STATUS = {401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED}


class Refused(Exception):
    """A refusal of this front door's own, with its status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


Context = grpc.aio.ServicerContext[Any, Any]


def _metadata(context: Context, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None


def _parameter_values(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The values of a protocol parameter map (``InferParameter``s), by name."""
    values = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is None:
            raise InvalidInput([where, key], f"{where}.{key[:64]}: the parameter has no value")
        values[key] = getattr(p, which)
    return values


def _set_parameter(target: Any, value: bool | int | float | str) -> None:
    if isinstance(value, bool):  # before int: a bool is an int
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = value


def infer_parameters(request: pb.ModelInferRequest) -> InferParameters:
    """The request's parameters, checked by the schema REST v2 uses (so the same message)."""
    values = _parameter_values(request.parameters, "parameters")
    try:
        return InferParameters.model_validate(values)
    except ValidationError as exc:
        raise InvalidInput(["parameters"], oip.describe(exc.errors(), "parameters")) from None


def input_array(config: ModelConfig, request: pb.ModelInferRequest) -> np.ndarray:
    """The one ``input`` tensor, ``(rows, input_dim)``, from ``raw_input_contents`` or from
    the input's ``contents.fp32_contents``."""
    if not request.inputs:
        raise InvalidInput(["inputs"], f"no inputs; model {config.name!r} takes {oip.INPUT!r}")
    names = [i.name for i in request.inputs]
    spec = request.inputs[0]
    shape = list(spec.shape)
    where = oip.check_input(config, names, spec.datatype, shape)
    if spec.parameters:
        shown = sorted(k[:64] for k in spec.parameters)
        raise InvalidInput(["inputs", 0, "parameters"], f"{where} takes no parameters: {shown}")
    raw = request.raw_input_contents
    if raw:
        if len(raw) != len(request.inputs):
            raise InvalidInput(
                ["raw_input_contents"],
                f"{len(raw)} raw_input_contents for {len(request.inputs)} input(s)",
            )
        if spec.HasField("contents"):
            raise InvalidInput(["inputs", 0], f"{where} has both contents and raw_input_contents")
        return from_bytes(raw[0], shape, spec.datatype, where)
    if not spec.HasField("contents"):
        raise InvalidInput(["inputs", 0], f"{where} has neither contents nor raw_input_contents")
    filled = [field.name for field, _ in spec.contents.ListFields()]
    if filled != ["fp32_contents"]:
        raise InvalidInput(
            ["inputs", 0, "contents"],
            f"{where}: FP32 values go in contents.fp32_contents, not {filled}",
        )
    values = np.array(spec.contents.fp32_contents, dtype=np.float32)
    count = math.prod(shape)
    if values.size != count:
        raise InvalidInput(
            ["inputs", 0, "contents"], f"{where}: {values.size} values; shape {shape} needs {count}"
        )
    return values.reshape(shape)


def check_requested_outputs(request: pb.ModelInferRequest) -> None:
    """Refuse output parameters (tritonclient's ``class_count``): none is served here."""
    for i, out in enumerate(request.outputs):
        if out.parameters:
            shown = sorted(k[:64] for k in out.parameters)
            raise InvalidInput(
                ["outputs", i, "parameters"],
                f"output {out.name[:64]!r} takes no parameters: {shown}",
            )


def infer_response(answer: InferAnswer, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """The answer, every output picked in ``raw_output_contents`` (little-endian, row-major,
    BOOL one byte each): the bytes REST v2's binary extension sends."""
    config = answer.model.config
    response = pb.ModelInferResponse(
        model_name=config.name, model_version=config.version, id=request.id
    )
    if answer.n_samples is not None:
        for key, value in oip.answer_parameters(answer).items():
            _set_parameter(response.parameters[key], value)
    for name, t in oip.pick_outputs(answer.outputs, [o.name for o in request.outputs]):
        response.outputs.add(name=name, datatype=datatype_of(t), shape=list(t.shape))
        response.raw_output_contents.append(to_bytes(t))
    return response


class Servicer:
    """The calls of ``inference.GRPCInferenceService``; each method name is the RPC's."""

    def __init__(self, plane: DataPlane, settings: Settings) -> None:
        self.plane = plane
        self.settings = settings

    async def ServerLive(self, request: Message, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Message, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.readiness().status == "ready")

    async def ServerMetadata(self, request: Message, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="dropout-service", version=__version__, extensions=[oip.REPOSITORY]
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        """Ready once served; not ready while loading or for a repository folder not served
        (as Triton); ``NOT_FOUND`` for a name that is neither."""
        try:
            self.plane.model(request.name, request.version or None)
            observe.annotate(model=request.name)
        except NotReady:
            return pb.ModelReadyResponse(ready=False)
        except ModelNotFound:
            if any(e.name == request.name for e in self.plane.index()):
                return pb.ModelReadyResponse(ready=False)
            raise
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        config = self.plane.model(request.name, request.version or None).config
        observe.annotate(model=config.name)

        def tensors(specs: list[oip.TensorSpec]) -> list[Any]:
            make = pb.ModelMetadataResponse.TensorMetadata
            return [make(name=t.name, datatype=t.datatype, shape=t.shape) for t in specs]

        return pb.ModelMetadataResponse(
            name=config.name,
            versions=[config.version],
            platform=oip.PLATFORM,
            inputs=tensors(oip.input_specs(config)),
            outputs=tensors(oip.output_specs(config)),
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        """Eval, or MC dropout when the parameters name ``n_samples``, ``seed``,
        ``return_samples``, ``coverage`` or ``target_se``: as REST v2."""
        version = request.model_version or None
        model = self.plane.model(request.model_name, version)
        x = input_array(model.config, request)
        p = infer_parameters(request)
        check_requested_outputs(request)
        mc = oip.mc_params(p.n_samples, p.seed, p.return_samples, p.coverage, p.target_se)
        answer = await self.plane.infer(InferRequest(model.config.name, x, version, mc))
        return infer_response(answer, request)

    # -- the repository extension (model control), behind the admin token -----------------

    def _require_admin(self, context: Context) -> None:
        refusal = oip.admin_refusal(
            self.settings.admin_token, _metadata(context, "authorization") or ""
        )
        if refusal is not None:
            status, message = refusal
            raise Refused(_AUTH_STATUS[status], message)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        self._require_admin(context)
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                entry(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in self.plane.index(ready_only=request.ready)
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        """(Re)load the folder as it is on disk; a config or files sent along are refused."""
        self._require_admin(context)
        if request.parameters:
            shown = sorted(k[:64] for k in request.parameters)
            raise InvalidInput(
                ["parameters"],
                f"parameters {shown}: this server loads the model's folder as it is on disk",
            )
        await self.plane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        self._require_admin(context)
        values = _parameter_values(request.parameters, "parameters")
        dependents = values.pop("unload_dependents", False)
        if values or not isinstance(dependents, bool):
            raise InvalidInput(
                ["parameters"], "unload takes one parameter, unload_dependents (bool)"
            )
        await self.plane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


Handler = Callable[[Any, Context], Awaitable[Message]]


@dataclass(frozen=True)
class Malformed:
    """Bytes that do not parse as the call's request message (grpc would answer UNKNOWN)."""

    message_type: str


def _parser(message_type: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Malformed(message_type.__name__)

    return parse


def _observed(method: str, handler: Handler, metrics: Metrics, access_log: bool) -> Handler:
    """``handler`` with its request id, metrics, access line, and errors as status codes."""
    endpoint = f"/{SERVICE}/{method}"

    async def call(request: Any, context: Context) -> Message:
        rid = observe.request_id(_metadata(context, "x-request-id"))
        trailing: list[tuple[str, str]] = [("x-request-id", rid)]
        code, message = grpc.StatusCode.OK, ""
        start = time.perf_counter()
        metrics.in_flight.inc()
        with observe.record() as fields:
            try:
                try:
                    if isinstance(request, Malformed):
                        raise InvalidInput(
                            [], f"the request does not parse as a {request.message_type} message"
                        )
                    response = await handler(request, context)
                except ServiceError as exc:
                    code, message = STATUS[type(exc)], str(exc)
                    if code is grpc.StatusCode.UNAVAILABLE:
                        trailing.append(("retry-after", str(RETRY_AFTER_SECONDS)))
                except Refused as exc:
                    code, message = exc.code, str(exc)
                except asyncio.CancelledError:  # the client left, or its deadline passed
                    remaining = context.time_remaining()
                    late = remaining is not None and remaining <= 0
                    code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
                    raise
                except Exception:
                    log.exception("gRPC %s failed (request id %s)", method, rid)
                    code = grpc.StatusCode.INTERNAL
                    message = f"internal error; the server log has it under request id {rid}"
                else:
                    context.set_trailing_metadata(tuple(trailing))
                    return response
                await context.abort(code, message, trailing_metadata=tuple(trailing))
                raise AssertionError("abort returns only by raising")  # pragma: no cover
            finally:
                seconds = time.perf_counter() - start
                metrics.in_flight.dec()
                model = fields.get("model") or ""
                observe.answered(
                    metrics,
                    access_log,
                    rid,
                    fields,
                    protocol="grpc",
                    method="POST",
                    path=endpoint,
                    endpoint=endpoint,
                    model=model,
                    status=code.name,
                    seconds=seconds,
                )

    return call


def add_inference_service(
    server: grpc.aio.Server, servicer: Servicer, metrics: Metrics, access_log: bool
) -> None:
    """Register ``servicer``'s methods under ``inference.GRPCInferenceService``; calls this
    service does not serve answer ``UNIMPLEMENTED``."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for m in service.methods:
        request_type = getattr(pb, m.input_type.name)
        response_type = getattr(pb, m.output_type.name)
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            _observed(m.name, getattr(servicer, m.name), metrics, access_log),
            request_deserializer=_parser(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(plane: DataPlane, settings: Settings) -> grpc.aio.Server:
    """Listen on ``settings.grpc_port`` beside HTTP, on the running event loop. Raises
    ``RuntimeError`` when the port cannot be bound."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            # Workers share the port (the kernel spreads connections); one alone refuses a
            # port another process holds instead of splitting its traffic.
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ],
        maximum_concurrent_rpcs=settings.max_connections,
    )
    servicer = Servicer(plane, settings)
    add_inference_service(server, servicer, plane.metrics, settings.access_log)
    where = address(settings.host, settings.grpc_port)
    try:
        server.add_insecure_port(where)
    except RuntimeError:
        raise RuntimeError(
            f"gRPC cannot listen on {where} (in use, or not an address of this machine): "
            "set DROPOUT_GRPC_PORT (--grpc-port) to a free port, or 0 to turn gRPC off"
        ) from None
    await server.start()
    log.info("gRPC (Open Inference Protocol) listening on %s", where)
    return server
