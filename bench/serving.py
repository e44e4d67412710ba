"""HTTP serving: requests/s and latency of one uvicorn worker under closed-loop load.

Each target (the bare FastAPI floor, eval predict, MC predict) runs in its own server process
on a free 127.0.0.1 port. The load comes from wrk (Lua body script) when it is installed,
else from an asyncio httpx client, which is itself slower than the server at high rates.
Also measures the peak RSS of one large MC request.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "concrete"
ROW = [540.0, 0.0, 0.0, 162.0, 2.5, 1040.0, 676.0, 28.0]
CONCURRENCY = (1, 8, 64)
MC_100 = {"inputs": [ROW], "n_samples": 100, "seed": 7}
MC_1000 = {"inputs": [ROW], "n_samples": 1000, "seed": 7}
PACKED = {"MC_MASK": "packed"}
#: (name, path, body, extra DROPOUT_* settings); "bare" is served by bench/bare_app.py, the
#: rest by the service with its defaults (torch masks) unless the settings say otherwise.
TARGETS: list[tuple[str, str, dict[str, object], dict[str, str]]] = [
    ("bare FastAPI", "/predict", {"inputs": [ROW]}, {}),
    ("eval predict", f"/v1/models/{MODEL}/predict", {"inputs": [ROW]}, {}),
    ("MC T=100", f"/v1/models/{MODEL}/predict/mc", MC_100, {}),
    ("MC T=100, packed masks", f"/v1/models/{MODEL}/predict/mc", MC_100, PACKED),
    ("MC T=1000", f"/v1/models/{MODEL}/predict/mc", MC_1000, {}),
    ("MC T=1000, packed masks", f"/v1/models/{MODEL}/predict/mc", MC_1000, PACKED),
]
MEMORY_ROWS, MEMORY_SAMPLES = 1024, 10_000


@dataclass
class Load:
    target: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    """Poll ``url`` until it answers 200; fail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not become ready")
        time.sleep(0.1)


def replace_section(page: Path, start: str, end: str, text: str) -> None:
    """Put ``text`` between the ``start`` and ``end`` markers of ``page``."""
    doc = page.read_text()
    head, found, rest = doc.partition(start)
    if not found:
        raise SystemExit(f"{page} has no {start} marker")
    page.write_text(f"{head}{start}\n{text.rstrip()}\n{end}{rest.partition(end)[2]}")


@contextmanager
def server(
    bare: bool, threads: int, settings: dict[str, str] | None = None, root: Path = ROOT
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A one-worker server on loopback, ready to answer; stopped on exit.

    ``root`` is the checkout whose code serves (another commit's, for an A/B run);
    ``settings`` are extra ``DROPOUT_*`` variables, e.g. ``REQUEST_TIMEOUT_S="600"``.
    """
    port = free_port()
    env = {
        **os.environ,
        "DROPOUT_LOG_LEVEL": "warning",
        "DROPOUT_GRPC_PORT": "0",  # HTTP measured here; GRPC_PORT in ``settings`` turns it on
        "DROPOUT_TORCH_THREADS": str(threads),
        "PYTHONPATH": str(root),
        **{f"DROPOUT_{k}": v for k, v in (settings or {}).items()},
    }
    if bare:
        cmd = [sys.executable, "-m", "uvicorn", "bare_app:app", "--log-level", "warning"]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        cwd, probe = root / "bench", "/openapi.json"
    else:
        cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), "--models", "models"]
        cwd, probe = root, "/readyz"
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + probe, proc, f"server {cmd}")
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


_WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = {body}
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def with_wrk(url: str, body: dict[str, object], concurrency: int, seconds: float) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_SCRIPT.format(body=json.dumps(json.dumps(body))))
    try:
        duration = f"-d{max(1, round(seconds))}s"
        cmd = ["wrk", "-t1", f"-c{concurrency}", duration, "--latency", "--timeout", "30s"]
        done = subprocess.run(
            [*cmd, "-s", f.name, url], capture_output=True, text=True, check=True, timeout=120
        )
    finally:
        os.unlink(f.name)
    out = done.stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    failed = int(errors.group(1)) if errors else 0
    if socket_errors:
        failed += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    if len(latency) < 2:
        print(f"wrk printed no latency percentiles:\n{out}", file=sys.stderr)
    p50, p99 = (_ms(latency[q]) if q in latency else float("nan") for q in ("50", "99"))
    return Load("", concurrency, rps, p50, p99, failed, "wrk")


def with_httpx(url: str, body: dict[str, object], concurrency: int, seconds: float) -> Load:
    async def main() -> tuple[list[float], int]:
        latencies: list[float] = []
        errors = 0
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            deadline = time.perf_counter() + seconds

            async def worker() -> None:
                nonlocal errors
                while (start := time.perf_counter()) < deadline:
                    r = await client.post("", json=body)
                    latencies.append(time.perf_counter() - start)
                    errors += r.status_code != 200

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, errors

    latencies, errors = asyncio.run(main())
    ms = sorted(x * 1e3 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return Load("", concurrency, len(ms) / seconds, statistics.median(ms), p99, errors, "httpx")


def machine_line() -> str:
    """The machine in a few words, for a table's caption."""
    import platform

    import torch

    cpu = next(
        (x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
         if x.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return f"{os.cpu_count()} cores, {cpu}, {torch.backends.cpu.get_cpu_capability()}"


def load_tool() -> str:
    return "wrk" if shutil.which("wrk") else "httpx"


def run(seconds: float, threads: int) -> list[Load]:
    measure = with_wrk if load_tool() == "wrk" else with_httpx
    results = []
    for name, path, body, settings in TARGETS:
        with server(name.startswith("bare"), threads, settings) as (url, _):
            for _ in range(20):  # warm-up: first-call allocations, lazy imports
                httpx.post(url + path, json=body, timeout=30).raise_for_status()
            for c in CONCURRENCY:
                load = measure(url + path, body, c, seconds)
                load.target = name
                results.append(load)
                print(
                    f"{name} c={c}: {load.rps:.0f} req/s, p50 {load.p50_ms:.2f} ms, "
                    f"p99 {load.p99_ms:.2f} ms, errors {load.errors} ({load.tool})",
                    flush=True,
                )
    return results


def _rss_mib(pid: int) -> tuple[float, float]:
    """Current and peak resident memory of ``pid`` (VmRSS, VmHWM) in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss, hwm = (float(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM"))  # type: ignore[union-attr]
    return rss / 1024, hwm / 1024


def peak_memory(threads: int) -> dict[str, float]:
    """Server RSS before and peak during one MC request of max rows and max samples."""
    path = f"/v1/models/{MODEL}/predict/mc"
    # The largest request takes longer than the default 30 s deadline on 2 cores with torch
    # masks: measured here for memory, not latency, so the deadline is lifted.
    with server(False, threads, {"REQUEST_TIMEOUT_S": "600"}) as (url, proc):
        httpx.post(url + path, json={"inputs": [ROW], "n_samples": 100}, timeout=60)
        before, _ = _rss_mib(proc.pid)
        body = {"inputs": [ROW] * MEMORY_ROWS, "n_samples": MEMORY_SAMPLES, "seed": 1}
        start = time.perf_counter()
        r = httpx.post(url + path, json=body, timeout=300)
        seconds = time.perf_counter() - start
        r.raise_for_status()
        _, peak = _rss_mib(proc.pid)
    return {"before_mib": before, "peak_mib": peak, "seconds": seconds}
