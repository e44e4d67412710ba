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
#: Request rows as JSON gives them, or a ``(B, in)`` tensor decoded from binary data.
Inputs = list[list[float]] | torch.Tensor


@dataclass(frozen=True)
class MCAnswer:
    model: LoadedModel
    n_samples: int
    seed: int
    result: MCResult


class Runtime:
    """Validates requests against a model and the limits, then runs the engine off-loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository: ModelRepository | None = None
        self._executor = ThreadPoolExecutor(
            settings.inference_threads, thread_name_prefix="inference"
        )

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
        x = torch.as_tensor(inputs, dtype=torch.float32)
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

    async def predict(self, name: str, inputs: Inputs) -> tuple[LoadedModel, torch.Tensor]:
        model = self.model(name)
        x = self.to_tensor(model, inputs)
        return model, await self._run(model.engine.predict, x)

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
