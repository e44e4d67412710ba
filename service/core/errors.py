"""Domain exceptions and the one table that maps them to HTTP answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect


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
    detail = [{"type": e["type"], "loc": list(e["loc"]), "msg": _msg(e)} for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


def _msg(error: dict[str, Any]) -> str:
    """The message, with the parser's reason for JSON that does not parse ("Expecting ',' ...")."""
    reason = error.get("ctx", {}).get("error") if error["type"] == "json_invalid" else None
    return f"{error['msg']}: {reason}" if isinstance(reason, str) else str(error["msg"])


def is_json_media_type(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this Content-Type as JSON (``application/*json``)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def _body_not_json(request: Request, exc: RequestValidationError) -> bool:
    """The body was sent, but not as JSON, so FastAPI handed the schema raw bytes."""
    return not is_json_media_type(request.headers.get("content-type")) and any(
        tuple(e["loc"]) == ("body",) and e["type"] == "model_attributes_type" for e in exc.errors()
    )


def v2_error_response(exc: Exception) -> JSONResponse | None:
    """The Open Inference Protocol answer ``{"error": "..."}`` for ``exc``, or None if not ours.

    The protocol answers bad input with 400 (v1 says 422); the other statuses are v1's.
    """
    headers: Mapping[str, str] | None = None
    if isinstance(exc, ServiceError):
        status = 400 if isinstance(exc, InvalidInput) else STATUS[type(exc)]
        message = str(exc)
        if status == 503:
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    elif isinstance(exc, RequestValidationError | ValidationError):
        status, message = 400, _describe(exc.errors())
    elif isinstance(exc, HTTPException):
        status, message, headers = exc.status_code, str(exc.detail), exc.headers
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

    async def handle_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if _body_not_json(request, exc):
            return error_response(
                InvalidInput([], "body must be JSON, sent with Content-Type: application/json")
            )
        return validation_response(exc)

    async def handle_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if isinstance(exc.__cause__, ClientDisconnect):  # nobody to answer: Observed counts 499
            raise exc.__cause__
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI answers a bare 400 when its JSON parser fails with anything but
            # JSONDecodeError (an integer past Python's 4300-digit limit): malformed input, 422.
            return error_response(InvalidInput([], "body could not be parsed as JSON"))
        return await http_exception_handler(request, exc)

    for exc_type in STATUS:
        app.add_exception_handler(exc_type, handle)
    app.add_exception_handler(RequestValidationError, handle_validation)
    app.add_exception_handler(HTTPException, handle_http)
