"""Small models with known answers, and a real uvicorn server on a loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from service.app import create_app
from service.core.model import (
    ModelConfig,
    Standardization,
    bias_name,
    build_sequential,
    load_into_sequential,
    weight_name,
)
from service.core.repository import save_model
from service.protocols.grpc import predict_v2_pb2 as pb
from service.protocols.http.server import uvicorn_options
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SHA_PLACEHOLDER = "0" * 64


def tiny_regression_config(**overrides: Any) -> ModelConfig:
    """2 -> 3 -> 1 ReLU MLP; eval of [1, 2] is exactly 6.5 (see ``tiny_tensors``)."""
    fields: dict[str, Any] = {
        "name": "tiny",
        "version": "3",
        "task": "regression",
        "input_dim": 2,
        "hidden": [3],
        "output_dim": 1,
        "dropout": [0.5],
        "noise_variance": [0.25],
        "sha256": SHA_PLACEHOLDER,
    }
    return ModelConfig(**{**fields, **overrides})


def tiny_tensors() -> dict[str, torch.Tensor]:
    return {
        weight_name(0): torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        bias_name(0): torch.zeros(3),
        weight_name(1): torch.tensor([[1.0, 1.0, 1.0]]),
        bias_name(1): torch.tensor([0.5]),
    }


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g) / (shape[-1] ** 0.5)
        for name, shape in config.weight_shapes().items()
    }


def deep_regression_config(**overrides: Any) -> ModelConfig:
    """4 -> 16 -> 16 -> 2 with standardisation and input dropout: exercises every branch."""
    fields: dict[str, Any] = {
        "name": "deep",
        "version": "1",
        "task": "regression",
        "input_dim": 4,
        "hidden": [16, 16],
        "output_dim": 2,
        "activation": "tanh",
        "dropout": [0.2, 0.1],
        "input_dropout": 0.05,
        "input_standardization": Standardization(mean=[1, 2, 3, 4], std=[1, 2, 0.5, 4]),
        "target_standardization": Standardization(mean=[10, -5], std=[3, 0.5]),
        "noise_variance": [0.5, 0.1],
        "sha256": SHA_PLACEHOLDER,
    }
    return ModelConfig(**{**fields, **overrides})


def classifier_config(**overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "name": "clf",
        "version": "1",
        "task": "classification",
        "input_dim": 5,
        "hidden": [32],
        "output_dim": 3,
        "dropout": [0.3],
        "labels": ["a", "b", "c"],
        "sha256": SHA_PLACEHOLDER,
    }
    return ModelConfig(**{**fields, **overrides})


def reference_eval(
    config: ModelConfig, tensors: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """The same weights in a plain nn.Sequential in eval mode, with the config's transforms."""
    seq = build_sequential(config)
    load_into_sequential(seq, tensors)
    seq.eval()
    if s := config.input_standardization:
        x = (x - torch.tensor(s.mean)) / torch.tensor(s.std)
    with torch.no_grad():
        y = seq(x)
    if config.task == "classification":
        return torch.softmax(y, dim=-1)
    if s := config.target_standardization:
        y = y * torch.tensor(s.std) + torch.tensor(s.mean)
    return y


def cases() -> list[tuple[ModelConfig, dict[str, torch.Tensor]]]:
    deep, clf = deep_regression_config(), classifier_config()
    vanilla = deep_regression_config(dropout_scaling="vanilla")
    return [
        (tiny_regression_config(), tiny_tensors()),
        (deep, random_tensors(deep, 1)),
        (clf, random_tensors(clf, 2)),
        (vanilla, random_tensors(vanilla, 1)),
    ]


def inputs(config: ModelConfig, rows: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, config.input_dim, generator=torch.Generator().manual_seed(seed)) * 2


def write_model(root: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> ModelConfig:
    return save_model(root / config.name, config, tensors, f"# {config.name}\n\nA test model.\n")


def write_test_repository(root: Path) -> None:
    write_model(root, tiny_regression_config(), tiny_tensors())
    deep = deep_regression_config()
    write_model(root, deep, random_tensors(deep, seed=1))
    clf = classifier_config()
    write_model(root, clf, random_tensors(clf, seed=2))


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 with a port the OS picked, in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        options = uvicorn_options(settings, host="127.0.0.1", port=0, log_level="warning")
        config = uvicorn.Config(self.app, **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.exit_code: int | str | None = None

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit as exc:  # uvicorn exits when the app's startup fails
            self.exit_code = exc.code

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC front door (tritonclient.grpc's ``url``)."""
        port = self.app.state.settings.grpc_port
        assert port, "this server runs without gRPC (settings.grpc_port is 0)"
        return f"127.0.0.1:{port}"

    def start(self, timeout: float = 20.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start (exit code {self.exit_code})")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@contextmanager
def live_server(settings: Settings, *, wait_ready: bool = True) -> Iterator[LiveServer]:
    server = LiveServer(settings)
    server.start()
    try:
        if wait_ready:
            poll_readyz(server.url, is_ready)
        yield server
    finally:
        server.stop()


def wide_regression_config(**overrides: Any) -> ModelConfig:
    """8 -> 256 -> 256 -> 1: heavy enough that a large MC request takes a while."""
    fields = {"name": "wide", "version": "1", "input_dim": 8, "hidden": [256, 256]}
    return tiny_regression_config(**{**fields, "dropout": [0.1, 0.1], **overrides})


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed by prometheus_client: ``{(sample name, sorted labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def write_uci_folder(
    folder: Path, *, rows: int, train_rows: int, splits: int, noise: float, seed: int
) -> Path:
    """A data set in the UCI format: y = x0 - 2 x1 + noise over 3 inputs, random splits."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    y = x[:, 0] - 2 * x[:, 1] + noise * rng.normal(size=rows)
    folder.mkdir(parents=True)
    np.savetxt(folder / "data.txt", np.column_stack([x, y]))
    np.savetxt(folder / "index_features.txt", [0, 1, 2], fmt="%d")
    np.savetxt(folder / "index_target.txt", [3], fmt="%d")
    for k in range(splits):
        order = rng.permutation(rows)
        np.savetxt(folder / f"index_train_{k}.txt", order[:train_rows], fmt="%d")
        np.savetxt(folder / f"index_test_{k}.txt", order[train_rows:], fmt="%d")
    return folder


def grpc_infer_request(model: str, x: Any, *, raw: bool = True, **params: int) -> Any:
    """A gRPC ModelInferRequest with ``x`` as its one FP32 ``input``: little-endian bytes in
    ``raw_input_contents`` (as tritonclient sends them) or values in ``contents``; each
    parameter an int64, or a bool for a bool."""
    x = np.asarray(x, dtype="<f4")
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(x.tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    for key, value in params.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].int64_param = value
    return request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll_readyz(
    url: str,
    done: Callable[[httpx.Response], bool],
    *,
    timeout: float = 60.0,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> httpx.Response:
    """GET /readyz until ``done(answer)``; fail if it never is, or if ``proc`` exits (with
    its output, from ``log`` or its stdout)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            out = log.read_text() if log else proc.stdout.read().decode() if proc.stdout else ""
            pytest.fail(f"the server exited with {proc.returncode}:\n{out[-3000:]}")
        try:
            r = httpx.get(f"{url}/readyz")
            if done(r):
                return r
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url}/readyz did not get there in {timeout} s")
        time.sleep(0.02)


def every_worker_ready(url: str, timeout: float = 240.0, streak: int = 20) -> None:
    """With several workers the server answers ready once one is. Each /readyz goes on a
    fresh connection, which lands on a worker the kernel picks: ``streak`` ready answers in a
    row make it near certain (each reaching a worker still loading is a coin toss) that all
    of them are."""
    ready = 0

    def in_a_row(r: httpx.Response) -> bool:
        nonlocal ready
        ready = ready + 1 if is_ready(r) else 0
        return ready >= streak

    poll_readyz(url, in_a_row, timeout=timeout)


def is_ready(r: httpx.Response) -> bool:
    return r.status_code == 200


def is_loaded(r: httpx.Response) -> bool:
    """Loading has ended, whatever the verdict."""
    return bool(r.json()["status"] != "loading")


@contextmanager
def serve(log: Path, *args: str, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m service serve`` on a free port, its output in ``log``; ready on entry."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DROPOUT_")}
    clean["DROPOUT_GRPC_PORT"] = "0"  # unless env or --grpc-port names one
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), *args]
    with log.open("wb") as out:  # its own process group, for the kill below
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**clean, **env}, stdout=out, stderr=out, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        poll_readyz(url, is_ready, proc=proc, log=log)
        if "--workers" in args:
            every_worker_ready(url)
        yield proc, url
    finally:
        # The whole group: killed alone, the server would leave its worker processes running.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
