"""Live model control over HTTP: the Open Inference Protocol's repository extension, as
Triton serves it (``tritonclient.http``'s ``get_model_repository_index``, ``load_model`` and
``unload_model`` call these).

Every call needs ``Authorization: Bearer $DROPOUT_ADMIN_TOKEN``, compared in constant time;
with no token configured the endpoints answer 403, and a wrong or missing one gets 401.
Predictions never need a token, and no token is ever logged.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field, Strict
from starlette.exceptions import HTTPException

from service.protocols import oip
from service.protocols.http.deps import PlaneDep
from service.protocols.http.schemas_v2 import ErrorV2
from service.protocols.http.v2 import V2Route

ModelName = Path(description="A folder of the model repository.", max_length=256)


def require_admin(request: Request) -> None:
    """401 unless the request carries the admin token; 403 when none is configured."""
    token = request.app.state.settings.admin_token
    refusal = oip.admin_refusal(token, request.headers.get("authorization", ""))
    if refusal is not None:
        status, message = refusal
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        raise HTTPException(status, message, headers=headers)


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorV2, "description": "The folder failed its checks; the old one serves."},
    401: {"model": ErrorV2, "description": "No or a wrong bearer token."},
    403: {"model": ErrorV2, "description": "Model control is off (no DROPOUT_ADMIN_TOKEN)."},
    404: {"model": ErrorV2, "description": "No such folder in the repository."},
    409: {"model": ErrorV2, "description": "Several workers: control would reach one."},
}
router = APIRouter(
    prefix="/v2/repository",
    tags=["model control"],
    route_class=V2Route,
    dependencies=[Depends(require_admin)],
    responses=_ERRORS,
)


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ready: Annotated[bool, Strict()] = Field(False, description="Only the models serving.")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoadRequest(_Strict):
    """Triton's load may carry a config or files to use instead of the folder's; this server
    loads the folder as it is on disk, so it takes no parameter."""

    parameters: _Strict = Field(default_factory=_Strict)


class UnloadParameters(_Strict):
    unload_dependents: Annotated[bool, Strict()] = Field(
        False, description="Accepted as tritonclient sends it; no model here has dependents."
    )


class UnloadRequest(_Strict):
    parameters: UnloadParameters = Field(default_factory=UnloadParameters)


class IndexEntry(BaseModel):
    name: str
    version: str = Field(description="The config's version; empty when not loaded.")
    state: str = Field(description="READY or UNAVAILABLE.")
    reason: str = Field(description="Why it is unavailable.")


async def _body(request: Request, schema: type[BaseModel]) -> Any:
    raw = await request.body()
    return schema.model_validate_json(raw if raw.strip() else b"{}")


@router.post("/index", response_model=list[IndexEntry])
async def index(plane: PlaneDep, request: Request) -> list[IndexEntry]:
    """Every folder of the repository (and every served model) with its state."""
    body: IndexRequest = await _body(request, IndexRequest)
    return [
        IndexEntry(name=e.name, version=e.version, state=e.state, reason=e.reason)
        for e in plane.index(ready_only=body.ready)
    ]


@router.post("/models/{name}/load")
async def load(plane: PlaneDep, request: Request, name: str = ModelName) -> dict[str, Any]:
    """(Re)load the folder from disk and serve it: atomically, the old version answering
    what it admitted; a folder failing its checks leaves the old version serving (400)."""
    await _body(request, LoadRequest)
    await plane.load_model(name)
    return {}


@router.post("/models/{name}/unload")
async def unload(plane: PlaneDep, request: Request, name: str = ModelName) -> dict[str, Any]:
    """Stop serving the model; what it admitted still gets answered."""
    await _body(request, UnloadRequest)
    await plane.unload_model(name)
    return {}
