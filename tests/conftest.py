"""Fixture chain: repository folder -> settings -> live uvicorn server -> HTTP client."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.helpers import (
    LiveServer,
    free_port,
    live_server,
    random_tensors,
    wide_regression_config,
    write_model,
    write_test_repository,
)

# Apps built in tests (and servers they start) leave gRPC off unless a test names a port:
# the default, 8001, would have every app of the session compete for one port.
os.environ["DROPOUT_GRPC_PORT"] = "0"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_test_repository(root)
    return root


@pytest.fixture(scope="session")
def settings(model_dir: Path) -> Settings:
    return Settings(
        model_dir=model_dir,
        max_rows=64,
        max_n_samples=5000,
        max_sample_values=100_000,
        grpc_port=free_port(),
    )


@pytest.fixture(scope="session")
def server(settings: Settings) -> Iterator[LiveServer]:
    with live_server(settings) as s:
        yield s


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding only ``wide``: MC requests on it take long enough to overlap."""
    root = tmp_path_factory.mktemp("wide-models")
    config = wide_regression_config()
    write_model(root, config, random_tensors(config, seed=4))
    return root
