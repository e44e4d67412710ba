"""Slow and idle clients cannot hold a worker: headers and bodies have a read deadline
(answered 408 where an answer can be sent, then closed), and connections have a cap."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.helpers import LiveServer, live_server

READ_TIMEOUT_S = 0.5
#: How long a stalled connection may live: the deadline, plus slack for a loaded machine.
HELD_AT_MOST_S = READ_TIMEOUT_S + 5
BODY = b'{"inputs": [[1.0, 2.0]], "n_samples": 20, "seed": 1}'


@pytest.fixture(scope="module")
def strict(model_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(model_dir=model_dir, read_timeout_s=READ_TIMEOUT_S, max_connections=8)
    with live_server(settings) as s:
        yield s


def connect(server: LiveServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(HELD_AT_MOST_S)
    return sock


def request_head(path: str, content_type: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(BODY)}\r\n\r\n"
    ).encode()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; fails if it holds on past the limit."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/models/tiny/predict/mc", "application/json"),  # the hot path reads it
        ("/v1/models/tiny/predict", "text/plain"),  # FastAPI reads it
        ("/v2/models/tiny/infer", "application/octet-stream"),  # the v2 handler reads it
    ],
)
def test_a_stalled_body_gets_408_and_the_connection_closes(
    strict: LiveServer, path: str, content_type: str
) -> None:
    with ExitStack() as stack:
        socks = [stack.enter_context(connect(strict)) for _ in range(5)]
        start = time.monotonic()
        for sock in socks:
            sock.sendall(request_head(path, content_type) + BODY[:10])
        answers = [read_until_closed(sock) for sock in socks]
        held = time.monotonic() - start
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[0][:200]
    assert all(b"request body not received within 0.5 s" in a for a in answers), answers[0]
    assert held < HELD_AT_MOST_S
    assert httpx.post(f"{strict.url}/v1/models/tiny/predict", json={"inputs": [[1, 2]]}).is_success


@pytest.mark.parametrize("sent", [b"", b"POST /v1/models/tiny/predict HTTP/1.1\r\nhost: te"])
def test_stalled_or_missing_headers_get_408_and_the_connection_closes(
    strict: LiveServer, sent: bytes
) -> None:
    with connect(strict) as sock:
        start = time.monotonic()
        sock.sendall(sent)
        answer = read_until_closed(sock)
        held = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"request headers not received within 0.5 s" in answer
    assert held < HELD_AT_MOST_S


def test_a_connection_past_the_cap_gets_503(model_dir: Path) -> None:
    settings = Settings(model_dir=model_dir, max_connections=4, read_timeout_s=60)
    with live_server(settings) as s, ExitStack() as stack:
        idle = [stack.enter_context(connect(s)) for _ in range(3)]
        with httpx.Client(base_url=s.url) as client:  # the fourth connection: served
            assert client.get("/healthz").status_code == 200
            idle.append(stack.enter_context(connect(s)))
            with httpx.Client(base_url=s.url) as fifth:
                assert fifth.get("/healthz").status_code == 503
        for sock in idle:
            sock.close()
        time.sleep(0.2)  # the server sees the closes
        assert httpx.get(f"{s.url}/healthz").status_code == 200
