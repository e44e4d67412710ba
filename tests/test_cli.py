"""`dropout-service serve` as a user runs it: a subprocess serving the shipped models/."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.core.repository import ModelRepository
from tests.helpers import serve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "log"
    with serve(log, "--models", "models") as (proc, url):
        yield url
        proc.terminate()
        code = proc.wait(timeout=30)
        assert code == 0, log.read_text()[-2000:]  # SIGTERM is a graceful shutdown, not a crash


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


def test_the_command_line_knows_every_activation_the_model_does() -> None:
    from typing import get_args

    from service.core.model import ActivationName
    from service.offline.options import ACTIVATIONS

    assert get_args(ActivationName) == ACTIVATIONS
