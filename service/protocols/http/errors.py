"""How HTTP answers the domain errors: one table per protocol, v1's and the Open Inference
Protocol's (v2), and the FastAPI handlers that use them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

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
from service.protocols import oip

#: v1's status for each domain error.
V1_STATUS: dict[type[ServiceError], int] = {
    ModelNotFound: 404,
    VersionNotFound: 404,
    InvalidInput: 422,
    NotReady: 503,
    Overloaded: 503,
    DeadlineExceeded: 504,
    ModelLoadFailed: 400,
    ControlRefused: 409,
}
#: The Open Inference Protocol answers bad input with 400; the rest as v1.
V2_STATUS: dict[type[ServiceError], int] = {**V1_STATUS, InvalidInput: 400}


def _retry(status: int) -> dict[str, str] | None:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None


def v1_error_response(exc: ServiceError) -> JSONResponse:
    """v1's answer: FastAPI's ``{"detail": ...}`` shape, 422s as a list of fields."""
    status = V1_STATUS[type(exc)]
    detail: Any = str(exc)
    if isinstance(exc, InvalidInput):
        detail = [{"type": "value_error", "loc": ["body", *exc.loc], "msg": exc.msg}]
    return JSONResponse({"detail": detail}, status_code=status, headers=_retry(status))


def v2_error_response(exc: Exception) -> JSONResponse | None:
    """The Open Inference Protocol's answer ``{"error": "..."}``, or None if not ours."""
    headers: Mapping[str, str] | None = None
    if isinstance(exc, ServiceError):
        status, message = V2_STATUS[type(exc)], str(exc)
        headers = _retry(status)
    elif isinstance(exc, RequestValidationError | ValidationError):
        status, message = 400, oip.describe(exc.errors())
    elif isinstance(exc, HTTPException):
        status, message, headers = exc.status_code, str(exc.detail), exc.headers
    else:
        return None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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


def install_error_handlers(app: FastAPI) -> None:
    """v1's handlers; v2's routes answer their own errors (``v2.V2Route``)."""

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return v1_error_response(exc)

    async def handle_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if _body_not_json(request, exc):
            return v1_error_response(
                InvalidInput([], "body must be JSON, sent with Content-Type: application/json")
            )
        return validation_response(exc)

    async def handle_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if isinstance(exc.__cause__, ClientDisconnect):  # nobody to answer: counted as 499
            raise exc.__cause__
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI answers a bare 400 when its JSON parser fails with anything but
            # JSONDecodeError (an integer past Python's 4300-digit limit): malformed input, 422.
            return v1_error_response(InvalidInput([], "body could not be parsed as JSON"))
        return await http_exception_handler(request, exc)

    for exc_type in V1_STATUS:
        app.add_exception_handler(exc_type, handle)
    app.add_exception_handler(RequestValidationError, handle_validation)
    app.add_exception_handler(HTTPException, handle_http)
