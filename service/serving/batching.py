"""Dynamic batching of eval requests, with answers that never depend on the batch.

On the CPU a GEMM computes a row with different instructions depending on where the row
falls among the kernel's row tiles: measured with torch 2.13 here, in a pass whose row
count is not a multiple of 4 the last rows can differ in the last bit from the same rows
inside a 64-row pass (which rows, depends on the widths). So every eval forward pass goes
through ``blocked_predict``, which always hands the engine the same shape (``block_rows``
rows, zero-padded). A row then meets the same instructions alone or among 63 others, and
batching changes throughput, never an answer. MC requests are not batched: each owns its
generator, and stacking them would change the order in which masks are drawn.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from service.core.engine import MLPEngine
from service.serving.jobs import Ran, Work
from service.serving.metrics import Metrics

#: Runs an eval job of so many multiply-adds (``JobRunner.run`` with kind "eval").
Runner = Callable[[Work[Tensor], int], Awaitable[Ran[Tensor]]]


def blocked_predict(engine: MLPEngine, x: Tensor, block_rows: int) -> Tensor:
    """``engine.predict`` over zero-padded blocks of exactly ``block_rows`` rows: ``(B, out)``."""
    rows = len(x)
    outputs = []
    for start in range(0, rows, block_rows):
        part = x[start : start + block_rows]
        n = len(part)
        block = F.pad(part, (0, 0, 0, block_rows - n))  # always a fresh, aligned buffer
        outputs.append(engine.predict(block)[:n])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


@dataclass
class _Pending:
    x: Tensor  # (rows, in)
    future: asyncio.Future[Ran[Tensor]]
    enqueued: float


class EvalBatcher:
    """Coalesces concurrent eval requests for one model into shared forward passes.

    Like Triton's dynamic batcher: a batch holds up to ``max_rows`` rows and waits at most
    ``max_delay_s`` after its first request for more. One batch runs at a time per model;
    requests arriving meanwhile form the next one, so batches grow with the load even when
    ``max_delay_s`` is 0. A request with more rows than ``max_rows`` runs as its own batch.
    """

    def __init__(
        self,
        name: str,
        engine: MLPEngine,
        run: Runner,
        metrics: Metrics,
        *,
        max_rows: int,
        max_delay_s: float,
        block_rows: int,
    ) -> None:
        self.name = name
        self.engine = engine
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.block_rows = block_rows
        self._run = run
        self._metrics = metrics
        self._pending: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._retired = False

    async def predict(self, x: Tensor) -> Ran[Tensor]:
        """Eval outputs for ``x (rows, in)``, bit-identical to ``blocked_predict`` alone; timed
        from this request's arrival, ``shared`` by the requests of its batch."""
        future: asyncio.Future[Ran[Tensor]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(x, future, time.perf_counter()))
        self._wakeup.set()
        if self._worker is None or self._worker.done():
            # A fresh context: the worker outlives the request that happened to start it.
            self._worker = asyncio.create_task(self._work(), context=contextvars.Context())
        return await future  # cancelling the caller cancels the future; the worker skips it

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for p in self._pending:
            p.future.cancel()

    def retire(self) -> None:
        """Answer what is queued, then stop: its model was replaced or unloaded, and no new
        request can reach this batcher (the data plane looks a model up and enqueues without
        yielding to the event loop in between)."""
        self._retired = True
        self._wakeup.set()

    async def _work(self) -> None:
        while self._pending or not self._retired:
            while not self._pending and not self._retired:
                self._wakeup.clear()
                await self._wakeup.wait()
            if not self._pending:
                return
            await self._fill()
            batch = self._take()
            if batch:
                await self._forward(batch)

    async def _fill(self) -> None:
        """Wait until the batch is full or the first request has waited ``max_delay_s``."""
        deadline = self._pending[0].enqueued + self.max_delay_s
        while sum(len(p.x) for p in self._pending) < self.max_rows:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(left):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        """Pop requests in arrival order while they fit, skipping those already given up."""
        batch: list[_Pending] = []
        rows = 0
        while self._pending:
            p = self._pending[0]
            if p.future.done():
                self._pending.popleft()
                continue
            if batch and rows + len(p.x) > self.max_rows:
                break
            batch.append(self._pending.popleft())
            rows += len(p.x)
        return batch

    async def _forward(self, batch: list[_Pending]) -> None:
        x = batch[0].x if len(batch) == 1 else torch.cat([p.x for p in batch])  # (rows, in)
        padded = -(-len(x) // self.block_rows) * self.block_rows
        try:
            ran = await self._run(
                lambda _: blocked_predict(self.engine, x, self.block_rows),
                self.engine.eval_macs(padded),
            )
        except Exception as exc:  # the engine's error belongs to every request of the batch
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self._metrics.observe_batch(self.name, len(batch), len(x), ran.compute_s)
        offset = 0
        for p in batch:
            rows = len(p.x)
            if not p.future.done():
                part = ran.result[offset : offset + rows]
                p.future.set_result(
                    dataclasses.replace(ran, result=part, queued=p.enqueued, shared=len(batch))
                )
            offset += rows
