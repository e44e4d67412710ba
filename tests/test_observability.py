"""Prometheus metrics and the JSON access log, as a scraper and a log shipper see them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.core.repository import load_model
from service.serving.gather import Gathered
from service.serving.metrics import Metrics
from service.serving.observe import LOGGER, BatchedStdout, fresh_id, write_access_line
from service.settings import Settings
from tests.helpers import LiveServer, live_server, scrape

#: A value that must never reach the log: the inputs of a request.
SECRET = 1234.5678


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))

    def wait_for(self, n: int) -> list[dict[str, object]]:
        """The line is written once the response is sent, so it may trail the client."""
        deadline = time.monotonic() + 10
        while len(self.lines) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.lines


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(model_dir=model_dir, max_n_samples=5000)
    with live_server(settings) as s:
        yield s


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_metrics_count_what_the_requests_did(served: LiveServer) -> None:
    url = served.url
    before = scrape(url)
    for _ in range(3):
        assert httpx.post(f"{url}/v1/models/tiny/predict", json={"inputs": [[1, 2]]}).is_success
    mc = {"inputs": [[1, 2], [3, 4]], "n_samples": 300, "seed": 1}
    assert httpx.post(f"{url}/v1/models/tiny/predict/mc", json=mc).is_success
    assert httpx.post(f"{url}/v1/models/tiny/predict", json={"inputs": [[1]]}).status_code == 422
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    predict = {
        "protocol": "http",
        "method": "POST",
        "endpoint": "/v1/models/{name}/predict",
        "model": "tiny",
    }
    assert delta("dropout_http_requests_total", **predict, status="200") == 3
    assert delta("dropout_http_requests_total", **predict, status="422") == 1
    assert delta("dropout_http_request_duration_seconds_count", **predict, status="200") == 3
    eval_ = {"model": "tiny", "kind": "eval"}
    assert delta("dropout_inference_queue_wait_seconds_count", **eval_) == 3
    assert delta("dropout_inference_compute_seconds_count", **eval_) == 3  # one batch each
    assert delta("dropout_batch_requests_sum", model="tiny") == 3
    assert delta("dropout_batch_rows_sum", model="tiny") == 3
    assert delta("dropout_mc_samples_count", model="tiny") == 1
    assert delta("dropout_mc_samples_sum", model="tiny") == 300
    assert delta("dropout_inference_compute_seconds_count", model="tiny", kind="mc") == 1
    assert after[("dropout_inference_pending_requests", (("model", "tiny"),))] == 0
    assert after[("dropout_http_requests_in_flight", ())] == 1  # this scrape
    assert after[("dropout_torch_threads", ())] == Settings().intra_op_threads()


def test_model_info_carries_version_and_sha256(served: LiveServer) -> None:
    labels = [dict(k[1]) for k in scrape(served.url) if k[0] == "dropout_model_info"]
    tiny = next(lbl for lbl in labels if lbl["name"] == "tiny")
    assert tiny["version"] == "3"
    assert len(tiny["sha256"]) == 64


def test_one_json_line_per_request_with_the_callers_id(
    served: LiveServer, access_lines: Lines
) -> None:
    body = {"inputs": [[SECRET, 2.0]], "n_samples": 50, "seed": 9}
    r = httpx.post(
        f"{served.url}/v1/models/tiny/predict/mc", json=body, headers={"X-Request-ID": "abc-123"}
    )
    assert r.headers["x-request-id"] == "abc-123"
    (line,) = access_lines.wait_for(1)
    assert line["request_id"] == "abc-123"
    assert line["endpoint"] == "/v1/models/{name}/predict/mc"
    assert line["model"] == "tiny"
    assert line["status"] == 200
    assert line["n_samples"] == 50
    assert line["rows"] == 1
    assert isinstance(line["latency_ms"], float)
    assert float(line["latency_ms"]) >= float(line["compute_ms"])  # type: ignore[arg-type]
    assert str(SECRET) not in json.dumps(line)


def test_request_ids_are_generated_when_absent_or_unsafe(
    served: LiveServer, access_lines: Lines
) -> None:
    plain = httpx.get(f"{served.url}/healthz")
    unsafe = httpx.get(f"{served.url}/healthz", headers={"X-Request-ID": "a b\tc" + "x" * 200})
    missing = httpx.post(f"{served.url}/v1/models/nope/predict", json={"inputs": [[1.0]]})
    ids = [r.headers["x-request-id"] for r in (plain, unsafe, missing)]
    assert all(len(i) == 32 for i in ids)
    assert len(set(ids)) == 3
    lines = {line["request_id"]: line for line in access_lines.wait_for(3)}
    assert [lines[i]["status"] for i in ids] == [200, 200, 404]
    assert lines[ids[2]]["model"] is None  # an unknown name is not a model


def test_fresh_ids_are_unique_and_a_forked_child_draws_its_own_prefix() -> None:
    """Ids are a per-process random prefix and a counter: a child forked from a worker
    (as a process manager may) must not repeat its parent's ids."""
    ids = [fresh_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, fresh_id().encode())
        os._exit(0)
    os.close(write)
    theirs = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(child, 0)
    mine = fresh_id()
    assert len(theirs) == 32
    assert theirs[:16] != mine[:16]  # 2^-64 to fail by chance
    assert theirs not in ids


def test_stdout_lines_are_gathered_on_the_loop_and_written_together(
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler = BatchedStdout()
    logger = logging.getLogger("test.batched")
    logger.addHandler(handler)
    logger.propagate = False
    try:

        async def burst() -> tuple[str, str]:
            for i in range(3):
                logger.warning('{"n": %d}', i)
            written_at_once = capsys.readouterr().out
            await asyncio.sleep(BatchedStdout.FLUSH_S * 4)
            return written_at_once, capsys.readouterr().out

        def ours(out: str) -> list[str]:  # a live server of this module may flush lines too
            return [line for line in out.splitlines() if not line.startswith('{"ts"')]

        at_once, later = asyncio.run(burst())
        assert ours(at_once) == []
        assert ours(later) == ['{"n": 0}', '{"n": 1}', '{"n": 2}']
        logger.warning("outside any loop")  # nothing would flush it later: written now
        assert ours(capsys.readouterr().out) == ["outside any loop"]
    finally:
        logger.removeHandler(handler)


def test_an_access_line_formatted_when_written_carries_its_time_id_and_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On the service's own handler alone, an access line is formatted at the flush, from
    the time it was answered."""
    log = logging.getLogger(LOGGER)
    handlers, level = log.handlers[:], log.level
    log.handlers = [BatchedStdout()]
    log.setLevel(logging.INFO)
    fields = {"protocol": "http", "status": 200, "latency_ms": 1.5, "model": "m"}
    try:

        async def answered() -> tuple[str, float]:
            write_access_line("rid-1", fields)
            at = time.time()
            written_at_once = capsys.readouterr().out
            await asyncio.sleep(BatchedStdout.FLUSH_S * 4)
            assert not [line for line in written_at_once.splitlines() if "rid-1" in line]
            return capsys.readouterr().out, at

        out, at = asyncio.run(answered())
    finally:
        log.handlers, log.level = handlers, level
    (line,) = [json.loads(line) for line in out.splitlines() if "rid-1" in line]
    assert list(line)[:2] == ["ts", "request_id"]
    assert line["request_id"] == "rid-1"
    assert {k: line[k] for k in fields} == fields
    ts = datetime.fromisoformat(line["ts"]).timestamp()
    assert at - 1 < ts <= at + 0.001  # the time it was answered, not the time it was written


def test_gathered_items_are_handed_over_together_after_the_delay() -> None:
    handed: list[list[int]] = []
    gathered = Gathered(handed.append, delay_s=0.05)

    async def burst() -> tuple[list[list[int]], list[list[int]]]:
        for i in range(3):
            gathered.add(i)
        at_once = list(handed)
        await asyncio.sleep(0.2)
        return at_once, list(handed)

    at_once, later = asyncio.run(burst())
    assert at_once == []
    assert later == [[0, 1, 2]]
    gathered.add(3)  # no loop in this thread: nothing would hand it over later
    assert handed == [[0, 1, 2], [3]]

    async def flushed() -> list[list[int]]:
        gathered.add(4)
        gathered.flush()
        return list(handed)

    assert asyncio.run(flushed())[-1] == [4]


def test_a_scrape_sees_every_observation_made_before_it() -> None:
    """Observations wait for their fold; anything reading the registry folds first."""
    metrics = Metrics()

    async def observed() -> tuple[float | None, bytes]:
        metrics.observe_batch("m", 3, 5, 0.002)
        metrics.add(metrics.rejected, ("m", "overloaded"))
        seen = metrics.registry.get_sample_value("dropout_batch_rows_sum", {"model": "m"})
        metrics.observe_batch("m", 1, 2, 0.001)
        return seen, metrics.exposition()

    seen, text = asyncio.run(observed())
    assert seen == 5
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }
    assert samples[("dropout_batch_rows_sum", (("model", "m"),))] == 7
    assert samples[("dropout_batch_requests_count", (("model", "m"),))] == 2
    rejected = (("model", "m"), ("reason", "overloaded"))
    assert samples[("dropout_inference_rejected_requests_total", rejected)] == 1


def send_and_hang_up(url: str, path: str, body: bytes, *, send: int, wait_s: float) -> None:
    """A client that sends ``send`` bytes of ``body`` (after complete headers), waits, and
    closes the connection without reading an answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body[:send])
        time.sleep(wait_s)


def statuses(before: dict[Any, float], after: dict[Any, float]) -> dict[str, float]:
    """Requests answered between two scrapes, by status."""
    counts: dict[str, float] = {}
    for (name, labels), value in after.items():
        if name == "dropout_http_requests_total":
            status = dict(labels)["status"]
            counts[status] = counts.get(status, 0) + value - before.get((name, labels), 0)
    return {k: v for k, v in counts.items() if v}


def test_a_client_that_hangs_up_is_counted_as_499_and_its_work_stops(
    wide_model_dir: Path, access_lines: Lines
) -> None:
    row = [0.5, -1.0, 2.0, 0.25, 1.0, 0.0, -2.0, 3.0]
    long_body = {"inputs": [row] * 16, "n_samples": 10_000, "seed": 3}
    engine = load_model(wide_model_dir / "wide").engine
    start = time.perf_counter()
    engine.predict_mc(torch.tensor(long_body["inputs"]), 10_000, 3)
    long_s = time.perf_counter() - start

    settings = Settings(model_dir=wide_model_dir, max_queue_size=1)
    with live_server(settings) as s:
        before = scrape(s.url)
        mc = json.dumps(long_body).encode()
        # Mid-body, on v1 and v2 (whose handler reads the body itself).
        send_and_hang_up(s.url, "/v1/models/wide/predict/mc", mc, send=10, wait_s=0.1)
        send_and_hang_up(s.url, "/v2/models/wide/infer", mc, send=10, wait_s=0.1)
        # After the whole request, while its MC job computes: the job stops, and its slot
        # (the only one) is free again long before the job would have ended.
        send_and_hang_up(s.url, "/v1/models/wide/predict/mc", mc, send=len(mc), wait_s=0.1)
        hung_up = time.perf_counter()
        pending = ("dropout_inference_pending_requests", (("model", "wide"),))
        while scrape(s.url)[pending] and time.perf_counter() - hung_up < long_s:
            time.sleep(0.005)
        assert time.perf_counter() - hung_up < long_s / 3, long_s
        short = httpx.post(
            f"{s.url}/v1/models/wide/predict/mc",
            json={"inputs": [row], "n_samples": 2000, "seed": 4},
            timeout=30,
        )
        assert short.status_code == 200, short.text
        lines = access_lines.wait_for(6)
        after = scrape(s.url)
    answered = statuses(before, after)
    assert answered.pop("499") == 3
    assert answered.pop("200") >= 2  # the short request and the scrapes
    assert [line["status"] for line in lines].count(499) == 3


def test_access_logging_is_set_per_app(model_dir: Path, access_lines: Lines) -> None:
    logged = Settings(model_dir=model_dir, access_log=True)
    silent = Settings(model_dir=model_dir, access_log=False)
    with live_server(logged) as a, live_server(silent) as b:  # b is created last
        httpx.get(f"{a.url}/healthz", headers={"X-Request-ID": "from-a"})
        httpx.get(f"{b.url}/healthz", headers={"X-Request-ID": "from-b"})
        httpx.get(f"{a.url}/healthz", headers={"X-Request-ID": "from-a-again"})
        ids = {line["request_id"] for line in access_lines.wait_for(4)}
    assert {"from-a", "from-a-again"} <= ids
    assert "from-b" not in ids
