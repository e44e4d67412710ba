"""Readiness: 503 while a model is refused, unless partial readiness is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from service.settings import Settings
from tests.helpers import (
    is_loaded,
    live_server,
    poll_readyz,
    tiny_regression_config,
    tiny_tensors,
    write_model,
)


@pytest.fixture
def damaged_root(tmp_path: Path) -> Path:
    write_model(tmp_path, tiny_regression_config(), tiny_tensors())
    write_model(tmp_path, tiny_regression_config(name="broken"), tiny_tensors())
    config = tmp_path / "broken" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "sha256": "c" * 64}))
    return tmp_path


def test_a_refused_model_makes_the_service_not_ready(damaged_root: Path) -> None:
    with live_server(Settings(model_dir=damaged_root), wait_ready=False) as s:
        r = poll_readyz(s.url, is_loaded)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        body = r.json()
        assert body["status"] == "not ready"
        assert body["models"] == ["tiny"]
        assert "sha256" in body["failed"]["broken"]
        assert httpx.get(f"{s.url}/healthz").status_code == 200
        good = httpx.post(f"{s.url}/v1/models/tiny/predict", json={"inputs": [[1, 2]]})
        assert good.json()["outputs"] == [[6.5]]


def test_partial_readiness_when_allowed(damaged_root: Path) -> None:
    settings = Settings(model_dir=damaged_root, allow_partial_ready=True)
    with live_server(settings) as s:
        body = httpx.get(f"{s.url}/readyz").json()
        assert body["status"] == "ready"
        assert list(body["failed"]) == ["broken"]


def test_empty_repository_is_not_ready(tmp_path: Path) -> None:
    with live_server(Settings(model_dir=tmp_path), wait_ready=False) as s:
        r = poll_readyz(s.url, is_loaded)
        assert r.status_code == 503


def unusable_devices() -> list[str]:
    """Devices this machine cannot serve on: an absent CUDA index, and CUDA where none is."""
    return ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", unusable_devices())
def test_an_unusable_device_stops_the_start_with_a_clear_message(
    tmp_path: Path, device: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROPOUT_")}
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--models", str(tmp_path), "--port", "0"],
        env={**env, "DROPOUT_DEVICE": device},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"DROPOUT_DEVICE={device}" in done.stderr
    assert "Traceback" not in done.stderr
    # The app factory's own start (without the CLI) refuses it too, before loading anything.
    with pytest.raises(RuntimeError, match="did not start"):
        live_server(Settings(model_dir=tmp_path, device=device)).__enter__()
