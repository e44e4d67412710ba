"""Prometheus metrics and the JSON access log, as a scraper and a log shipper see them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.accesslog import LOGGER, BatchedStdout
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
    settings = Settings(model_dir=model_dir, torch_threads=1, max_n_samples=5000)
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

    predict = {"method": "POST", "endpoint": "/v1/models/{name}/predict", "model": "tiny"}
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
    assert after[("dropout_torch_threads", ())] == 1


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
