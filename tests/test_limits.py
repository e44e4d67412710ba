"""Backpressure: a full model answers 503 with Retry-After at once, a late one 504; both
recover. (413 for a large body is in test_api.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import torch

from service.core.repository import load_model
from service.settings import Settings
from tests.helpers import live_server, scrape

ROW = [0.5, -1.0, 2.0, 0.25, 1.0, 0.0, -2.0, 3.0]
MC = "/v1/models/wide/predict/mc"
EVAL = "/v1/models/wide/predict"


async def burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=n)
    ) as client:
        bodies = [{"inputs": [ROW], "n_samples": 2000, "seed": i} for i in range(n)]
        return list(await asyncio.gather(*(client.post(MC, json=b) for b in bodies)))


def test_burst_past_the_queue_limit_gets_fast_503s_and_recovers(wide_model_dir: Path) -> None:
    settings = Settings(model_dir=wide_model_dir, max_queue_size=2)
    with live_server(settings) as s:
        answers = asyncio.run(burst(s.url, 24))
        codes = sorted(r.status_code for r in answers)
        assert set(codes) == {200, 503}, codes  # every request answered: none hung or lost
        assert codes.count(200) >= 2
        for r in answers:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert "retry" in r.json()["detail"]
        metrics = scrape(s.url)
        rejected = (("model", "wide"), ("reason", "overloaded"))
        assert metrics[("dropout_inference_rejected_requests_total", rejected)] == codes.count(503)
        assert metrics[("dropout_inference_pending_requests", (("model", "wide"),))] == 0
        # Recovered: the queue drained, so the next request is admitted.
        again = httpx.post(f"{s.url}{MC}", json={"inputs": [ROW], "n_samples": 10, "seed": 1})
        assert again.status_code == 200


def test_request_past_its_deadline_is_504_and_the_service_recovers(
    wide_model_dir: Path,
) -> None:
    settings = Settings(model_dir=wide_model_dir, request_timeout_s=0.1)
    with live_server(settings) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        slow = c.post(MC, json={"inputs": [ROW] * 4, "n_samples": 10_000, "seed": 3})
        assert slow.status_code == 504
        assert "within 0.1 s" in slow.json()["detail"]
        metrics = scrape(s.url)
        late = (("model", "wide"), ("reason", "deadline"))
        assert metrics[("dropout_inference_rejected_requests_total", late)] == 1
        # The abandoned pass still finishes in its thread; later requests are served.
        for _ in range(100):
            r = c.post(EVAL, json={"inputs": [ROW]})
            if r.status_code == 200:
                break
        assert r.status_code == 200


def test_a_request_past_its_deadline_stops_computing_and_frees_its_slot_when_stopped(
    wide_model_dir: Path,
) -> None:
    """After a 504 the inference thread is free again: the next request (the only one the
    queue admits) is answered in about its own compute time, not after the abandoned one."""
    long_body = {"inputs": [ROW] * 16, "n_samples": 10_000, "seed": 3}
    short_body = {"inputs": [ROW], "n_samples": 2000, "seed": 4}
    engine = load_model(wide_model_dir / "wide").engine
    start = time.perf_counter()
    engine.predict_mc(torch.tensor(long_body["inputs"]), 10_000, 3)
    long_s = time.perf_counter() - start
    assert engine.mc_macs(1, 2000) > Settings().inline_max_macs  # both leave the event loop

    settings = Settings(
        model_dir=wide_model_dir,
        request_timeout_s=min(0.25, long_s / 4),
        max_queue_size=1,
    )
    with live_server(settings) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.post(MC, json=long_body).status_code == 504
        short = c.post(MC, json=short_body)
        assert short.status_code == 200, short.text
        assert short.elapsed.total_seconds() < long_s / 3, (short.elapsed, long_s)
        assert scrape(s.url)[("dropout_inference_pending_requests", (("model", "wide"),))] == 0
