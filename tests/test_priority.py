"""Eval first: while eval requests are served, MC jobs take turns and a share of the time.

The lane's spacing is checked from below only (a job's next turn never comes sooner than
its share allows); a slow machine can only widen the gaps, never fail the check.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from service.serving import observe
from service.serving.dataplane import DataPlane, InferRequest, MCParams
from service.serving.priority import EvalFirst
from service.settings import Settings
from tests.helpers import write_test_repository

JOB_S = 0.02  # each MC job below holds the loop this long, as an inline job computes


async def turns(lane: EvalFirst, jobs: int) -> tuple[list[int], list[float], list[float | None]]:
    """Run ``jobs`` MC turns at once; the order they ran in, their starts and waits."""
    order: list[int] = []
    starts: list[float] = []
    waits: list[float | None] = []

    async def job(i: int) -> None:
        async with lane.mc_turn() as waited:
            order.append(i)
            starts.append(time.perf_counter())
            waits.append(waited)
            time.sleep(JOB_S)

    await asyncio.gather(*(job(i) for i in range(jobs)))
    return order, starts, waits


def test_mc_jobs_take_turns_and_their_share_while_eval_is_served() -> None:
    async def main() -> tuple[list[int], list[float], list[float | None]]:
        lane = EvalFirst(share=0.5, window_s=0.01)
        lane.eval_started()  # an eval request in progress throughout
        return await turns(lane, 4)

    order, starts, waits = asyncio.run(main())
    assert order == [0, 1, 2, 3]  # first come, first served; every one ran: no starvation
    assert all(w is not None for w in waits)
    # A job of d seconds at share 0.5 moves the next start 2d on, less the window's credit.
    gaps = np.diff(starts)
    assert (gaps >= 2 * JOB_S - 0.01 - 1e-3).all(), gaps
    assert all(w is not None and w > 0.01 for w in waits[1:])  # each later one waited


def test_without_eval_traffic_mc_jobs_go_ahead() -> None:
    async def main() -> list[float | None]:
        lane = EvalFirst(share=0.5, window_s=0.01)
        lane.eval_started()
        lane.eval_ended()
        await asyncio.sleep(0.02)  # past the window: no eval traffic
        idle = (await turns(lane, 3))[2]
        off = EvalFirst(share=1.0)
        off.eval_started()  # share 1: no priority, even with eval in progress
        return idle + (await turns(off, 3))[2]

    assert asyncio.run(main()) == [None] * 6


def test_waiting_mc_goes_on_once_eval_traffic_stops() -> None:
    async def main() -> list[float]:
        lane = EvalFirst(share=0.01, window_s=0.01)  # after a 20 ms job, the next in 2 s
        lane.eval_started()

        async def stop_eval() -> None:
            await asyncio.sleep(0.05)
            lane.eval_ended()

        stopping = asyncio.create_task(stop_eval())
        starts = (await turns(lane, 2))[1]
        await stopping
        return starts

    starts = asyncio.run(main())
    assert starts[1] - starts[0] < 1.0  # not the 2 s its share alone would make it wait


def test_the_share_is_between_0_and_1() -> None:
    for share in (0, -0.1, 1.5):
        with pytest.raises(ValidationError):
            Settings(mc_share=share)
        with pytest.raises(ValueError, match="share must be in"):
            EvalFirst(share)


def test_an_mc_answer_is_the_same_bits_with_and_without_eval_traffic(tmp_path: Path) -> None:
    write_test_repository(tmp_path)
    plane = DataPlane(Settings(model_dir=tmp_path, mc_share=0.5))
    request = InferRequest("deep", np.ones((2, 4)), mc=MCParams(n_samples=20, seed=1))

    async def answer() -> tuple[bytes, float | None]:
        with observe.record() as fields:
            result = await plane.infer(request)
        return result.outputs["mean"].numpy().tobytes(), fields.get("priority_wait_ms")

    async def main() -> list[tuple[bytes, float | None]]:
        await plane.load("cpu")
        alone = await answer()
        plane.priority.eval_started()  # as while an eval request is served
        try:
            beside = await asyncio.gather(answer(), answer())
        finally:
            plane.priority.eval_ended()
        return [alone, *beside]

    try:
        (alone, no_wait), *beside = asyncio.run(main())
    finally:
        plane.close()
    assert no_wait is None  # no eval traffic: no lane, nothing in the access line
    assert [bits for bits, _ in beside] == [alone, alone]
    assert all(waited is not None for _, waited in beside)  # both went through the lane
