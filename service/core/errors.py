"""Domain errors: what can go wrong with a request, whatever protocol carried it.

Each docstring says what the error becomes; every front door maps them in one table of its
own (``protocols/http/errors.py`` for REST v1 and v2).
"""

from __future__ import annotations

from collections.abc import Sequence

#: Seconds a client should wait before retrying a 503 (not ready, or overloaded).
RETRY_AFTER_SECONDS = 1


class ServiceError(Exception):
    """Base of the errors a request can meet."""


class ModelNotFound(ServiceError):
    """404 (gRPC NOT_FOUND): no model of that name is served."""

    def __init__(self, name: str, available: Sequence[str], among: str = "served models") -> None:
        shown = ", ".join(sorted(available)) or "none"
        super().__init__(f"model {name[:64]!r} not found; {among}: {shown}")


class VersionNotFound(ServiceError):
    """404 (gRPC NOT_FOUND): the model is served, but not in the version asked for."""

    def __init__(self, name: str, version: str, served: str) -> None:
        super().__init__(
            f"model {name[:64]!r} has no version {version[:64]!r}; served version: {served!r}"
        )


class InvalidInput(ServiceError):
    """422 in v1, 400 in v2 (gRPC INVALID_ARGUMENT): the request parsed but does not fit the
    model or the limits. ``loc`` is the path of the field at fault in the request."""

    def __init__(self, loc: Sequence[str | int], msg: str) -> None:
        super().__init__(msg)
        self.loc = list(loc)
        self.msg = msg


class NotReady(ServiceError):
    """503 with Retry-After (gRPC UNAVAILABLE): models are still loading (or failed to)."""


class Overloaded(ServiceError):
    """503 with Retry-After (gRPC UNAVAILABLE): the model's queue is full; back off."""


class DeadlineExceeded(ServiceError):
    """504 (gRPC DEADLINE_EXCEEDED): the request waited and computed past its deadline."""


class ModelLoadFailed(ServiceError):
    """400 (gRPC INVALID_ARGUMENT): a model folder asked for could not be loaded; whatever
    served before still serves."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"model {name[:64]!r} was not loaded: {reason}")


class ControlRefused(ServiceError):
    """409 (gRPC FAILED_PRECONDITION): model control cannot apply to this server as it runs
    (several worker processes each hold their own models)."""
