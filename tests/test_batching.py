"""Dynamic batching: coalesced eval answers are bit-identical to solo answers.

The fixed-block forward pass is checked directly (every batch size 1..64, every position,
other rows random) on the block the service chooses on this machine (``choose_block``), and
through the HTTP service, batching on against batching off. The choice itself is checked
with engines whose passes move a row's bits with its position, as some BLAS kernels do.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.core.engine import MLPEngine
from service.core.repository import load_model
from service.serving.batching import (
    FALLBACK_BLOCK_ROWS,
    EvalBatcher,
    blocked_predict,
    choose_block,
    row_invariant,
)
from service.serving.jobs import JobRunner
from service.serving.metrics import Metrics
from service.settings import Settings
from tests.helpers import (
    classifier_config,
    deep_regression_config,
    live_server,
    random_tensors,
    scrape,
    wide_regression_config,
)

ROOT = Path(__file__).resolve().parents[1]
BLOCK = Settings().eval_block_rows


def engines() -> dict[str, MLPEngine]:
    deep, clf, wide = deep_regression_config(), classifier_config(), wide_regression_config()
    return {
        "deep": MLPEngine(deep, random_tensors(deep, 1)),
        "clf": MLPEngine(clf, random_tensors(clf, 2)),
        "wide": MLPEngine(wide, random_tensors(wide, 3)),
        "concrete": load_model(ROOT / "models" / "concrete").engine,
    }


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}-threads")
def torch_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.usefixtures("torch_threads")
@pytest.mark.parametrize("name", list(engines()))
def test_every_row_is_the_same_at_any_batch_size_and_position(name: str) -> None:
    engine = engines()[name]
    block = choose_block(engine, BLOCK)  # as the service does; BLOCK itself where it can
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, engine.config.input_dim, generator=g) * 2
    solo = torch.cat([blocked_predict(engine, x[i : i + 1], block) for i in range(64)])
    for n in range(1, 65):
        chosen = torch.randperm(64, generator=g)[:n]
        # Random rows before the chosen ones move them across positions and block borders.
        before = torch.randn(int(torch.randint(0, 2 * block, (1,), generator=g)), x.shape[1])
        batch = torch.cat([before, x[chosen]])
        out = blocked_predict(engine, batch, block)[len(before) :]
        assert torch.equal(out, solo[chosen]), f"batch of {n}: a row changed"


class Positional(MLPEngine):
    """An engine whose pass is exact elementwise arithmetic, except that passes of ``rows``
    rows (any but one, when None) move the odd positions' outputs by one ulp:
    position-dependent kernels, made on purpose, on any machine."""

    def __init__(self, rows: int | None = None) -> None:
        config = deep_regression_config()
        super().__init__(config, random_tensors(config, 1))
        self._few_in_python = False  # every pass of it, one block's too, is ``predict``
        self.rows = rows

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = x[:, :1] * 2.0
        if len(x) > 1 and self.rows in (None, len(x)):
            out[1::2] = torch.nextafter(out[1::2], torch.full_like(out[1::2], math.inf))
        return out


def test_choose_block_falls_back_where_a_position_moves_bits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert row_invariant(Positional(64), 16)
    assert not row_invariant(Positional(16), 16)
    with caplog.at_level(logging.WARNING, logger="service.serving.batching"):
        assert choose_block(Positional(64), 16) == 16  # nothing to fall back from
        assert not caplog.records
        assert choose_block(Positional(16), 16) == FALLBACK_BLOCK_ROWS
        assert choose_block(Positional(), 16) == 1  # no block keeps the bits
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert "uses blocks of 64 rows" in said[0]
    assert "every row computes in its own pass" in said[1]


def test_row_by_row_keeps_every_answer_where_no_block_does() -> None:
    """With one row per pass, a position-dependent engine still answers each row alike
    alone or batched; with a block, it would not."""
    engine = Positional()
    x = torch.randn(5, 4)
    solo = torch.cat([blocked_predict(engine, x[i : i + 1], 1) for i in range(5)])
    assert torch.equal(blocked_predict(engine, x, 1), solo)
    assert not torch.equal(blocked_predict(engine, x, 16), solo)


def test_a_single_row_is_a_full_padded_pass() -> None:
    """The solo path and a one-row block agree with the engine on the padded block."""
    engine = engines()["concrete"]
    x = torch.randn(3, 8)
    padded = torch.cat([x, torch.zeros(BLOCK - 3, 8)])
    assert torch.equal(blocked_predict(engine, x, BLOCK), engine.predict(padded)[:3])


def test_batcher_coalesces_and_answers_each_request_as_alone() -> None:
    engine = engines()["deep"]
    metrics = Metrics()
    rng = random.Random(1)
    requests = [torch.randn(rng.randint(1, 9), 4) for _ in range(40)]
    block = choose_block(engine, BLOCK)
    solo = [blocked_predict(engine, x, block) for x in requests]

    async def burst() -> list[torch.Tensor]:
        jobs = JobRunner(inline_max_macs=0, inference_threads=1, tile_threads=1)

        async def run(work: Any, macs: int) -> Any:
            assert macs % engine.eval_macs(block) == 0  # whole padded blocks
            return await jobs.run(work, macs, "eval")

        batcher = EvalBatcher(
            "deep", engine, run, metrics, max_rows=64, max_delay_s=0.01, block_rows=block
        )
        answers = await asyncio.gather(*(batcher.predict(x) for x in requests))
        batcher.close()
        jobs.close()
        assert max(a.shared for a in answers) > 1
        return [a.result for a in answers]

    for got, alone in zip(asyncio.run(burst()), solo, strict=True):
        assert torch.equal(got, alone)
    count = metrics.registry.get_sample_value("dropout_batch_requests_count", {"model": "deep"})
    total = metrics.registry.get_sample_value("dropout_batch_requests_sum", {"model": "deep"})
    assert total == 40
    assert count is not None
    assert count < 40 / 3, f"{count} batches for 40 requests: not coalesced"
    rows = metrics.registry.get_sample_value("dropout_batch_rows_sum", {"model": "deep"})
    assert rows == sum(len(x) for x in requests)


def test_a_lone_request_is_its_own_batch_and_a_burst_still_coalesces() -> None:
    """With passes computed on the loop: a request alone on the loop is computed at once,
    without the worker task; requests started in the same turn of the loop share passes.
    Either way each gets its solo bits."""
    engine = engines()["deep"]
    block = choose_block(engine, BLOCK)
    xs = [torch.randn(2, 4) for _ in range(12)]
    solo = [blocked_predict(engine, x, block) for x in xs]

    async def main() -> tuple[Any, list[Any], bool]:
        jobs = JobRunner(inline_max_macs=10**12, inference_threads=1, tile_threads=1)

        async def run(work: Any, macs: int) -> Any:
            return await jobs.run(work, macs, "eval")

        batcher = EvalBatcher(
            "deep", engine, run, Metrics(), max_rows=64, max_delay_s=0,
            block_rows=block, inline=jobs.inline,
        )  # fmt: skip
        await asyncio.sleep(0)  # nothing else ready on the loop
        lone = await batcher.predict(xs[0])
        started = batcher._worker is not None
        burst = await asyncio.gather(*(batcher.predict(x) for x in xs[1:]))
        batcher.close()
        jobs.close()
        return lone, burst, started

    lone, burst, worker_started = asyncio.run(main())
    assert not worker_started
    assert lone.shared == 1
    assert torch.equal(lone.result, solo[0])
    assert max(a.shared for a in burst) > 1  # the burst coalesced
    for got, alone in zip(burst, solo[1:], strict=True):
        assert torch.equal(got.result, alone)


def eval_bodies() -> list[dict[str, Any]]:
    rng = random.Random(2)
    return [
        {"inputs": [[rng.uniform(-3, 3) for _ in range(4)] for _ in range(rng.randint(1, 6))]}
        for _ in range(48)
    ]


async def concurrently(url: str, bodies: list[dict[str, Any]]) -> list[Any]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(body: dict[str, Any]) -> Any:
            r = await client.post("/v1/models/deep/predict", json=body)
            assert r.status_code == 200, r.text[:200]
            return r.json()

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def test_http_batched_answers_equal_solo_and_unbatched(model_dir: Path) -> None:
    bodies = eval_bodies()
    batched = Settings(model_dir=model_dir, max_delay_ms=20)
    with live_server(batched) as s:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            solo = [c.post("/v1/models/deep/predict", json=b).json() for b in bodies]
        before = scrape(s.url)
        loaded = asyncio.run(concurrently(s.url, bodies))
        after = scrape(s.url)
    key = ("dropout_batch_requests_count", (("model", "deep"),))
    batches = after[key] - before[key]
    assert batches < len(bodies) / 2, f"{batches} batches for {len(bodies)} requests"
    assert loaded == solo

    unbatched = Settings(model_dir=model_dir, batching=False)
    with live_server(unbatched) as s:
        assert asyncio.run(concurrently(s.url, bodies)) == solo


def test_answers_are_the_same_computed_on_the_event_loop_or_the_inference_threads(
    model_dir: Path,
) -> None:
    # Small jobs run on the event loop with one intra-op thread, the rest on the inference
    # threads, spreading MC tiles over DROPOUT_TORCH_THREADS: neither may show in the bits.
    bodies = eval_bodies()
    mc = [{**b, "n_samples": 20, "seed": i} for i, b in enumerate(bodies[:12])]
    answers = []
    for inline_max_macs in (Settings(model_dir=model_dir).inline_max_macs, 0):
        settings = Settings(model_dir=model_dir, torch_threads=2, inline_max_macs=inline_max_macs)
        with live_server(settings) as s, httpx.Client(base_url=s.url, timeout=30) as c:
            engine = MLPEngine(deep_regression_config(), random_tensors(deep_regression_config()))
            assert engine.eval_macs(BLOCK) <= settings.inline_max_macs or inline_max_macs == 0
            answers.append(
                (
                    asyncio.run(concurrently(s.url, bodies)),
                    [c.post("/v1/models/deep/predict/mc", json=b).json() for b in mc],
                )
            )
    assert answers[0] == answers[1]


def test_the_data_plane_serves_the_block_it_checked(tmp_path: Path) -> None:
    """A model whose kernels move bits in every block is served row by row: its replay
    scope says so, and its batched answers equal its solo ones."""
    import numpy as np

    from service.core.repository import LoadedModel
    from service.serving.dataplane import DataPlane, InferRequest
    from tests.helpers import write_test_repository

    write_test_repository(tmp_path)
    plane = DataPlane(Settings(model_dir=tmp_path))
    rows = np.random.default_rng(0).normal(size=(6, 4))

    async def main() -> tuple[int, list[np.ndarray], list[np.ndarray]]:
        await plane.load("cpu")
        assert plane.repository is not None
        served = plane.model("deep")
        odd = LoadedModel(served.config, Positional(), served.path)
        plane.repository.models["deep"] = odd
        ask = [plane.infer(InferRequest("deep", rows[i : i + 1])) for i in range(6)]
        together = await asyncio.gather(*ask)  # batched: one turn of the loop
        alone = [await plane.infer(InferRequest("deep", rows[i : i + 1])) for i in range(6)]
        scope = plane.replay_scope(odd)["eval_block_rows"]
        assert isinstance(scope, int)
        return (
            scope,
            [a.outputs["output"].numpy() for a in together],
            [a.outputs["output"].numpy() for a in alone],
        )

    try:
        block, together, alone = asyncio.run(main())
    finally:
        plane.close()
    assert block == 1
    assert [t.tobytes() for t in together] == [a.tobytes() for a in alone]


def test_a_model_that_cannot_compute_a_pass_is_refused_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block check at load computes passes: a model failing there is refused with its
    reason, and the repository's other models serve."""
    import service.serving.dataplane as dataplane
    from tests.helpers import write_test_repository

    write_test_repository(tmp_path)
    real = dataplane.choose_block

    def failing(engine: MLPEngine, preferred: int) -> int:
        if engine.config.name == "deep":
            raise RuntimeError("no pass today")
        return real(engine, preferred)

    monkeypatch.setattr(dataplane, "choose_block", failing)
    plane = dataplane.DataPlane(Settings(model_dir=tmp_path))
    try:
        asyncio.run(plane.load("cpu"))
        ready = plane.readiness()
    finally:
        plane.close()
    assert "no pass today" in ready.failed["deep"]
    assert "deep" not in ready.models
    assert ready.models  # the others
