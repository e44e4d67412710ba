"""The data plane between HTTP and the engine: request checks, seeds, and threads.

Tensor work runs on a small thread pool so that the event loop keeps answering health
checks while a large MC request computes. Every protocol front end (v1, v2) calls this.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from service.engine import MCResult
from service.errors import InvalidInput, NotReady
from service.repository import LoadedModel, ModelRepository
from service.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class MCAnswer:
    model: LoadedModel
    n_samples: int
    seed: int
    result: MCResult


def _apply_torch_threads() -> None:
    """Give this thread the intra-op thread count the process set (``torch.set_num_threads``).

    OpenMP keeps that count per OS thread: without this, tensor work on the inference pool
    runs with OpenMP's default team (every core), whatever the main thread chose.
    """
    torch.set_num_threads(torch.get_num_threads())


class Runtime:
    """Validates requests against a model and the limits, then runs the engine off-loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository: ModelRepository | None = None
        self._executor = ThreadPoolExecutor(
            settings.inference_threads,
            thread_name_prefix="inference",
            initializer=_apply_torch_threads,
        )

    def model(self, name: str) -> LoadedModel:
        if self.repository is None:
            raise NotReady("models are still loading")
        return self.repository.get(name)

    def to_tensor(self, model: LoadedModel, inputs: list[list[float]]) -> torch.Tensor:
        """Check rows and widths against the model and the limits; return ``(B, in)``."""
        if len(inputs) > self.settings.max_rows:
            raise InvalidInput(
                ["inputs"], f"{len(inputs)} rows exceed the maximum of {self.settings.max_rows}"
            )
        width = model.config.input_dim
        for i, row in enumerate(inputs):
            if len(row) != width:
                raise InvalidInput(
                    ["inputs", i],
                    f"row {i} has {len(row)} values; model {model.config.name!r} expects {width}",
                )
        x = torch.tensor(inputs, dtype=torch.float32)
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(1).nonzero()[0, 0])
            raise InvalidInput(["inputs", bad], f"row {bad} holds a value beyond float32 range")
        return x

    def n_samples(self, requested: int | None) -> int:
        n = self.settings.default_n_samples if requested is None else requested
        if not 2 <= n <= self.settings.max_n_samples:
            raise InvalidInput(
                ["n_samples"], f"n_samples must be in [2, {self.settings.max_n_samples}], got {n}"
            )
        return n

    async def predict(
        self, name: str, inputs: list[list[float]]
    ) -> tuple[LoadedModel, torch.Tensor]:
        model = self.model(name)
        x = self.to_tensor(model, inputs)
        return model, await self._run(model.engine.predict, x)

    async def predict_mc(
        self,
        name: str,
        inputs: list[list[float]],
        n_samples: int | None,
        seed: int | None,
        return_samples: bool = False,
    ) -> MCAnswer:
        model = self.model(name)
        x = self.to_tensor(model, inputs)
        n = self.n_samples(n_samples)
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

        return MCAnswer(model=model, n_samples=n, seed=seed, result=await self._run(run))

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
