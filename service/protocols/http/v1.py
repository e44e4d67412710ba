"""REST v1: model metadata, eval and Monte-Carlo-dropout predictions, and compare.

Each handler validates its schema, asks the data plane, and writes the answer. The predict
bodies are written with orjson by ``answer`` (which the hot path calls too): a FastAPI
response model would validate the answer a second time and run its generic encoder, which
costs more than the forward pass of a small model. tests/test_api.py checks the bodies
against their documented models.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Path, Response

from service.core.calibration import Calibration, max_coverage
from service.core.repository import LoadedModel
from service.protocols.http.asgi import RawResponse
from service.protocols.http.deps import PlaneDep
from service.protocols.http.schemas_v1 import (
    CalibrationSummary,
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
from service.serving.dataplane import DataPlane, InferAnswer, InferRequest, MCParams
from service.serving.outputs import OUTPUT, mc_outputs

router = APIRouter(prefix="/v1", tags=["v1"])

MODEL_NAME_MAX = 256
ModelName = Path(description="Model name, as listed by GET /v1/models.", max_length=MODEL_NAME_MAX)
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Unknown model."},
    422: {"model": ValidationErrorBody, "description": "Malformed input, naming the field."},
}
_PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    **_NOT_FOUND,
    408: {"model": ErrorBody, "description": "The body did not arrive in time."},
    413: {"model": ErrorBody, "description": "Body over the size limit."},
    503: {
        "model": ErrorBody,
        "description": "Not ready or overloaded; retry after Retry-After seconds.",
    },
    504: {"model": ErrorBody, "description": "Past the request deadline."},
}


def metadata(plane: DataPlane, model: LoadedModel) -> ModelMetadata:
    config = model.config
    return ModelMetadata(
        name=config.name,
        version=config.version,
        task=config.task,
        input_dim=config.input_dim,
        output_dim=config.output_dim,
        hidden=config.hidden,
        activation=config.activation,
        output_activation=config.output_activation,
        dropout=config.dropout,
        input_dropout=config.input_dropout,
        dropout_scaling=config.dropout_scaling,
        labels=config.labels,
        feature_names=config.feature_names,
        example=config.example,
        noise_variance=config.noise_variance,
        sha256=config.sha256,
        metrics=config.metrics,
        calibration=_calibration(config.calibration),
        replay=ReplayScope.model_validate(plane.replay_scope(model)),
    )


def _calibration(cal: Calibration | None) -> CalibrationSummary | None:
    if cal is None:
        return None
    return CalibrationSummary(
        held_out_rows=cal.held_out_rows,
        fitted_on=cal.fitted_on,
        max_coverage=max_coverage(len(cal.scores)),
        temperature=cal.temperature,
        out_of_distribution=cal.ood_reference is not None,
    )


@router.get("/models", response_model=ModelList)
async def list_models(plane: PlaneDep) -> ModelList:
    """Every model being served."""
    return ModelList(models=[metadata(plane, m) for m in plane.models()])


@router.get("/models/{name}", response_model=ModelMetadata, responses=_NOT_FOUND)
async def get_model(plane: PlaneDep, name: str = ModelName) -> ModelMetadata:
    """One model's metadata."""
    return metadata(plane, plane.model(name))


@router.post("/models/{name}/predict", response_model=PredictResponse, responses=_PREDICT_ERRORS)
async def predict(body: PredictRequest, plane: PlaneDep, name: str = ModelName) -> Response:
    """Eval-mode prediction: dropout off, the same input gives the same bits every time."""
    return json_response(await answer(plane, name, body))


@router.post("/models/{name}/predict/mc", response_model=MCResponse, responses=_PREDICT_ERRORS)
async def predict_mc(body: MCRequest, plane: PlaneDep, name: str = ModelName) -> Response:
    """Monte-Carlo dropout: T seeded stochastic passes summarised; replayable from `seed`."""
    return json_response(await answer(plane, name, body))


async def answer(plane: DataPlane, name: str, body: PredictRequest) -> dict[str, Any]:
    """The answer to a predict (``PredictRequest``) or predict/mc (``MCRequest``) body."""
    mc = None
    if isinstance(body, MCRequest):
        mc = MCParams(body.n_samples, body.seed, body.return_samples, body.coverage, body.target_se)
    return fields(await plane.infer(InferRequest(name, body.inputs, mc=mc)))


def fields(a: InferAnswer) -> dict[str, Any]:
    """Every field of ``PredictResponse``, or those of ``MCResponse`` that the answer has
    (those of another task, or samples not asked for, are left out rather than null)."""
    head: dict[str, Any] = {"model": a.model.config.name, "version": a.model.config.version}
    if a.n_samples is None:
        return {**head, "outputs": a.outputs[OUTPUT].tolist()}
    summaries: dict[str, Any] = {k: t.tolist() for k, t in a.outputs.items()}
    lower, upper = summaries.pop("interval_lower", None), summaries.pop("interval_upper", None)
    if lower is not None:
        summaries["interval"] = {
            "coverage": a.coverage,
            "method": a.coverage_method,
            "lower": lower,
            "upper": upper,
        }
    sets = summaries.pop("prediction_sets", None)
    if sets is not None:
        summaries["prediction_sets"] = [[i for i, m in enumerate(row) if m] for row in sets]
        summaries["prediction_set_method"] = a.coverage_method
    return {**head, "n_samples": a.n_samples, "seed": a.seed, **summaries}


def json_response(payload: dict[str, Any]) -> Response:
    return RawResponse(orjson.dumps(payload), b"application/json")


@router.post("/models/{name}/compare", response_model=CompareResponse, responses=_PREDICT_ERRORS)
async def compare(body: CompareRequest, plane: PlaneDep, name: str = ModelName) -> CompareResponse:
    """Eval against train-mode passes against MC dropout, for the same rows, with timings.

    Shows why production serves eval: `train_passes` is what a service that forgot
    `model.eval()` answers to identical calls (they differ); `gap` is how far eval's cheap
    weight-scaling approximation sits from the MC mean.
    """
    a = await plane.compare(name, body.inputs, body.n_samples, body.seed, body.n_train_passes)
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
