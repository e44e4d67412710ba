"""Liveness and readiness, answered apart: live while the process runs, ready once loaded."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.core.errors import RETRY_AFTER_SECONDS
from service.protocols.http.deps import RuntimeDep
from service.protocols.http.schemas_v1 import Health, Readiness
from service.serving.dataplane import Runtime

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
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """200 once every model is loaded; 503 (with Retry-After) before, or if one was refused."""
    body = readiness(runtime)
    if body.status == "ready":
        return JSONResponse(body.model_dump())
    return JSONResponse(
        body.model_dump(), status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
    )


def readiness(runtime: Runtime) -> Readiness:
    """The verdict /readyz and /v2/health/ready share."""
    repo = runtime.repository
    if repo is None:
        return Readiness(status="loading")
    ok = bool(repo.models) and (not repo.failures or runtime.settings.allow_partial_ready)
    return Readiness(
        status="ready" if ok else "not ready", models=sorted(repo.models), failed=repo.failures
    )
