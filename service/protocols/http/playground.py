"""The playground: ``GET /`` serves a page that asks the service's own v1 endpoints and
draws what they answer (``static/``: HTML, CSS and JavaScript, no build step, nothing
fetched from elsewhere, so it works offline)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

STATIC = Path(__file__).with_name("static")
#: The files the page loads, and their media types; nothing else is served from the folder.
FILES = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    media_type = FILES.get(name)
    if media_type is None:
        return Response(status_code=404)
    return FileResponse(STATIC / name, media_type=media_type)
