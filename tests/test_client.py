"""The Python client against a live server: the same bits as the HTTP answers, numpy arrays,
errors with status and message, 503s retried after Retry-After, and the predict command."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.cli import main
from service.client import AsyncClient, Client, ServiceError
from service.settings import Settings
from tests.helpers import LiveServer, live_server, scrape

ROWS = [[0.5, -1.0, 2.0, 0.25], [3.0, 3.0, -3.0, 0.0]]


def test_answers_are_the_http_answers_as_arrays(server: LiveServer) -> None:
    with Client(server.url) as client:
        assert client.ready()
        assert [m["name"] for m in client.models()] == ["clf", "deep", "tiny"]
        y = client.predict("deep", ROWS)
        raw = httpx.post(f"{server.url}/v1/models/deep/predict", json={"inputs": ROWS}).json()
        assert y.dtype == np.float32
        assert y.tobytes() == np.float32(raw["outputs"]).tobytes()

        mc = client.predict_mc("deep", ROWS, n_samples=300, seed=5, return_samples=True)
        body = {"inputs": ROWS, "n_samples": 300, "seed": 5, "return_samples": True}
        raw = httpx.post(f"{server.url}/v1/models/deep/predict/mc", json=body).json()
        assert (mc.model, mc.version, mc.n_samples, mc.seed) == ("deep", "1", 300, 5)
        for name in ("mean", "variance", "std", "predictive_variance"):
            assert getattr(mc, name).tobytes() == np.float64(raw[name]).tobytes(), name
        assert mc.samples is not None
        assert mc.samples.shape == (300, 2, 2)
        assert mc.entropy is None

        clf = client.predict_mc("clf", [[0.1] * 5], seed=1)
        assert clf.entropy is not None
        assert clf.entropy.shape == (1,)
        assert clf.predictive_variance is None
        assert client.predict_mc("deep", ROWS[0]).seed >= 0  # one row may come flat


def test_errors_carry_the_status_and_the_servers_message(server: LiveServer) -> None:
    with Client(server.url) as client:
        with pytest.raises(ServiceError) as e:
            client.predict("nope", ROWS)
        assert e.value.status == 404
        assert "model 'nope' not found" in e.value.message
        with pytest.raises(ServiceError) as e:
            client.predict_mc("tiny", [[1.0, 2.0, 3.0]])
        assert e.value.status == 422
        assert e.value.message == "body.inputs.0: row 0 has 3 values; model 'tiny' expects 2"
        with pytest.raises(ServiceError) as e:
            client.predict_mc("tiny", [[1.0, 2.0]], n_samples=1)
        assert "n_samples" in e.value.message


def test_a_503_is_retried_after_its_retry_after_a_bounded_number_of_times(
    wide_model_dir: Path,
) -> None:
    row = [0.5, -1.0, 2.0, 0.25, 1.0, 0.0, -2.0, 3.0]
    long = {"inputs": [row] * 16, "n_samples": 10_000, "seed": 3}
    settings = Settings(model_dir=wide_model_dir, max_queue_size=1)
    with live_server(settings) as s:
        rejected = (
            "dropout_inference_rejected_requests_total",
            (("model", "wide"), ("reason", "overloaded")),
        )

        def occupy() -> threading.Thread:
            thread = threading.Thread(
                target=lambda: httpx.post(
                    f"{s.url}/v1/models/wide/predict/mc", json=long, timeout=120
                )
            )
            thread.start()
            pending = ("dropout_inference_pending_requests", (("model", "wide"),))
            while scrape(s.url).get(pending, 0) < 1:
                time.sleep(0.005)
            return thread

        thread = occupy()
        with Client(s.url, retries=0) as impatient, pytest.raises(ServiceError) as e:
            impatient.predict("wide", [row])
        assert e.value.status == 503
        thread.join()

        thread = occupy()
        before = scrape(s.url).get(rejected, 0)
        with Client(s.url, retries=5) as patient:
            start = time.monotonic()
            assert patient.predict("wide", [row]).shape == (1, 1)
            waited = time.monotonic() - start
        thread.join()
        retried = scrape(s.url)[rejected] - before
    assert retried >= 1  # refused at first, then answered
    assert waited >= retried * 0.9  # Retry-After: 1 s between the tries


def test_the_async_client_keeps_every_answers_bits_under_concurrency(server: LiveServer) -> None:
    seeds = list(range(24))

    async def all_at_once() -> list[np.ndarray]:
        async with AsyncClient(server.url) as client:
            answers = await asyncio.gather(
                *(client.predict_mc("deep", ROWS, n_samples=50, seed=s) for s in seeds)
            )
            assert await client.ready()
            return [a.mean for a in answers]

    loaded = asyncio.run(all_at_once())
    with Client(server.url) as client:
        alone = [client.predict_mc("deep", ROWS, n_samples=50, seed=s).mean for s in seeds]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(loaded, alone, strict=True))


def printed(capsys: pytest.CaptureFixture[str]) -> object:
    """What the command printed (the suite's in-process servers write access lines too)."""
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith('{"ts"')]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_the_predict_command_prints_json(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "tiny", "--url", server.url, "--input", "[[1, 2]]"]) == 0
    assert printed(capsys) == {"outputs": [[6.5]]}
    argv = ["predict", "deep", "--url", server.url, "--input", json.dumps(ROWS), "--mc"]
    assert main([*argv, "--n-samples", "40", "--seed", "2"]) == 0
    mc = printed(capsys)
    assert isinstance(mc, dict)
    assert (mc["n_samples"], mc["seed"]) == (40, 2)
    assert len(mc["mean"]) == 2
    assert main(["predict", "nope", "--url", server.url, "--input", "[[1, 2]]"]) == 2
    assert capsys.readouterr().err.startswith("error: 404: model 'nope' not found")
    assert main(["predict", "tiny", "--url", server.url, "--input", "[[1, 2"]) == 2
    assert "--input is not JSON" in capsys.readouterr().err
