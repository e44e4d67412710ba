"""Work a request leaves behind, gathered and done for many requests at once.

A served request leaves an access line and a few metric observations. Done at once they
cost a one-row eval request about a tenth of its requests a second at one client (measured
side by side with both made no-ops): each is a little code, but its code (orjson, datetime,
prometheus_client's locked updates) is cold by the time a request ends, as a request's
whole path does not fit the CPU's caches (docs/benchmarks.md, "Where a one-client
request's time goes"). ``Gathered`` holds the items
of a short window and hands them over together, from the event loop, where the same code
then runs for a hundred items in a row.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Gathered(Generic[T]):
    """Items added on an event loop, handed to ``done`` together at most ``delay_s`` after
    the first of them (``flush`` hands them over at once). In a thread without a running
    loop nothing would hand them over later, so ``add`` does at once. Thread-safe; ``done``
    runs under the lock, so two handovers never overlap."""

    def __init__(self, done: Callable[[list[T]], None], delay_s: float) -> None:
        self._done = done
        self.delay_s = delay_s
        self._items: list[T] = []
        self._lock = threading.Lock()
        self._pending_on: asyncio.AbstractEventLoop | None = None  # the loop a handover awaits

    def add(self, item: T) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: nothing would hand it over later
            loop = None
        with self._lock:
            self._items.append(item)
            if loop is None:
                self._done_now()
            elif self._pending_on is not loop:  # none pending, or pending on a stopped loop
                self._pending_on = loop
                loop.call_later(self.delay_s, self.flush)

    def flush(self) -> None:
        """Hand over every item gathered so far."""
        with self._lock:
            self._pending_on = None
            self._done_now()

    def _done_now(self) -> None:  # under the lock
        if self._items:
            items, self._items = self._items, []
            self._done(items)
