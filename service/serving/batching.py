"""Dynamic batching of eval requests, with answers that never depend on the batch.

On the CPU a GEMM computes a row with different instructions depending on where the row
falls among the kernel's row tiles, and on the pass's row count: measured with torch 2.13
here, in a pass whose row count is not a multiple of 4 the last rows can differ in the last
bit from the same rows inside a 64-row pass (which rows, depends on the widths). So every
eval forward pass goes through ``blocked_predict``, which always hands the engine the same
shape (``block_rows`` rows, zero-padded). Whether a row then meets the same instructions at
every position of the block depends on the machine's BLAS: with MKL's AVX-512 and AVX2
kernels 16- and 64-row blocks do, 8 or 32 rows do not always, and MKL's AVX and SSE
kernels give no block size that does. ``choose_block`` checks it for each model on the
machine that serves it, and falls back to larger blocks, then to one row per pass, which
is the same pass for every row by construction. Batching then changes throughput, never an
answer. MC requests are not batched: each owns its generator, and stacking them would
change the order in which masks are drawn.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
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

log = logging.getLogger(__name__)

#: The block ``choose_block`` tries when the preferred one moves a row's bits.
FALLBACK_BLOCK_ROWS = 64

#: Runs an eval job of so many multiply-adds (``JobRunner.run`` with kind "eval").
Runner = Callable[[Work[Tensor], int], Awaitable[Ran[Tensor]]]


def blocked_predict(engine: MLPEngine, x: Tensor, block_rows: int) -> Tensor:
    """``engine.predict`` over zero-padded blocks of exactly ``block_rows`` rows: ``(B, out)``."""
    rows = x.shape[0]  # len() of a tensor goes through torch's Python layer
    if rows <= block_rows:  # one block (the usual case): no slicing and no concatenation
        return engine.predict_block(x, block_rows)
    outputs = []
    for start in range(0, rows, block_rows):
        part = x[start : start + block_rows]
        n = len(part)
        block = F.pad(part, (0, 0, 0, block_rows - n))  # always a fresh, aligned buffer
        outputs.append(engine.predict(block)[:n])
    return torch.cat(outputs)


def padded_macs(engine: MLPEngine, rows: int, block_rows: int) -> int:
    """Multiply-adds of the zero-padded blocks ``blocked_predict`` computes for ``rows``."""
    return engine.eval_macs(-(-rows // block_rows) * block_rows)


def row_invariant(engine: MLPEngine, block_rows: int, trials: int = 3) -> bool:
    """Whether, on this machine, every row of a ``block_rows``-row eval pass comes out with
    the bits it has alone (at the first position, the rest zeros), among random rows."""
    g = torch.Generator().manual_seed(0)
    for _ in range(trials):
        x = torch.randn(block_rows, engine.config.input_dim, generator=g) * 2
        together = blocked_predict(engine, x, block_rows)
        alone = [blocked_predict(engine, x[i : i + 1], block_rows) for i in range(block_rows)]
        if together.numpy().tobytes() != torch.cat(alone).numpy().tobytes():  # NaN == NaN too
            return False
    return True


def choose_block(engine: MLPEngine, preferred: int) -> int:
    """The rows of every eval pass of ``engine`` here: ``preferred`` when ``row_invariant``,
    else ``FALLBACK_BLOCK_ROWS`` when that is, else 1 (every row its own pass)."""
    for rows in dict.fromkeys((preferred, FALLBACK_BLOCK_ROWS)):
        if row_invariant(engine, rows):
            if rows != preferred:
                log.warning(
                    "model %r: eval passes of %d rows move some rows' last bits on this "
                    "machine (%s); it uses blocks of %d rows",
                    engine.config.name, preferred, torch.backends.cpu.get_cpu_capability(), rows,
                )  # fmt: skip
            return rows
    log.warning(
        "model %r: no eval block size keeps every row's bits on this machine (%s): every row "
        "computes in its own pass, and batching saves nothing for this model",
        engine.config.name, torch.backends.cpu.get_cpu_capability(),
    )  # fmt: skip
    return 1


def _alone_on_loop() -> bool:
    """Whether nothing but the running callback is ready on the event loop: the requests
    read in this turn of the loop have all been started. asyncio's own loop (the one the
    service runs on) keeps its ready callbacks in ``_ready``; a loop without it (uvloop)
    answers False, and every request goes through the worker as before."""
    ready = getattr(asyncio.get_running_loop(), "_ready", None)
    return ready is not None and len(ready) == 0


@dataclass
class _Pending:
    x: Tensor  # (rows, in)
    rows: int
    future: asyncio.Future[Ran[Tensor]]
    enqueued: float


class EvalBatcher:
    """Coalesces concurrent eval requests for one model into shared forward passes.

    Like Triton's dynamic batcher: a batch holds up to ``max_rows`` rows and waits at most
    ``max_delay_s`` after its first request for more. One batch runs at a time per model;
    requests arriving meanwhile form the next one, so batches grow with the load even when
    ``max_delay_s`` is 0. A request with more rows than ``max_rows`` runs as its own batch.

    A request that finds the batcher idle, with no delay asked for, its pass small enough to
    compute on the event loop (``inline``), and nothing else ready to run on the loop in
    this turn (``_alone_on_loop``), is its own batch at once: no request could join it
    before the loop polls its sockets again, and the hand-over to the worker task and back
    (two more turns of the loop) cost 12% of a one-client request's requests a second
    (docs/benchmarks.md). Computing on the loop never yields, so no other batch runs
    meanwhile.
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
        inline: Callable[[int], bool] | None = None,
    ) -> None:
        self.name = name
        self.engine = engine
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.block_rows = block_rows
        self._run = run
        self._inline = inline  # whether ``run`` computes a job of so many MACs on the loop
        self._metrics = metrics
        self._pending: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._forwarding = False  # a batch is computing (perhaps on a thread)
        self._retired = False

    async def predict(self, x: Tensor) -> Ran[Tensor]:
        """Eval outputs for ``x (rows, in)``, bit-identical to ``blocked_predict`` alone; timed
        from this request's arrival, ``shared`` by the requests of its batch."""
        rows = x.shape[0]
        if self._alone(rows):
            ran = await self._compute(x, rows)  # inline: computed without yielding to the loop
            self._metrics.observe_batch(self.name, 1, rows, ran.compute_s)
            return ran
        future: asyncio.Future[Ran[Tensor]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(x, rows, future, time.perf_counter()))
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
        while sum(p.rows for p in self._pending) < self.max_rows:
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
            if batch and rows + p.rows > self.max_rows:
                break
            batch.append(self._pending.popleft())
            rows += p.rows
        return batch

    def _alone(self, rows: int) -> bool:
        """Whether a request of ``rows`` rows arriving now is its own batch (see the class)."""
        return (
            self._inline is not None
            and self.max_delay_s == 0
            and not self._pending
            and not self._forwarding
            and _alone_on_loop()
            and self._inline(self._macs(rows))
        )

    def _macs(self, rows: int) -> int:
        return padded_macs(self.engine, rows, self.block_rows)

    def _compute(self, x: Tensor, rows: int) -> Awaitable[Ran[Tensor]]:
        return self._run(
            lambda _: blocked_predict(self.engine, x, self.block_rows), self._macs(rows)
        )

    async def _forward(self, batch: list[_Pending]) -> None:
        x = batch[0].x if len(batch) == 1 else torch.cat([p.x for p in batch])  # (rows, in)
        rows = sum(p.rows for p in batch)
        self._forwarding = True
        try:
            ran = await self._compute(x, rows)
        except Exception as exc:  # the engine's error belongs to every request of the batch
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self._forwarding = False
        self._metrics.observe_batch(self.name, len(batch), rows, ran.compute_s)
        offset = 0
        for p in batch:
            if not p.future.done():
                part = ran.result[offset : offset + p.rows]
                p.future.set_result(
                    dataclasses.replace(ran, result=part, queued=p.enqueued, shared=len(batch))
                )
            offset += p.rows
