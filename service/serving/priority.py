"""Eval first: while eval requests are being served, MC jobs take turns, and a share of time.

One event loop reads every connection in turn, so with as many eval clients as MC clients,
each sending its next request when answered, both kinds are answered about equally often,
and the cheap eval request waits behind the expensive MC one (docs/benchmarks.md, mixed
load). ``EvalFirst`` gives MC jobs a lane while eval traffic is present (an eval request in
progress, or one admitted in the last ``window_s``): one MC job at a time, each started no
sooner than its predecessor's time times ``(1 - share) / share`` after that one ended, so MC
computes at most ``share`` of the time and eval has the rest. Waiting MC requests keep their
place (the lane is first come, first served), never starve (MC still gets ``share``), and
stay under the request deadline and the admission bound like any other request. Without eval
traffic MC jobs run at once, as many as come. Where and when a job runs changes its speed,
never its bits.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class EvalFirst:
    """The MC lane of one data plane (see the module's docstring)."""

    def __init__(
        self,
        share: float,
        window_s: float = 0.01,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.share = share
        self.window_s = window_s
        self._clock = clock
        self._evals = 0  # eval requests admitted and not yet answered
        self._last_eval = -math.inf  # when the latest eval request was admitted
        self._lane = asyncio.Lock()  # first come, first served
        self._next_start = -math.inf  # the earliest start of the lane's next MC job

    def eval_started(self) -> None:
        self._evals += 1
        self._last_eval = self._clock()

    def eval_ended(self) -> None:
        self._evals -= 1

    def evals_active(self) -> bool:
        """Whether eval requests are being served: one in progress or just admitted."""
        return self._evals > 0 or self._clock() - self._last_eval < self.window_s

    @asynccontextmanager
    async def mc_turn(self) -> AsyncIterator[float | None]:
        """Hold the MC lane for the body when eval traffic is present; yields the seconds
        waited for the turn, or None when the job went ahead without the lane (no eval
        traffic, or ``share`` 1)."""
        if self.share >= 1 or not self.evals_active():
            yield None
            return
        arrived = self._clock()
        async with self._lane:
            while (left := self._next_start - self._clock()) > 0 and self.evals_active():
                # In steps of the window: once eval traffic stops, MC goes on at once.
                await asyncio.sleep(min(left, self.window_s))
            start = self._clock()
            try:
                yield start - arrived
            finally:
                # A job of d seconds moves the lane's next start d / share on from its own
                # (d computing, then d (1 - share) / share for eval). A start later than its
                # turn, as when the loop was busy serving eval, is credited up to the window:
                # the jobs waiting then run back to back until MC has its share again.
                spent = self._clock() - start
                self._next_start = max(self._next_start, start - self.window_s) + spent / self.share
