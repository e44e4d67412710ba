"""The inference pool runs tensor work with the intra-op thread count the process chose."""

from __future__ import annotations

import asyncio
import ctypes
import os
from pathlib import Path

import pytest
import torch

from service.runtime import Runtime
from service.settings import Settings


def openmp() -> ctypes.CDLL:
    """The OpenMP runtime torch loaded (its thread count is per OS thread)."""
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    libs = sorted({line.split()[-1] for line in maps.splitlines() if "gomp" in line})
    # scikit-learn or scipy may have loaded a libgomp of their own: ask torch's copy.
    ours = [lib for lib in libs if "/torch/" in lib] or libs
    if not ours:
        pytest.skip("torch runs without GNU OpenMP here")
    return ctypes.CDLL(ours[0])


def test_inference_threads_use_the_configured_torch_threads(tmp_path: Path) -> None:
    omp = openmp()
    before = torch.get_num_threads()
    wanted = 3 if (os.cpu_count() or 1) != 3 else 2  # differs from OpenMP's default team
    runtime = Runtime(Settings(model_dir=tmp_path, inference_threads=2, torch_threads=wanted))
    try:

        async def both_pool_threads() -> list[int]:
            return list(
                await asyncio.gather(*(runtime._run(omp.omp_get_max_threads) for _ in range(4)))
            )

        assert asyncio.run(both_pool_threads()) == [wanted] * 4

        async def eval_pool_threads() -> list[int]:
            jobs = (runtime._run(omp.omp_get_max_threads, eval_pass=True) for _ in range(4))
            return list(await asyncio.gather(*jobs))

        assert asyncio.run(eval_pool_threads()) == [1] * 4  # eval passes: one thread, always
    finally:
        runtime.close()
        torch.set_num_threads(before)
