"""The data plane between HTTP and the engine: request checks, seeds, limits and threads.

Tensor work runs through ``jobs.JobRunner``: on thread pools, so that the event loop keeps
answering health checks while a large MC request computes, or on the event loop itself for
a job of at most ``inline_max_macs`` multiply-adds, where the hand-off costs more than the
work. Every protocol front end (v1, v2) calls this. No answer leaves with a number JSON
cannot carry (``check_outputs``).
Each request is admitted per model (bounded, with a deadline; see ``limits.Admission``);
eval requests are coalesced by a per-model ``EvalBatcher`` or, with batching off, run alone
through the same fixed-block forward pass, so both paths give the same bits.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.core.engine import MCResult
from service.core.errors import InvalidInput, NotReady
from service.core.repository import LoadedModel, ModelRepository
from service.protocols.http.limits import Admission
from service.serving.batching import EvalBatcher, blocked_predict
from service.serving.jobs import JobRunner, Ran
from service.serving.metrics import Metrics
from service.serving.observe import annotate
from service.serving.outputs import mc_outputs
from service.settings import Settings

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


def check_outputs(model: LoadedModel, outputs: Mapping[str, torch.Tensor]) -> None:
    """Refuse an answer holding a number JSON cannot carry (NaN, infinity), naming the rows.

    Finite inputs can still overflow inside the model (values near float32's limit times
    the weights); the answer would otherwise carry ``null`` where a number belongs. Every
    tensor has rows on its first axis (``samples``, rows on its second, is finite when the
    mean over it is).
    """
    bad: set[int] = set()
    for name, t in outputs.items():
        if name == "samples":
            continue
        finite = torch.isfinite(t).reshape(len(t), -1).all(1)
        if not bool(finite.all()):
            bad.update(torch.nonzero(~finite).flatten().tolist())
    if bad:
        rows = sorted(bad)
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise InvalidInput(
            ["inputs", rows[0]],
            f"model {model.config.name!r} computes outputs beyond float range for rows "
            f"[{shown}]: their values are too large for this model",
        )


class Runtime:
    """Validates requests against a model and the limits, then runs the engine."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.repository: ModelRepository | None = None
        self.jobs = JobRunner(
            inline_max_macs=settings.inline_max_macs,
            inference_threads=settings.inference_threads,
            tile_threads=settings.intra_op_threads(),
        )
        self._admission = Admission(
            settings.max_queue_size, settings.request_timeout_s, self.metrics
        )
        self._batchers: dict[str, EvalBatcher] = {}

    def model(self, name: str) -> LoadedModel:
        if self.repository is None:
            raise NotReady("models are still loading")
        return self.repository.get(name)

    def replay_scope(self, model: LoadedModel) -> dict[str, str | int]:
        """What an answer's bits depend on beyond the request (DESIGN.md contract 6)."""
        return {**model.engine.replay_scope(), "eval_block_rows": self.settings.eval_block_rows}

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
                ran = await self._batcher(model).predict(x)
            else:
                ran = await self._eval(model, x)
                self.metrics.observe_batch(model.config.name, 1, len(x), ran.compute_s)
        check_outputs(model, {"output": ran.result})
        self._observe(model, "eval", ran)
        return model, ran.result

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
        async with self._admission.admit(model.config.name):
            ran = await self._mc(model, x, n, seed, return_samples)
        self.metrics.child(self.metrics.mc_samples, model.config.name).observe(n)
        self.metrics.child(self.metrics.compute, model.config.name, "mc").observe(ran.compute_s)
        self._observe(model, "mc", ran)
        return MCAnswer(model=model, n_samples=n, seed=seed, result=ran.result)

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

        def train_pass(s: int) -> Callable[[Callable[[], bool]], torch.Tensor]:
            return lambda _: engine.train_pass(x, s)

        async with self._admission.admit(model.config.name):
            # Each piece runs where predict and predict/mc would run it, so all three answer
            # the same bits for the same rows and seed.
            ev = await self._eval(model, x)
            passes = [
                await self.jobs.run(train_pass(s), engine.mc_macs(len(x), 1), "mc") for s in seeds
            ]
            mc = await self._mc(model, x, n, seed, False)
        train_passes = torch.stack([p.result for p in passes])
        check_outputs(model, {"eval": ev.result, "train_passes": train_passes.transpose(0, 1)})
        return CompareAnswer(
            model=model,
            n_samples=n,
            seed=seed,
            eval=ev.result,
            train_pass_seeds=seeds,
            train_passes=train_passes,
            mc=mc.result,
            eval_seconds=ev.compute_s,
            train_pass_seconds=[p.compute_s for p in passes],
            mc_seconds=mc.compute_s,
        )

    async def _eval(self, model: LoadedModel, x: torch.Tensor) -> Ran[torch.Tensor]:
        """One eval job over zero-padded blocks, as a batch of one."""
        block = self.settings.eval_block_rows
        padded = -(-len(x) // block) * block
        return await self.jobs.run(
            lambda _: blocked_predict(model.engine, x, block),
            model.engine.eval_macs(padded),
            "eval",
        )

    async def _mc(
        self, model: LoadedModel, x: torch.Tensor, n: int, seed: int, return_samples: bool
    ) -> Ran[MCResult]:
        """One MC job; its answer is checked for numbers JSON cannot carry."""
        engine = model.engine
        macs = engine.mc_macs(len(x), n)
        tiles = map if self.jobs.inline(macs) else self.jobs.map_tiles

        def work(stopped: Callable[[], bool]) -> MCResult:
            return engine.predict_mc(
                x, n, seed, return_samples=return_samples, stop=stopped, map_tiles=tiles
            )

        ran = await self.jobs.run(work, macs, "mc")
        check_outputs(model, mc_outputs(model.config, ran.result))
        return ran

    def _batcher(self, model: LoadedModel) -> EvalBatcher:
        name = model.config.name
        batcher = self._batchers.get(name)
        if batcher is None:
            s = self.settings

            batcher = self._batchers[name] = EvalBatcher(
                name,
                model.engine,
                functools.partial(self.jobs.run, kind="eval"),
                self.metrics,
                max_rows=s.max_batch_size,
                max_delay_s=s.max_delay_ms / 1000,
                block_rows=s.eval_block_rows,
            )
        return batcher

    def _observe(self, model: LoadedModel, kind: str, ran: Ran[Any]) -> None:
        self.metrics.child(self.metrics.queue_wait, model.config.name, kind).observe(ran.queue_s)
        annotate(
            queue_ms=round(ran.queue_s * 1000, 3),
            compute_ms=round(ran.compute_s * 1000, 3),
            batch_requests=ran.shared,
        )

    def close(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()
        self.jobs.close()
