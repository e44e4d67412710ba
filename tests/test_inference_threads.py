"""Every forward pass computes with one intra-op thread, wherever it runs, so that the thread
settings never change an answer's bits (DESIGN.md contract 6)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from service.core.engine import MLPEngine
from service.core.repository import LoadedModel
from service.serving.dataplane import DataPlane
from service.serving.jobs import MIN_SPREAD_TILE_MACS, JobRunner
from service.settings import Settings
from tests.helpers import random_tensors, wide_regression_config


@pytest.fixture
def three_threads() -> Iterator[None]:
    """The calling thread runs a team of three: what a pass must not inherit."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("three_threads")
def test_pool_threads_compute_with_one_intra_op_thread() -> None:
    jobs = JobRunner(inline_max_macs=0, inference_threads=2, tile_threads=2)
    try:

        async def report(kind: str) -> list[int]:
            runs = [jobs.run(lambda _: torch.get_num_threads(), 1, kind) for _ in range(4)]  # type: ignore[arg-type]
            return [r.result for r in await asyncio.gather(*runs)]

        assert asyncio.run(report("eval")) == [1] * 4
        assert asyncio.run(report("mc")) == [1] * 4
        tiles = list(jobs.map_tiles(lambda _: torch.get_num_threads(), range(8)))
        assert tiles == [1] * 8
    finally:
        jobs.close()


def test_only_tiles_that_pay_for_the_hand_over_go_to_the_tile_pool() -> None:
    jobs = JobRunner(inline_max_macs=0, inference_threads=1, tile_threads=2)
    alone = JobRunner(inline_max_macs=0, inference_threads=1, tile_threads=1)
    try:
        assert jobs.tile_map(MIN_SPREAD_TILE_MACS - 1) is map
        assert jobs.tile_map(MIN_SPREAD_TILE_MACS) == jobs.map_tiles
        assert alone.tile_map(MIN_SPREAD_TILE_MACS) is map  # no pool to spread over
    finally:
        jobs.close()
        alone.close()
    # A tile is tile_size samples past the prefix: what mc_macs counts for them.
    config = wide_regression_config()
    engine = MLPEngine(config, random_tensors(config))
    rows, n = 3, 5000
    tile = engine.tile_size(rows, n)
    assert 1 < tile < n
    prefix = engine.mc_macs(rows, 0)
    assert engine.tile_macs(rows, n) == engine.mc_macs(rows, tile) - prefix
    assert engine.tile_macs(rows, n) * (n // tile) <= engine.mc_macs(rows, n) - prefix


@pytest.mark.usefixtures("three_threads")
def test_the_engine_computes_on_one_thread_and_restores_the_callers_count() -> None:
    config = wide_regression_config()
    engine = MLPEngine(config, random_tensors(config))
    seen: list[int] = []
    original = engine._linear

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)  # type: ignore[arg-type]

    engine._linear = spy  # type: ignore[method-assign]
    x = torch.randn(3, 8)
    engine.predict(x)
    engine.predict_mc(x, 50, seed=1)
    engine.train_pass(x, seed=1)
    assert seen
    assert set(seen) == {1}
    assert torch.get_num_threads() == 3


def test_a_large_mc_request_spreads_its_tiles_over_the_tile_threads(tmp_path: Path) -> None:
    config = wide_regression_config()
    engine = MLPEngine(config, random_tensors(config))
    plane = DataPlane(Settings(model_dir=tmp_path, torch_threads=2))
    names: set[str] = set()
    original = engine._linear

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        names.add(threading.current_thread().name)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    engine._linear = spy  # type: ignore[method-assign]
    try:
        n = 20 * engine.tile_size(1, 10_000)
        engine.predict_mc(torch.randn(1, 8), n, seed=3, map_tiles=plane.jobs.map_tiles)
    finally:
        plane.close()
    assert len({name for name in names if name.startswith("tile")}) == 2, names


def test_an_mc_job_computes_on_the_loop_only_when_its_request_is_alone(tmp_path: Path) -> None:
    """Past ``inline_max_macs`` an MC job goes to the MC pool, unless its request is the only
    one in flight and the job is at most ``inline_alone_max_macs``: nothing waits then."""
    config = wide_regression_config()
    engine = MLPEngine(config, random_tensors(config))
    model = LoadedModel(config, engine, tmp_path)
    x = torch.randn(1, 8)
    n = 200
    macs = engine.mc_macs(1, n)
    where: list[str] = []
    original = engine.predict_mc

    def spy(*args: Any, **kwargs: Any) -> Any:
        where.append(threading.current_thread().name)
        return original(*args, **kwargs)

    engine.predict_mc = spy  # type: ignore[method-assign]

    def run(in_flight: int, **settings: Any) -> str:
        plane = DataPlane(Settings(model_dir=tmp_path, inline_max_macs=macs - 1, **settings))
        plane.metrics.in_flight.value = in_flight
        try:
            asyncio.run(plane._mc(model, x, n, seed=1, return_samples=False))
        finally:
            plane.close()
        return where.pop()

    loop = threading.current_thread().name
    assert run(1) == loop  # this request alone
    assert run(0) == loop  # the data plane called directly
    assert run(2) != loop  # another request in flight: the MC pool
    assert run(1, inline_alone_max_macs=macs - 1) != loop  # too large to hold the loop
    assert run(1, inline_alone_max_macs=0) != loop


@pytest.mark.parametrize("mask_mode", ["torch", "packed"])
def test_mc_bits_do_not_depend_on_the_thread_settings(mask_mode: str) -> None:
    """With torch 2.13 on x86, a 100x256 by 256x1 product differs in the last bit between 1
    and 2 intra-op threads; the answers must not."""
    config = wide_regression_config()
    engine = MLPEngine(config, random_tensors(config, seed=4), mask_mode=mask_mode)  # type: ignore[arg-type]
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)) * 3
    answers = []
    before = torch.get_num_threads()
    try:
        for threads, tile_threads in [(1, 1), (2, 1), (2, 2), (3, 3)]:
            torch.set_num_threads(threads)
            jobs = JobRunner(inline_max_macs=0, inference_threads=1, tile_threads=tile_threads)
            try:
                per_t = []
                for t in (10, 100, 1000, 3000):
                    r = engine.predict_mc(x, t, seed=7, map_tiles=jobs.map_tiles)
                    per_t.append((r.mean.numpy().tobytes(), r.variance.numpy().tobytes()))
            finally:
                jobs.close()
            answers.append(per_t)
    finally:
        torch.set_num_threads(before)
    assert all(a == answers[0] for a in answers[1:])
