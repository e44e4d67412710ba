"""Bodies of the Open Inference Protocol (KServe V2) REST API, with the examples /docs shows.

Field names follow the protocol (kserve/open-inference-protocol, inference_rest.md) and the
binary tensor data extension. Requests refuse unknown fields, so a typo is a 400, not a
silently different answer.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, Strict

from service.protocols.http.schemas_v1 import _EXAMPLE_ROW, MAX_SEED, Number

StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]

_INFER_EXAMPLE_INPUT: dict[str, JsonValue] = {
    "name": "input",
    "shape": [1, 8],
    "datatype": "FP32",
    "data": _EXAMPLE_ROW,
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InferParameters(_Request):
    """Request parameters. Naming any of ``n_samples``, ``seed``, ``return_samples``,
    ``coverage``, ``target_se`` selects Monte-Carlo dropout (as v1 ``predict/mc``); none of
    them gives the eval prediction."""

    n_samples: StrictInt | None = Field(
        None, ge=2, description="MC passes T (default and maximum are settings)."
    )
    seed: StrictInt | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of this request's generator; drawn if absent."
    )
    return_samples: StrictBool | None = Field(
        None, description="Also return output `samples`, FP32 [T, rows, outputs]."
    )
    coverage: Number | None = Field(
        None,
        description="0.5 to 0.999: add outputs `interval_lower` and `interval_upper` "
        "(regression) or `prediction_sets` (classification, BOOL [rows, classes]).",
    )
    target_se: Number | None = Field(
        None, description="Stop sampling once every output's MC standard error is at most this."
    )
    binary_data_output: StrictBool = Field(
        False, description="Send every output as binary data unless the output says otherwise."
    )


class InputParameters(_Request):
    binary_data_size: StrictInt | None = Field(
        None, ge=0, description="Bytes of this tensor in the binary part of the body."
    )


class RequestInput(_Request):
    name: str
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: str
    parameters: InputParameters | None = None
    data: Any = Field(None, description="Row-major values, flat or nested (numbers).")


class OutputParameters(_Request):
    binary_data: StrictBool | None = Field(
        None, description="Send this output as binary data (default: binary_data_output)."
    )


class RequestOutput(_Request):
    name: str
    parameters: OutputParameters | None = None


class InferenceRequest(_Request):
    id: str | None = Field(None, description="Echoed in the response.")
    parameters: InferParameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(
        None, description="Outputs to return, and how; all of them when absent."
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"id": "eval-1", "inputs": [_INFER_EXAMPLE_INPUT]},
                {
                    "id": "mc-1",
                    "parameters": {"n_samples": 1000, "seed": 7},
                    "inputs": [_INFER_EXAMPLE_INPUT],
                    "outputs": [{"name": "mean"}, {"name": "std"}],
                },
            ]
        },
    )


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, JsonValue] | None = Field(
        None, description="`binary_data_size` when the values follow the JSON header."
    )
    data: list[float] | list[bool] | None = Field(
        None, description="Row-major flat values (JSON mode); true and false for BOOL."
    )


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, JsonValue] | None = Field(
        None,
        description="MC: the `n_samples` (passes drawn) and `seed` used, send the seed back "
        "to replay; with coverage, `coverage` and `coverage_method` (conformal, gaussian or "
        "probability).",
    )
    outputs: list[ResponseOutput]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "concrete",
                    "model_version": "1",
                    "id": "mc-1",
                    "parameters": {"n_samples": 1000, "seed": 7},
                    "outputs": [
                        {"name": "mean", "shape": [1, 1], "datatype": "FP64", "data": [76.9]},
                        {"name": "std", "shape": [1, 1], "datatype": "FP64", "data": [3.13]},
                    ],
                }
            ]
        }
    )


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension (rows, samples).")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata] = Field(
        description="`output` for eval; the others for MC requests (see parameters)."
    )
    parameters: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="What an answer's bits depend on beyond the request and its seed (v1's "
        "`replay`): torch_version, cpu_capability, device, mask_mode, mc_chunk_elements, "
        "mc_tile_elements, eval_block_rows.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "concrete",
                    "versions": ["1"],
                    "platform": "pytorch",
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}],
                    "outputs": [
                        {"name": "output", "datatype": "FP32", "shape": [-1, 1]},
                        {"name": "mean", "datatype": "FP64", "shape": [-1, 1]},
                    ],
                }
            ]
        }
    )


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ErrorV2(BaseModel):
    error: str


def request_body_schema() -> dict[str, Any]:
    """``InferenceRequest``'s JSON schema with its definitions inlined, for ``openapi_extra``
    (the infer route reads the raw body, so FastAPI cannot document it by itself)."""
    schema = InferenceRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined
