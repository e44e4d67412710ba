"""The server as operators run it: several workers, SIGTERM mid-request, health under load."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from service.settings import Settings
from tests.helpers import live_server, scrape, serve

ROOT = Path(__file__).resolve().parents[1]
ROW = [0.5, -1.0, 2.0, 0.25, 1.0, 0.0, -2.0, 3.0]
LONG_MC = {"inputs": [ROW] * 4, "n_samples": 10_000, "seed": 5}
PENDING = ("dropout_inference_pending_requests", (("model", "wide"),))


def worker_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(c)
        for c in children
        if b"multiprocessing.spawn" in Path(f"/proc/{c}/cmdline").read_bytes()
    ]


def until_pending(url: str, thread: threading.Thread) -> None:
    """Wait until the long request is in the data plane (admitted, computing)."""
    while thread.is_alive() and scrape(url).get(PENDING, 0) < 1:
        time.sleep(0.01)
    assert thread.is_alive(), "the MC request ended before it could be observed"


def test_two_workers_both_serve_without_oversubscribing_cores(tmp_path: Path) -> None:
    with serve(tmp_path / "log", "--workers", "2", "--models", "models") as (proc, url):
        assert len(worker_pids(proc.pid)) == 2
        body = {"inputs": [[540, 0, 0, 162, 2.5, 1040, 676, 28]]}
        answers = set()
        for _ in range(8):  # a new connection each: the kernel spreads them over workers
            r = httpx.post(f"{url}/v1/models/concrete/predict", json=body)
            assert r.status_code == 200
            answers.add(json.dumps(r.json()))
            threads = scrape(url)[("dropout_torch_threads", ())]
            assert threads == max(1, (os.cpu_count() or 1) // 2)
        assert len(answers) == 1  # every worker gives the same bits
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(
    tmp_path: Path, wide_model_dir: Path
) -> None:
    log = tmp_path / "log"
    with serve(log, "--models", str(wide_model_dir), DROPOUT_TORCH_THREADS="1") as (proc, url):
        answer: dict[str, httpx.Response] = {}

        def long_request() -> None:
            answer["mc"] = httpx.post(f"{url}/v1/models/wide/predict/mc", json=LONG_MC, timeout=120)

        thread = threading.Thread(target=long_request)
        thread.start()
        until_pending(url, thread)
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        assert answer["mc"].status_code == 200
        assert answer["mc"].json()["n_samples"] == 10_000
        assert proc.wait(timeout=30) == 0
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    mc = [x for x in lines if x["endpoint"] == "/v1/models/{name}/predict/mc"]
    assert [(x["status"], x["n_samples"]) for x in mc] == [(200, 10_000)]


def test_health_answers_while_a_10000_sample_mc_request_computes(wide_model_dir: Path) -> None:
    settings = Settings(model_dir=wide_model_dir)
    with live_server(settings) as s:
        answer: dict[str, httpx.Response] = {}

        def long_request() -> None:
            answer["mc"] = httpx.post(
                f"{s.url}/v1/models/wide/predict/mc", json=LONG_MC, timeout=120
            )

        thread = threading.Thread(target=long_request)
        thread.start()
        until_pending(s.url, thread)
        waits = []
        while thread.is_alive():
            start = time.perf_counter()
            assert httpx.get(f"{s.url}/healthz").status_code == 200
            waits.append(time.perf_counter() - start)
        thread.join()
        mc_seconds = answer["mc"].elapsed.total_seconds()
        assert answer["mc"].status_code == 200
        assert len(waits) >= 5, f"{len(waits)} health answers during a {mc_seconds:.2f} s request"
        assert max(waits) < mc_seconds / 4


def test_metrics_of_two_workers_count_every_request_whichever_answers_the_scrape(
    tmp_path: Path,
) -> None:
    """prometheus_client's multiprocess mode: the service makes its folder (under TMPDIR),
    each worker writes there, any scrape adds them up, and the folder goes at shutdown."""
    body = {"inputs": [[540, 0, 0, 162, 2.5, 1040, 676, 28]]}
    log = tmp_path / "log"
    with serve(log, "--workers", "2", "--models", "models", TMPDIR=str(tmp_path)) as (proc, url):
        (folder,) = tmp_path.glob("dropout-service-metrics-*")
        # Fresh connections: the kernel spreads them over the workers, so both answer some
        # of the 40 (one taking them all has odds of 2^-39).
        sent = 40
        for _ in range(sent):
            with httpx.Client() as fresh:
                r = fresh.post(f"{url}/v1/models/concrete/predict", json=body)
            assert r.is_success, r.text
        assert len(list(folder.glob("counter_*.db"))) == 2  # one file per worker
        predict = (
            "dropout_http_requests_total",
            (
                ("endpoint", "/v1/models/{name}/predict"),
                ("method", "POST"),
                ("model", "concrete"),
                ("protocol", "http"),
                ("status", "200"),
            ),
        )
        # A worker counts a request just after sending its answer: let the last one land.
        time.sleep(0.5)
        totals = {scrape(url)[predict] for _ in range(8)}  # new connections: either worker
        assert totals == {sent}
        # Live gauges are written through to the workers' files and summed: nothing is
        # pending, and the only request in flight is the scrape itself.
        live = scrape(url)
        assert live[("dropout_inference_pending_requests", (("model", "concrete"),))] == 0
        assert live[("dropout_http_requests_in_flight", ())] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not list(tmp_path.glob("dropout-service-metrics-*"))
