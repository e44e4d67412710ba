"""Eval throughput with dynamic batching on against off, at 1, 8 and 64 concurrent clients.

Starts `python -m service serve` (one worker, shipped models) for each mode on a free
loopback port; each client holds one keep-alive connection and sends one-row eval requests
back to back for a fixed time. The client is a minimal asyncio HTTP/1.1 loop, so that it
costs the shared CPU as little as possible. Prints a Markdown table: requests per second,
latency p50 and p99, and the mean number of requests per forward pass (from /metrics).
Usage: python bench/throughput.py [--model concrete] [--seconds 5] [--clients 1 8 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
ROW = [540.0, 0.0, 0.0, 162.0, 2.5, 1040.0, 676.0, 28.0]
LENGTH = re.compile(rb"content-length: *(\d+)", re.IGNORECASE)


@contextmanager
def server(model: str, batching: bool) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "DROPOUT_BATCHING": str(batching).lower(),
        "DROPOUT_ACCESS_LOG": "false",
        "DROPOUT_LOG_LEVEL": "warning",
        "DROPOUT_GRPC_PORT": "0",  # HTTP only: nothing to hold a port for
    }
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), "--models", "models"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        httpx.get(f"{url}/v1/models/{model}").raise_for_status()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


async def client(port: int, request: bytes, stop_at: float, latencies: list[float]) -> int:
    """Send ``request`` until ``stop_at``; return how many answers were not 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    errors = 0
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        match = LENGTH.search(head)
        assert match is not None, head
        await reader.readexactly(int(match.group(1)))
        errors += head[9:12] != b"200"
        latencies.append(time.perf_counter() - start)
    writer.close()
    await writer.wait_closed()
    return errors


async def load(url: str, model: str, clients: int, seconds: float) -> tuple[list[float], int]:
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"inputs": [ROW]}).encode()
    request = (
        f"POST /v1/models/{model}/predict HTTP/1.1\r\nhost: bench\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    warm: list[float] = []
    await asyncio.gather(
        *(client(port, request, time.perf_counter() + 0.5, warm) for _ in range(clients))
    )
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    errors = await asyncio.gather(
        *(client(port, request, stop_at, latencies) for _ in range(clients))
    )
    return latencies, sum(errors)


def batch_sums(url: str, model: str) -> tuple[float, float]:
    """(requests, batches) so far: the sum and count of the batch-size histogram."""
    text = httpx.get(f"{url}/metrics").text
    values = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.labels.get("model") == model
    }
    return values.get("dropout_batch_requests_sum", 0.0), values.get(
        "dropout_batch_requests_count", 0.0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="concrete")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args()
    rows = []
    # Both servers up at once, cells alternating, so that a change in the shared machine's
    # load hits both modes alike.
    with server(args.model, False) as off_url, server(args.model, True) as on_url:
        for clients in args.clients:
            for mode, url in (("off", off_url), ("on", on_url)):
                before = batch_sums(url, args.model)
                latencies, errors = asyncio.run(load(url, args.model, clients, args.seconds))
                after = batch_sums(url, args.model)
                per_batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                ms = sorted(x * 1000 for x in latencies)
                p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
                rps = len(ms) / args.seconds
                rows.append((mode, clients, rps, statistics.median(ms), p99, per_batch, errors))
    print(
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
        f"model {args.model}, 1 row per request, {args.seconds:g} s per cell, one worker."
    )
    print()
    print("| batching | clients | requests/s | p50 (ms) | p99 (ms) | requests per pass | errors |")
    print("|---|---|---|---|---|---|---|")
    for mode, clients, rps, p50, p99, per_batch, errors in rows:
        cells = (
            mode,
            clients,
            f"{rps:.0f}",
            f"{p50:.2f}",
            f"{p99:.2f}",
            f"{per_batch:.1f}",
            errors,
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")
    off = {c: rps for mode, c, rps, *_ in rows if mode == "off"}
    print()
    print("| clients | throughput on / off |")
    print("|---|---|")
    for mode, clients, rps, *_ in rows:
        if mode == "on":
            print(f"| {clients} | {rps / off[clients]:.2f}x |")


if __name__ == "__main__":
    main()
