"""Contracts 1 and 2 under load: answers are bit-identical to the same request sent alone."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx

from service.core.repository import load_model
from service.settings import Settings
from tests.helpers import LiveServer, live_server, scrape

N_MC = 64


def mc_bodies() -> list[dict[str, object]]:
    rng = random.Random(0)
    return [
        {
            "inputs": [[rng.uniform(-3, 3) for _ in range(4)] for _ in range(rng.randint(1, 8))],
            "n_samples": rng.choice([2, 10, 100, 500]),
            "seed": rng.randrange(2**63),
        }
        for _ in range(N_MC)
    ]


EVAL_BODY = {"inputs": [[0.5, -1.0, 2.0, 0.25], [3.0, 3.0, -3.0, 0.0]]}


async def run_concurrently(url: str, bodies: list[dict[str, object]]) -> tuple[list, list]:
    limits = httpx.Limits(max_connections=N_MC + 16)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def mc(body: dict[str, object]) -> object:
            r = await client.post("/v1/models/deep/predict/mc", json=body)
            assert r.status_code == 200, r.text[:200]
            return r.json()

        async def ev() -> object:
            r = await client.post("/v1/models/deep/predict", json=EVAL_BODY)
            assert r.status_code == 200, r.text[:200]
            return r.json()

        tasks = [mc(b) for b in bodies] + [ev() for _ in range(16)]
        results = await asyncio.gather(*tasks)
    return list(results[:N_MC]), list(results[N_MC:])


def test_concurrent_mc_and_eval_equal_solo_answers(
    server: LiveServer, client: httpx.Client
) -> None:
    bodies = mc_bodies()
    solo_mc = [client.post("/v1/models/deep/predict/mc", json=b).json() for b in bodies]
    solo_eval = client.post("/v1/models/deep/predict", json=EVAL_BODY).json()

    concurrent_mc, concurrent_eval = asyncio.run(run_concurrently(server.url, bodies))

    for body, alone, loaded in zip(bodies, solo_mc, concurrent_mc, strict=True):
        assert loaded == alone, f"seed {body['seed']} answered differently under load"
    assert all(e == solo_eval for e in concurrent_eval)
    assert len({str(a["mean"]) for a in solo_mc}) == N_MC  # the requests really differ


def test_parallel_mc_jobs_on_the_threads_equal_their_solo_answers(wide_model_dir: Path) -> None:
    """Real parallelism: MC jobs too large for the event loop, two inference threads, two
    tile threads, 48 requests at once; every answer equals the one a server with a single
    thread of each gives to the request alone."""
    rng = random.Random(1)
    bodies = [
        {
            "inputs": [[rng.uniform(-3, 3) for _ in range(8)] for _ in range(rng.randint(1, 4))],
            "n_samples": rng.choice([300, 1000, 3000]),
            "seed": rng.randrange(2**63),
        }
        for _ in range(48)
    ]
    engine = load_model(wide_model_dir / "wide").engine
    small = min(engine.mc_macs(len(b["inputs"]), b["n_samples"]) for b in bodies)  # type: ignore[arg-type]
    assert small > Settings().inline_max_macs  # every one runs on the inference threads

    alone = Settings(model_dir=wide_model_dir, inference_threads=1, torch_threads=1)
    with live_server(alone) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        solo = [c.post("/v1/models/wide/predict/mc", json=b).json() for b in bodies]

    parallel = Settings(model_dir=wide_model_dir, inference_threads=2, torch_threads=2)
    with live_server(parallel) as s:

        async def all_at_once() -> list[object]:
            limits = httpx.Limits(max_connections=len(bodies))
            async with httpx.AsyncClient(base_url=s.url, timeout=120, limits=limits) as client:
                answers = await asyncio.gather(
                    *(client.post("/v1/models/wide/predict/mc", json=b) for b in bodies)
                )
            assert all(r.status_code == 200 for r in answers)
            return [r.json() for r in answers]

        loaded = asyncio.run(all_at_once())
        busiest = scrape(s.url)
    assert loaded == solo
    mc_jobs = busiest[
        ("dropout_inference_compute_seconds_count", (("kind", "mc"), ("model", "wide")))
    ]
    assert mc_jobs == len(bodies)
