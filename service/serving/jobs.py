"""Running forward jobs: where, on how many threads, timed, and stopped when nobody waits.

A job is a function of one argument, ``stopped``, a callable the job asks between pieces of
work. ``JobRunner.run`` computes it on the event loop when it is small (handing it to a
thread and back costs more), else on a thread pool: eval jobs and MC jobs on pools of their
own, so that a cheap eval pass never queues behind an MC request. Every pass computes with
one intra-op thread (``engine.one_thread``); a large MC request spreads its tiles over the
tile pool instead, which changes its speed and never its bits.

When the awaiting task is cancelled (its deadline passed) or its client leaves (the front
door says how to notice, through ``client_gone``), the job is told to stop and the caller
waits until it has: whoever holds an admission slot for the job keeps it until the thread
is free again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import torch

from service.core.engine import TileMap

T = TypeVar("T")
R = TypeVar("R")

#: A job: computes its result, asking ``stopped()`` between pieces of work.
Work = Callable[[Callable[[], bool]], T]
Kind = Literal["eval", "mc"]

#: Set by a front door for the request it serves: a coroutine function that returns once
#: the request's client has gone (HTTP: disconnected). Unset: nobody watches.
client_gone: ContextVar[Callable[[], Awaitable[None]] | None] = ContextVar(
    "client_gone", default=None
)


class ClientGone(Exception):
    """The client left before its answer; its job stopped. Nothing is sent (HTTP 499)."""


@dataclass(frozen=True)
class Ran(Generic[T]):
    """A job's result and when it was submitted, started and ended (``perf_counter``);
    ``shared`` counts the requests whose work it computed (an eval batch)."""

    result: T
    queued: float
    start: float
    end: float
    shared: int = 1

    @property
    def queue_s(self) -> float:
        return self.start - self.queued

    @property
    def compute_s(self) -> float:
        return self.end - self.start


#: MC tiles of fewer multiply-adds compute on their job's thread, in order. Measured on 2
#: cores (`python bench/tiles.py`, docs/benchmarks.md): the masks of a chunk are drawn on
#: one thread first, and passing each tile's torch calls between threads cost more than
#: the second core saved for the shipped models' tiles of 7-9 M multiply-adds (0.76x-0.94x
#: the speed in order); a 256-wide model's 17 M tiles came out about even, and tiles of
#: 68 M (512 wide) ran 1.06x-1.28x faster spread.
MIN_SPREAD_TILE_MACS = 32_000_000


def _never() -> bool:
    return False


def _one_thread_pool(threads: int, name: str) -> ThreadPoolExecutor:
    # OpenMP keeps the intra-op thread count per OS thread: set it in each pool thread.
    return ThreadPoolExecutor(
        threads, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,)
    )


async def _stop(job: asyncio.Future[Any], stop: threading.Event) -> None:
    """Ask ``job`` to stop at its next tile, and return once its thread is done with it."""
    stop.set()
    await asyncio.wait([job])
    if not job.cancelled():
        job.exception()  # retrieved: Stopped is the expected end


def _timed(work: Work[T], stopped: Callable[[], bool]) -> tuple[T, float, float]:
    start = time.perf_counter()
    result = work(stopped)
    return result, start, time.perf_counter()


class JobRunner:
    """Runs jobs inline or on the eval and MC pools, and maps MC tiles over the tile pool."""

    def __init__(self, *, inline_max_macs: int, inference_threads: int, tile_threads: int):
        self.inline_max_macs = inline_max_macs
        self._pools: dict[Kind, ThreadPoolExecutor] = {
            "eval": _one_thread_pool(inference_threads, "eval"),
            "mc": _one_thread_pool(inference_threads, "inference"),
        }
        self._tiles = _one_thread_pool(tile_threads, "tile") if tile_threads > 1 else None

    def inline(self, macs: int) -> bool:
        """Whether a job of ``macs`` multiply-adds runs on the event loop."""
        return macs <= self.inline_max_macs

    async def run(self, work: Work[T], macs: int, kind: Kind, inline: bool | None = None) -> Ran[T]:
        """Run ``work``, a job of ``macs`` multiply-adds: on the loop when ``inline`` says so,
        by default when it is small enough."""
        queued = time.perf_counter()
        if self.inline(macs) if inline is None else inline:
            result, start, end = _timed(work, _never)
            return Ran(result, queued, start, end)
        stop = threading.Event()
        job = asyncio.wrap_future(self._pools[kind].submit(_timed, work, stop.is_set))
        gone = client_gone.get()
        watch = asyncio.ensure_future(gone()) if gone is not None else None
        waited: list[asyncio.Future[Any]] = [job] if watch is None else [job, watch]
        try:
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await _stop(job, stop)
            raise
        finally:
            if watch is not None:
                watch.cancel()
        if not job.done():  # the client left
            await _stop(job, stop)
            raise ClientGone
        result, start, end = job.result()
        return Ran(result, queued, start, end)

    def tile_map(self, tile_macs: int) -> TileMap:
        """How an MC job whose tiles cost ``tile_macs`` multiply-adds each maps them: over
        the tile pool when there is one and a tile pays for the hand-over
        (``MIN_SPREAD_TILE_MACS``), else in order on the job's own thread."""
        if self._tiles is None or tile_macs < MIN_SPREAD_TILE_MACS:
            return map
        return self.map_tiles

    def map_tiles(self, fn: Callable[[int], R], items: Iterable[int]) -> Iterator[R]:
        """``map(fn, items)``, on the tile pool when there is one and more than one item."""
        todo = list(items)
        if self._tiles is None or len(todo) == 1:
            return map(fn, todo)
        return self._tiles.map(fn, todo)

    def close(self) -> None:
        for pool in (*self._pools.values(), self._tiles):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=False)
