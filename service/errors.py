"""Domain exceptions and the one table that maps them to HTTP answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException


class ServiceError(Exception):
    """Base of the errors a request can meet; ``STATUS`` below gives each its HTTP status."""


class ModelNotFound(ServiceError):
    """404: no model of that name is served."""

    def __init__(self, name: str, available: Sequence[str]) -> None:
        shown = ", ".join(sorted(available)) or "none"
        super().__init__(f"model {name[:64]!r} not found; served models: {shown}")


class InvalidInput(ServiceError):
    """422 (400 in v2): the request parsed but does not fit the model or the limits; names
    the field."""

    def __init__(self, loc: Sequence[str | int], msg: str) -> None:
        super().__init__(msg)
        self.loc = ["body", *loc]
        self.msg = msg


class VersionNotFound(ServiceError):
    """404: the model is served, but not in the version the path names (v2)."""

    def __init__(self, name: str, version: str, served: str) -> None:
        super().__init__(
            f"model {name[:64]!r} has no version {version[:64]!r}; served version: {served!r}"
        )


class NotReady(ServiceError):
    """503 with Retry-After: models are still loading (or failed to)."""


class Overloaded(ServiceError):
    """503 with Retry-After: the model's queue is full; the client should back off."""


class DeadlineExceeded(ServiceError):
    """504: the request waited and computed longer than its deadline (``request_timeout_s``)."""


STATUS: dict[type[ServiceError], int] = {
    ModelNotFound: 404,
    VersionNotFound: 404,
    InvalidInput: 422,
    NotReady: 503,
    Overloaded: 503,
    DeadlineExceeded: 504,
}

RETRY_AFTER_SECONDS = 1


def error_response(exc: ServiceError) -> JSONResponse:
    """The JSON answer for ``exc``: FastAPI's ``{"detail": ...}`` shape, 422s as a field list."""
    status = STATUS[type(exc)]
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    detail: Any = str(exc)
    if isinstance(exc, InvalidInput):
        detail = [{"type": "value_error", "loc": exc.loc, "msg": exc.msg}]
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field. The offending input is not echoed: it may be huge, or a
    NaN that JSON cannot carry."""
    detail = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


def v2_error_response(exc: Exception) -> JSONResponse | None:
    """The Open Inference Protocol answer ``{"error": "..."}`` for ``exc``, or None if not ours.

    The protocol answers bad input with 400 (v1 says 422); the other statuses are v1's.
    """
    headers = None
    if isinstance(exc, ServiceError):
        status = 400 if isinstance(exc, InvalidInput) else STATUS[type(exc)]
        message = str(exc)
        if status == 503:
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    elif isinstance(exc, RequestValidationError | ValidationError):
        status, message = 400, _describe(exc.errors())
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, str(exc.detail)
    else:
        return None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _describe(errors: Sequence[Any]) -> str:
    """One line per bad field, ``a.0.b: message``, without echoing the offending value."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc)

    async def handle_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_response(exc)

    for exc_type in STATUS:
        app.add_exception_handler(exc_type, handle)
    app.add_exception_handler(RequestValidationError, handle_validation)
