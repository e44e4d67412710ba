"""Structured access log: one JSON line per request, with a request id, never input data.

A front door opens a ``record`` for each request it serves (HTTP: ``Observed``) and, when
the request is answered, writes it with ``write_access_line``. Code serving the request adds
fields (model, rows, n_samples, queue and compute times) with ``annotate``, which writes to
the record held in a context variable: the data plane needs no handle on the protocol.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from service.serving.gather import Gathered

if TYPE_CHECKING:
    from service.serving.metrics import Metrics

LOGGER = "dropout.access"

_record: ContextVar[dict[str, Any] | None] = ContextVar("access_record", default=None)

log = logging.getLogger(LOGGER)

#: Incoming request ids are echoed and logged, so only plain, bounded ones are taken.
_VALID_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class _FreshIds:
    """Request ids unique across processes: 32 hex digits, a random prefix drawn once per
    process (again in a forked child) and a counter. A uuid4 per request reads the OS's
    random source each time, about 2 us; an id needs to be unique, not unpredictable."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


fresh_id = _FreshIds()


def request_id(given: str | None) -> str:
    """The caller's request id (``X-Request-ID``, or ``x-request-id`` gRPC metadata) when
    it looks like an id, else a fresh one."""
    if given is not None and _VALID_ID.fullmatch(given):
        return given
    return fresh_id()


def annotate(**fields: Any) -> None:
    """Add fields to the access-log line of the request being served (if any)."""
    record = _record.get()
    if record is not None:
        record.update(fields)


#: An access line not yet formatted: its time (``time.time()``), request id and fields.
_Pending = tuple[float, str, dict[str, Any]]


def _access_line(ts: float, request_id: str, fields: dict[str, Any]) -> str:
    line = {
        "ts": datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds"),
        "request_id": request_id,
        **fields,
    }
    return orjson.dumps(line).decode()


class BatchedStdout(logging.Handler):
    """Writes each record's message as a line on stdout, gathered for ``FLUSH_S`` seconds.

    A write and flush per request cost more than the forward pass of a small model under
    load (docs/benchmarks.md); this handler holds the lines of one short window and writes
    them at once, from the event loop (``gather.Gathered``), so a line trails its response
    by ``FLUSH_S`` at most. Access lines come unformatted and are formatted when written,
    all in a row. Outside an event loop (and at interpreter exit, via ``logging.shutdown``)
    it writes at once.
    """

    FLUSH_S = 0.05

    def __init__(self) -> None:
        super().__init__()
        self._lines: Gathered[str | _Pending] = Gathered(self._write, self.FLUSH_S)

    def emit(self, record: logging.LogRecord) -> None:
        self.add(record.getMessage())

    def add(self, line: str | _Pending) -> None:
        """Gather ``line``, or an access line's parts, for the next flush."""
        self._lines.add(line)

    def flush(self) -> None:
        self._lines.flush()

    @staticmethod
    def _write(lines: list[str | _Pending]) -> None:
        text = "\n".join(line if isinstance(line, str) else _access_line(*line) for line in lines)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def flush_access_log() -> None:
    """Write out the access lines still gathered (at shutdown)."""
    for handler in log.handlers:
        handler.flush()


def configure_access_log() -> None:
    """Send access lines, bare JSON, to stdout (batched, see ``BatchedStdout``). Each app
    says whether it writes them (``Observed``); other handlers can be added to the
    ``dropout.access`` logger as to any other, and its level silences every app."""
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    log.propagate = False
    if not any(isinstance(h, BatchedStdout) for h in log.handlers):
        log.addHandler(BatchedStdout())


@contextlib.contextmanager
def record() -> Iterator[dict[str, Any]]:
    """The access-log record of the request served inside the block (see ``annotate``)."""
    fields: dict[str, Any] = {"model": None, "n_samples": None}
    token = _record.set(fields)
    try:
        yield fields
    finally:
        _record.reset(token)


def write_access_line(request_id: str, fields: dict[str, Any]) -> None:
    """Write one request's JSON line: its time, its id, then ``fields`` (not to be changed
    afterwards: the line may be formatted later)."""
    if not log.isEnabledFor(logging.INFO):
        return
    now = time.time()
    only = log.handlers[0] if len(log.handlers) == 1 and not log.filters else None
    if type(only) is BatchedStdout and not only.filters and only.level <= logging.INFO:
        # The line goes to our handler alone, which formats it when it writes and reads
        # nothing else of a record: building one (pid, thread, time...) would cost as much
        # again as the line.
        only.add((now, request_id, fields))
        return
    # makeRecord + handle is log.info without findCaller's walk up the stack: the caller
    # is always this line.
    message = _access_line(now, request_id, fields)
    log.handle(log.makeRecord(LOGGER, logging.INFO, __file__, 0, message, (), None))


def answered(
    metrics: Metrics,
    access_log: bool,
    request_id: str,
    fields: dict[str, Any],
    *,
    protocol: str,
    method: str,
    path: str,
    endpoint: str | None,
    model: str,
    status: int | str,
    seconds: float,
) -> None:
    """What one answered request leaves behind, whichever door it came through: its count
    and latency (``endpoint`` "unmatched" when no route took it) and, when ``access_log``,
    its line with the ``fields`` its serving annotated."""
    metrics.observe_request(protocol, method, endpoint or "unmatched", model, str(status), seconds)
    if access_log:
        write_access_line(
            request_id,
            {
                "protocol": protocol,
                "method": method,
                "path": path,
                "endpoint": endpoint,
                "status": status,
                "latency_ms": round(seconds * 1000, 3),
                **fields,
            },
        )
