"""Liveness and readiness, answered apart: live while the process runs, ready once loaded."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.core.errors import RETRY_AFTER_SECONDS
from service.protocols.http.deps import PlaneDep
from service.protocols.http.schemas_v1 import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """200 while the process lives."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Loading, or a model failed to load."}},
)
async def readyz(plane: PlaneDep) -> JSONResponse:
    """200 once every model is loaded; 503 (with Retry-After) before, or if one was refused."""
    r = plane.readiness()
    body = Readiness(status=r.status, models=r.models, failed=r.failed).model_dump()
    if r.status == "ready":
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
