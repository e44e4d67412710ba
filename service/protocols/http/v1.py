"""The v1 JSON API: model metadata, eval predictions, Monte-Carlo-dropout predictions."""

from __future__ import annotations

from typing import Any

import orjson
import torch
from fastapi import APIRouter, Path, Request, Response

from service.core.engine import MCResult
from service.core.model import ModelConfig
from service.core.repository import LoadedModel
from service.protocols.http.deps import RuntimeDep, runtime_of
from service.protocols.http.schemas_v1 import (
    CompareRequest,
    CompareResponse,
    CompareTiming,
    ErrorBody,
    MCRequest,
    MCResponse,
    ModelList,
    ModelMetadata,
    PredictRequest,
    PredictResponse,
    ReplayScope,
    ValidationErrorBody,
)
from service.serving.dataplane import Runtime
from service.serving.outputs import mc_outputs

router = APIRouter(prefix="/v1", tags=["v1"])

MODEL_NAME_MAX = 256
ModelName = Path(description="Model name, as listed by GET /v1/models.", max_length=MODEL_NAME_MAX)
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Unknown model."},
    422: {"model": ValidationErrorBody, "description": "Malformed input, naming the field."},
}
_PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    **_NOT_FOUND,
    413: {"model": ErrorBody, "description": "Body over the size limit."},
    503: {
        "model": ErrorBody,
        "description": "Not ready or overloaded; retry after Retry-After seconds.",
    },
}


def metadata(runtime: Runtime, model: LoadedModel) -> ModelMetadata:
    config = model.config
    return ModelMetadata(
        name=config.name,
        version=config.version,
        task=config.task,
        input_dim=config.input_dim,
        output_dim=config.output_dim,
        hidden=config.hidden,
        activation=config.activation,
        dropout=config.dropout,
        input_dropout=config.input_dropout,
        dropout_scaling=config.dropout_scaling,
        labels=config.labels,
        noise_variance=config.noise_variance,
        sha256=config.sha256,
        metrics=config.metrics,
        replay=ReplayScope.model_validate(runtime.replay_scope(model)),
    )


@router.get("/models", response_model=ModelList)
async def list_models(runtime: RuntimeDep) -> ModelList:
    """Every model being served."""
    repo = runtime.repository
    return ModelList(models=[metadata(runtime, m) for m in repo] if repo else [])


@router.get("/models/{name}", response_model=ModelMetadata, responses=_NOT_FOUND)
async def get_model(runtime: RuntimeDep, name: str = ModelName) -> ModelMetadata:
    """One model's metadata."""
    return metadata(runtime, runtime.model(name))


# The two predict routes are the hot path. A well-formed request is answered by
# ``fastpath.FastPredict`` before it reaches FastAPI; these handlers serve the rest (and the
# OpenAPI document). Both write their documented model's fields with orjson: a FastAPI
# response model would validate the answer a second time and run its generic encoder, which
# costs more than the forward pass of a small model. tests/test_api.py checks the bodies.


def json_response(payload: dict[str, Any]) -> Response:
    """A JSON body as FastAPI's encoder writes it (non-finite floats become null)."""
    return Response(orjson.dumps(payload), media_type="application/json")


@router.post("/models/{name}/predict", response_model=PredictResponse, responses=_PREDICT_ERRORS)
async def predict(body: PredictRequest, request: Request, name: str = ModelName) -> Response:
    """Eval-mode prediction: dropout off, the same input gives the same bits every time."""
    model, outputs = await runtime_of(request).predict(name, body.inputs)
    return json_response(eval_fields(model.config, outputs))


@router.post("/models/{name}/predict/mc", response_model=MCResponse, responses=_PREDICT_ERRORS)
async def predict_mc(body: MCRequest, request: Request, name: str = ModelName) -> Response:
    """Monte-Carlo dropout: T seeded stochastic passes summarised; replayable from `seed`."""
    answer = await runtime_of(request).predict_mc(
        name, body.inputs, body.n_samples, body.seed, body.return_samples
    )
    return json_response(
        mc_fields(answer.model.config, answer.n_samples, answer.seed, answer.result)
    )


def eval_fields(config: ModelConfig, outputs: torch.Tensor) -> dict[str, Any]:
    """Every field of ``PredictResponse``."""
    return {"model": config.name, "version": config.version, "outputs": outputs.tolist()}


def mc_fields(config: ModelConfig, n_samples: int, seed: int, result: MCResult) -> dict[str, Any]:
    """The fields of ``MCResponse`` this answer has: those of another task, or samples not
    asked for, are left out rather than sent as null."""
    return {
        "model": config.name,
        "version": config.version,
        "n_samples": n_samples,
        "seed": seed,
        **{k: t.tolist() for k, t in mc_outputs(config, result).items()},
    }


@router.post("/models/{name}/compare", response_model=CompareResponse, responses=_PREDICT_ERRORS)
async def compare(
    body: CompareRequest, runtime: RuntimeDep, name: str = ModelName
) -> CompareResponse:
    """Eval against train-mode passes against MC dropout, for the same rows, with timings.

    Shows why production serves eval: `train_passes` is what a service that forgot
    `model.eval()` answers to identical calls (they differ); `gap` is how far eval's cheap
    weight-scaling approximation sits from the MC mean.
    """
    a = await runtime.compare(name, body.inputs, body.n_samples, body.seed, body.n_train_passes)
    config = a.model.config
    mc = mc_outputs(config, a.mc)  # the very tensors predict/mc answers with
    return CompareResponse(
        model=config.name,
        version=config.version,
        n_samples=a.n_samples,
        seed=a.seed,
        eval=a.eval.tolist(),
        train_passes=a.train_passes.tolist(),
        train_pass_seeds=a.train_pass_seeds,
        mc_mean=mc["mean"].tolist(),
        mc_std=mc["std"].tolist(),
        gap=(mc["mean"] - a.eval.double()).tolist(),
        timing_ms=CompareTiming(
            eval=a.eval_seconds * 1e3,
            train_passes=[s * 1e3 for s in a.train_pass_seconds],
            mc=a.mc_seconds * 1e3,
        ),
    )
