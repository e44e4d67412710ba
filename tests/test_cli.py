"""`dropout-service serve` as a user runs it: a subprocess serving the shipped models/."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll /readyz until 200; fail with the server's output if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        time.sleep(0.1)
    pytest.fail(f"{url} did not become ready in {timeout} s")


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROPOUT_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--models", "models"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=60)
        yield url
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
        assert proc.stdout is not None
        log = proc.stdout.read().decode()
        proc.stdout.close()
        assert code == 0, log[-2000:]  # SIGTERM is a graceful shutdown, not a crash


def test_shipped_models_all_load() -> None:
    repo = ModelRepository.load(ROOT / "models")
    assert not repo.failures
    assert "concrete" in repo.models


def test_serve_answers_with_the_concrete_model(served: str) -> None:
    row = [540.0, 0.0, 0.0, 162.0, 2.5, 1040.0, 676.0, 28.0]  # measured: 79.99 MPa
    eval_ = httpx.post(f"{served}/v1/models/concrete/predict", json={"inputs": [row]}).json()
    assert 40 < eval_["outputs"][0][0] < 100
    body = {"inputs": [row], "n_samples": 1000, "seed": 7}
    mc = httpx.post(f"{served}/v1/models/concrete/predict/mc", json=body).json()
    assert mc == httpx.post(f"{served}/v1/models/concrete/predict/mc", json=body).json()
    assert abs(mc["mean"][0][0] - eval_["outputs"][0][0]) < 3 * mc["std"][0][0]
    assert mc["predictive_variance"][0][0] > mc["variance"][0][0] > 0


def test_help_lists_the_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "serve" in out
    assert "train" in out


def readme_curl_commands() -> list[str]:
    """Every `curl` command of the README, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    commands, current = [], ""
    for line in text.splitlines():
        if line.startswith("curl ") or current:
            current += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                commands.append(current.strip())
                current = ""
    return commands


def test_readme_curl_examples_work_as_written(served: str) -> None:
    commands = readme_curl_commands()
    assert len(commands) >= 8
    for command in commands:
        live = command.replace("http://127.0.0.1:8000", served)
        done = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {live}"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.strip(), command
        assert '"detail"' not in done.stdout, (command, done.stdout[:300])
