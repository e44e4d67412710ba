"""The data plane between HTTP and the engine: request checks, seeds, limits and threads.

Tensor work runs on a small thread pool so that the event loop keeps answering health
checks while a large MC request computes; a job of at most ``inline_max_macs`` multiply-adds
(a one-block eval batch, a short MC request on a small model) runs on the event loop itself,
because handing it to a thread and back costs more than computing it. Every protocol front
end (v1, v2) calls this.
Each request is admitted per model (bounded, with a deadline; see ``limits.Admission``);
eval requests are coalesced by a per-model ``EvalBatcher`` or, with batching off, run alone
through the same fixed-block forward pass, so both paths give the same bits.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from service.accesslog import annotate
from service.batching import EvalBatcher, Timing, blocked_predict, timed
from service.engine import MCResult
from service.errors import InvalidInput, NotReady
from service.limits import Admission
from service.metrics import Metrics
from service.repository import LoadedModel, ModelRepository
from service.settings import Settings

T = TypeVar("T")
#: The smallest magnitude that rounds to infinity in float32 (FLT_MAX plus half an ulp).
_FLOAT32_OVERFLOW = float(2**128 - 2**103)
#: Request rows as JSON gives them, or a ``(B, in)`` tensor decoded from binary data.
Inputs = list[list[float]] | torch.Tensor


@dataclass(frozen=True)
class MCAnswer:
    model: LoadedModel
    n_samples: int
    seed: int
    result: MCResult


@dataclass(frozen=True)
class CompareAnswer:
    """Eval, ``k`` single train-mode passes and MC for the same rows, each with its time."""

    model: LoadedModel
    n_samples: int
    seed: int
    eval: torch.Tensor  # (B, out)
    train_pass_seeds: list[int]
    train_passes: torch.Tensor  # (k, B, out)
    mc: MCResult
    eval_seconds: float
    train_pass_seconds: list[float]
    mc_seconds: float


def train_pass_seeds(seed: int, k: int) -> list[int]:
    """``k`` independent 63-bit seeds derived from ``seed`` (numpy's SeedSequence spawning)."""
    children = np.random.SeedSequence(seed).spawn(k)
    return [int(c.generate_state(1, np.uint64)[0]) >> 1 for c in children]


def _check_finite(finite_rows: np.ndarray) -> None:
    if not finite_rows.all():
        bad = int(np.flatnonzero(~finite_rows)[0])
        raise InvalidInput(["inputs", bad], f"row {bad} holds a value beyond float32 range")


class Runtime:
    """Validates requests against a model and the limits, then runs the engine off-loop."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.repository: ModelRepository | None = None
        self._executor = ThreadPoolExecutor(
            settings.inference_threads,
            thread_name_prefix="inference",
            # OpenMP keeps the intra-op thread count per OS thread: without this, tensor work
            # on the pool would run with OpenMP's default team, whatever the settings say.
            initializer=torch.set_num_threads,
            initargs=(settings.intra_op_threads(),),
        )
        # Eval passes always run with one intra-op thread, on the event loop or on this pool:
        # a 64-row block is too small for a team of threads to pay off, and a fixed thread
        # count keeps a row's bits independent of where its batch ran.
        self._eval_executor = ThreadPoolExecutor(
            settings.inference_threads,
            thread_name_prefix="eval",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        self._admission = Admission(
            settings.max_queue_size, settings.request_timeout_s, self.metrics
        )
        self._batchers: dict[str, EvalBatcher] = {}

    def model(self, name: str) -> LoadedModel:
        if self.repository is None:
            raise NotReady("models are still loading")
        return self.repository.get(name)

    def to_tensor(self, model: LoadedModel, inputs: Inputs) -> torch.Tensor:
        """Check rows and widths against the model and the limits; return ``(B, in)``.

        ``inputs`` is JSON rows (v1) or an already decoded ``(B, in)`` tensor (v2 tensors).
        """
        if len(inputs) > self.settings.max_rows:
            raise InvalidInput(
                ["inputs"], f"{len(inputs)} rows exceed the maximum of {self.settings.max_rows}"
            )
        width = model.config.input_dim
        rows = inputs[:1] if isinstance(inputs, torch.Tensor) else inputs  # one width per tensor
        for i, row in enumerate(rows):
            if len(row) != width:
                raise InvalidInput(
                    ["inputs", i],
                    f"row {i} has {len(row)} values; model {model.config.name!r} expects {width}",
                )
        if isinstance(inputs, torch.Tensor):
            x = inputs.to(torch.float32)
            _check_finite(torch.isfinite(x).all(1).numpy())
            return x
        values = np.array(inputs, dtype=np.float64)
        _check_finite(np.asarray((np.abs(values) < _FLOAT32_OVERFLOW).all(1)))  # False for NaN
        return torch.from_numpy(values).to(torch.float32)  # torch's own (aligned) memory

    def n_samples(self, requested: int | None) -> int:
        n = self.settings.default_n_samples if requested is None else requested
        if not 2 <= n <= self.settings.max_n_samples:
            raise InvalidInput(
                ["n_samples"], f"n_samples must be in [2, {self.settings.max_n_samples}], got {n}"
            )
        return n

    async def predict(self, name: str, inputs: Inputs) -> tuple[LoadedModel, torch.Tensor]:
        model = self.model(name)
        x = self.to_tensor(model, inputs)
        annotate(model=model.config.name, rows=len(x))
        async with self._admission.admit(model.config.name):
            if self.settings.batching:
                y, timing = await self._batcher(model).predict(x)
            else:
                block = self.settings.eval_block_rows
                padded = -(-len(x) // block) * block
                y, timing = await self._timed_run(
                    lambda: blocked_predict(model.engine, x, block),
                    model.engine.eval_macs(padded),
                    eval_pass=True,
                )
                self.metrics.observe_batch(model.config.name, 1, len(x), timing.compute_s)
        self._observe(model, "eval", timing)
        return model, y

    async def predict_mc(
        self,
        name: str,
        inputs: Inputs,
        n_samples: int | None,
        seed: int | None,
        return_samples: bool = False,
    ) -> MCAnswer:
        model = self.model(name)
        x = self.to_tensor(model, inputs)
        n = self.n_samples(n_samples)
        annotate(model=model.config.name, rows=len(x), n_samples=n)
        seed = secrets.randbits(63) if seed is None else seed
        if return_samples:
            values = n * x.shape[0] * model.config.output_dim
            if values > self.settings.max_sample_values:
                raise InvalidInput(
                    ["return_samples"],
                    f"samples would hold {values} values, over the limit of "
                    f"{self.settings.max_sample_values}; lower n_samples or rows",
                )

        def run() -> MCResult:
            return model.engine.predict_mc(x, n, seed, return_samples=return_samples)

        async with self._admission.admit(model.config.name):
            result, timing = await self._timed_run(run, model.engine.mc_macs(len(x), n))
        self.metrics.child(self.metrics.mc_samples, model.config.name).observe(n)
        self.metrics.child(self.metrics.compute, model.config.name, "mc").observe(timing.compute_s)
        self._observe(model, "mc", timing)
        return MCAnswer(model=model, n_samples=n, seed=seed, result=result)

    async def compare(
        self,
        name: str,
        inputs: list[list[float]],
        n_samples: int | None,
        seed: int | None,
        n_train_passes: int,
    ) -> CompareAnswer:
        """What eval, a model left in train mode, and MC dropout answer to the same rows."""
        model = self.model(name)
        x = self.to_tensor(model, inputs)
        n = self.n_samples(n_samples)
        seed = secrets.randbits(63) if seed is None else seed
        seeds = train_pass_seeds(seed, n_train_passes)
        engine = model.engine
        annotate(model=model.config.name, rows=len(x), n_samples=n)

        block = self.settings.eval_block_rows
        padded = -(-len(x) // block) * block
        pass_macs = engine.mc_macs(len(x), 1)

        def train_pass(s: int) -> Callable[[], torch.Tensor]:
            return lambda: engine.train_pass(x, s)

        async with self._admission.admit(model.config.name):
            # Each piece runs where predict and predict/mc would run it, so all three answer
            # the same bits for the same rows and seed.
            eval_out, e0, e1 = await self._execute(
                lambda: blocked_predict(engine, x, block), engine.eval_macs(padded), eval_pass=True
            )
            passes, pass_s = [], []
            for s in seeds:
                y, p0, p1 = await self._execute(train_pass(s), pass_macs)
                passes.append(y)
                pass_s.append(p1 - p0)
            mc, m0, m1 = await self._execute(
                lambda: engine.predict_mc(x, n, seed), engine.mc_macs(len(x), n)
            )
        return CompareAnswer(
            model=model,
            n_samples=n,
            seed=seed,
            eval=eval_out,
            train_pass_seeds=seeds,
            train_passes=torch.stack(passes),
            mc=mc,
            eval_seconds=e1 - e0,
            train_pass_seconds=pass_s,
            mc_seconds=m1 - m0,
        )

    async def _run(self, fn: Callable[[], T], *, eval_pass: bool = False) -> T:
        """Run ``fn`` on a pool: the one-thread eval pool, or the inference threads."""
        pool = self._eval_executor if eval_pass else self._executor
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    async def _execute(
        self, fn: Callable[[], T], macs: int, *, eval_pass: bool = False
    ) -> tuple[T, float, float]:
        """Run ``fn``, a job of ``macs`` multiply-adds: on the event loop (one intra-op
        thread) when it is small, else on a pool: eval passes on the one-thread eval pool,
        MC work on the inference threads. Where an MC job runs depends on its request alone.
        Returns the result and when it started and ended."""
        if macs <= self.settings.inline_max_macs:
            return timed(fn)()
        return await self._run(timed(fn), eval_pass=eval_pass)

    async def _execute_eval(self, fn: Callable[[], T], macs: int) -> tuple[T, float, float]:
        return await self._execute(fn, macs, eval_pass=True)

    async def _timed_run(
        self, fn: Callable[[], T], macs: int, *, eval_pass: bool = False
    ) -> tuple[T, Timing]:
        """Run ``fn`` (see ``_execute``); also say how long it queued and computed."""
        queued = time.perf_counter()
        result, start, end = await self._execute(fn, macs, eval_pass=eval_pass)
        return result, Timing(start - queued, end - start)

    def _batcher(self, model: LoadedModel) -> EvalBatcher:
        name = model.config.name
        batcher = self._batchers.get(name)
        if batcher is None:
            s = self.settings
            batcher = self._batchers[name] = EvalBatcher(
                name,
                model.engine,
                self._execute_eval,
                self.metrics,
                max_rows=s.max_batch_size,
                max_delay_s=s.max_delay_ms / 1000,
                block_rows=s.eval_block_rows,
            )
        return batcher

    def _observe(self, model: LoadedModel, kind: str, timing: Timing) -> None:
        self.metrics.child(self.metrics.queue_wait, model.config.name, kind).observe(timing.queue_s)
        annotate(
            queue_ms=round(timing.queue_s * 1000, 3),
            compute_ms=round(timing.compute_s * 1000, 3),
            batch_requests=timing.batch_requests,
        )

    def close(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()
        self._executor.shutdown(wait=True, cancel_futures=False)
        self._eval_executor.shutdown(wait=True, cancel_futures=False)
