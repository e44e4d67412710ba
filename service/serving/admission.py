"""Admission control: a bounded number of requests per model in the data plane at once
(queued or computing); past it a fast ``Overloaded``, never an unbounded queue. Each
admitted request has a deadline; past it ``DeadlineExceeded`` rather than a hang."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.core.errors import DeadlineExceeded, Overloaded
from service.serving.metrics import Metrics


class Admission:
    """Per-model admission control and deadlines for the data plane."""

    def __init__(self, max_pending: int, timeout_s: float, metrics: Metrics) -> None:
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.metrics = metrics

    @asynccontextmanager
    async def admit(self, model: str) -> AsyncIterator[None]:
        """Hold one of ``model``'s slots for the body; raise ``Overloaded`` if none is free
        and ``DeadlineExceeded`` if the body outlives the deadline. The body's job is then
        told to stop and the slot held until it has (``jobs.JobRunner.run``)."""
        count = self.metrics.pending_count(model)
        if count.value >= self.max_pending:
            self.metrics.add(self.metrics.rejected, (model, "overloaded"))
            raise Overloaded(
                f"model {model!r} has {self.max_pending} requests in progress; retry later"
            )
        count.inc()
        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            self.metrics.add(self.metrics.rejected, (model, "deadline"))
            raise DeadlineExceeded(
                f"model {model!r} did not answer within {self.timeout_s:g} s"
            ) from None
        finally:
            count.dec()
