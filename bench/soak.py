"""Soak test: mixed eval/MC traffic from many concurrent clients against a real server.

Starts `python -m service serve` (one worker, gRPC on) on free loopback ports over a temporary
repository (the test models plus the shipped `concrete`), records every request's answer
sent alone, then lets N clients send random requests from that pool for a fixed time.
Every answer under load must equal its solo answer byte for byte (seeded MC included); no
5xx; no request may be dropped; the server's RSS may grow at most 10% after warm-up.

Prints a Markdown summary and exits 1 if a criterion fails; --json writes the figures.
Usage: python bench/soak.py [--duration 180] [--clients 64] [--warmup 30] [--json out.json]

The traffic mix is the MIX table: add a row (path and a body factory) for a new endpoint.
gRPC rows (Open Inference Protocol ModelInfer) share one HTTP/2 channel among the clients;
their status codes count as REST's (UNAVAILABLE as 503, INTERNAL as 500).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.helpers writes the test models

from service.protocols.grpc import predict_v2_pb2 as pb  # noqa: E402
from service.protocols.grpc.server import SERVICE  # noqa: E402
from tests.helpers import grpc_infer_request, write_test_repository  # noqa: E402

Body = dict[str, Any]
CONCRETE_ROW = [540.0, 0.0, 0.0, 162.0, 2.5, 1040.0, 676.0, 28.0]


def rows(rng: random.Random, width: int, base: list[float] | None = None) -> list[list[float]]:
    base = base or [0.0] * width
    return [[v + rng.uniform(-2, 2) for v in base] for _ in range(rng.randint(1, 8))]


def mc(rng: random.Random, inputs: list[list[float]], samples: bool = False) -> Body:
    body: Body = {
        "inputs": inputs,
        "n_samples": rng.choice([10, 100, 1000]),
        "seed": rng.randrange(2**63),
    }
    if samples:
        body |= {"n_samples": 20, "return_samples": True}
    return body


def v2_infer(rng: random.Random, inputs: list[list[float]]) -> Body:
    """Open Inference Protocol request: eval, or seeded MC when a coin says so."""
    tensor = {"name": "input", "shape": [len(inputs), len(inputs[0])], "datatype": "FP32"}
    body: Body = {"inputs": [{**tensor, "data": inputs}]}
    if rng.random() < 0.5:
        body["parameters"] = {"n_samples": rng.choice([10, 100]), "seed": rng.randrange(2**63)}
    return body


def grpc_infer(rng: random.Random, model: str, inputs: list[list[float]]) -> Body:
    """A ModelInfer request: eval, or seeded MC when a coin says so."""
    body: Body = {"model": model, "inputs": inputs, "parameters": {}}
    if rng.random() < 0.5:
        body["parameters"] = {"n_samples": rng.choice([10, 100]), "seed": rng.randrange(2**63)}
    return body


def grpc_request(body: Body) -> pb.ModelInferRequest:
    return grpc_infer_request(body["model"], body["inputs"], **body["parameters"])


#: gRPC status codes as the HTTP statuses REST gives the same errors (else 500).
GRPC_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass(frozen=True)
class Traffic:
    """One kind of request: where it goes (an HTTP path, or a gRPC call), how often, and how
    to make a body."""

    name: str
    weight: int
    path: str
    body: Callable[[random.Random], Body]
    protocol: str = "http"


MIX = [
    Traffic(
        "eval concrete",
        4,
        "/v1/models/concrete/predict",
        lambda r: {"inputs": rows(r, 8, CONCRETE_ROW)},
    ),
    Traffic("eval clf", 2, "/v1/models/clf/predict", lambda r: {"inputs": rows(r, 5)}),
    Traffic(
        "MC concrete",
        3,
        "/v1/models/concrete/predict/mc",
        lambda r: mc(r, rows(r, 8, CONCRETE_ROW)),
    ),
    Traffic("MC deep", 2, "/v1/models/deep/predict/mc", lambda r: mc(r, rows(r, 4))),
    Traffic(
        "MC clf + samples",
        1,
        "/v1/models/clf/predict/mc",
        lambda r: mc(r, rows(r, 5), samples=True),
    ),
    Traffic(
        "v2 infer concrete",
        2,
        "/v2/models/concrete/infer",
        lambda r: v2_infer(r, rows(r, 8, CONCRETE_ROW)),
    ),
    Traffic(
        "gRPC infer concrete",
        2,
        f"/{SERVICE}/ModelInfer",
        lambda r: grpc_infer(r, "concrete", rows(r, 8, CONCRETE_ROW)),
        "grpc",
    ),
    Traffic(
        "gRPC infer clf",
        1,
        f"/{SERVICE}/ModelInfer",
        lambda r: grpc_infer(r, "clf", rows(r, 5)),
        "grpc",
    ),
]


@dataclass
class Tally:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    mismatched: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # no answer: error class -> count
    resent: Counter[str] = field(default_factory=Counter)  # answered on the second try
    latencies: list[float] = field(default_factory=list)
    by_kind: Counter[str] = field(default_factory=Counter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(model_dir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """The server's process, HTTP URL and gRPC address."""
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROPOUT_")}
    env["DROPOUT_LOG_LEVEL"] = "warning"
    env["DROPOUT_GRPC_PORT"] = str(grpc_port)
    cmd = [
        sys.executable,
        "-m",
        "service",
        "serve",
        "--port",
        str(port),
        "--models",
        str(model_dir),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return proc, url, f"127.0.0.1:{grpc_port}"
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready")


def make_pool(seed: int, per_kind: int) -> list[tuple[Traffic, Body]]:
    rng = random.Random(seed)
    return [(t, t.body(rng)) for t in MIX for _ in range(per_kind)]


def grpc_answer(response: pb.ModelInferResponse) -> bytes:
    return response.SerializeToString(deterministic=True)


def solo_answers(url: str, grpc_url: str, pool: list[tuple[Traffic, Body]]) -> list[bytes]:
    with httpx.Client(base_url=url, timeout=60) as client, grpc.insecure_channel(grpc_url) as ch:
        answers = []
        for traffic, body in pool:
            if traffic.protocol == "grpc":
                call = ch.unary_unary(
                    traffic.path,
                    request_serializer=pb.ModelInferRequest.SerializeToString,
                    response_deserializer=pb.ModelInferResponse.FromString,
                )
                answers.append(grpc_answer(call(grpc_request(body), timeout=60)))
                continue
            r = client.post(traffic.path, json=body)
            r.raise_for_status()
            answers.append(r.content)
        return answers


#: The connection broke before an answer arrived, typically the server closing an idle
#: keep-alive connection just as the request went out. Predictions are pure functions, so a
#: client may resend; each resend is counted and reported, and a second failure is a loss.
RESEND = (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)


async def send(
    client: httpx.AsyncClient, path: str, body: Body, tally: Tally
) -> httpx.Response | None:
    """POST ``body``; resend once if the connection closed before any answer; None if lost."""
    for attempt in range(2):
        try:
            return await client.post(path, json=body)
        except RESEND as exc:
            if attempt == 0:
                tally.resent[type(exc).__name__] += 1
                continue
            tally.dropped[type(exc).__name__] += 1
        except httpx.HTTPError as exc:
            tally.dropped[type(exc).__name__] += 1
            return None
    return None


async def load(
    url: str,
    grpc_url: str,
    pool: list[tuple[Traffic, Body]],
    solo: list[bytes],
    clients: int,
    duration: float,
    seed: int,
) -> Tally:
    tally = Tally()
    weights = [t.weight for t, _ in pool]
    stop = time.monotonic() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with (
        httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client,
        grpc.aio.insecure_channel(grpc_url) as channel,
    ):
        infer = channel.unary_unary(
            f"/{SERVICE}/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        requests = [grpc_request(b) if t.protocol == "grpc" else None for t, b in pool]

        async def answer(k: int) -> tuple[int, bytes] | None:
            traffic, body = pool[k]
            if traffic.protocol == "http":
                r = await send(client, traffic.path, body, tally)
                return None if r is None else (r.status_code, r.content)
            try:
                return 200, grpc_answer(await infer(requests[k], timeout=60))
            except grpc.aio.AioRpcError as exc:
                return GRPC_STATUS.get(exc.code(), 500), b""

        async def one_client(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < stop:
                k = rng.choices(range(len(pool)), weights)[0]
                traffic = pool[k][0]
                tally.sent += 1
                tally.by_kind[traffic.name] += 1
                start = time.perf_counter()
                answered = await answer(k)
                if answered is None:
                    continue
                tally.latencies.append(time.perf_counter() - start)
                status, content = answered
                tally.statuses[status] += 1
                if status == 200 and content != solo[k]:
                    tally.mismatched += 1

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    return tally


async def sample_rss(
    pid: int, every: float, out: list[tuple[float, float]], done: asyncio.Event
) -> None:
    start = time.monotonic()
    while not done.is_set():
        out.append((time.monotonic() - start, rss_mib(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every)


async def soak(
    url: str,
    grpc_url: str,
    pid: int,
    args: argparse.Namespace,
    pool: list[tuple[Traffic, Body]],
    solo: list[bytes],
) -> tuple[Tally, list[tuple[float, float]]]:
    samples: list[tuple[float, float]] = []
    done = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, 1.0, samples, done))
    tally = await load(url, grpc_url, pool, solo, args.clients, args.duration, args.seed)
    done.set()
    await sampler
    return tally, samples


def summarise(
    args: argparse.Namespace, tally: Tally, rss: list[tuple[float, float]], replay_ok: bool
) -> dict[str, Any]:
    after = [mib for t, mib in rss if t >= args.warmup] or [rss[-1][1]]
    base = after[0]
    ms = sorted(s * 1000 for s in tally.latencies) or [0.0]
    five_xx = sum(n for code, n in tally.statuses.items() if code >= 500)
    figures = {
        "duration_s": args.duration,
        "clients": args.clients,
        "warmup_s": args.warmup,
        "requests": tally.sent,
        "answered": sum(tally.statuses.values()),
        "throughput_rps": round(sum(tally.statuses.values()) / args.duration, 1),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "by_kind": dict(tally.by_kind),
        "5xx": five_xx,
        "dropped": sum(tally.dropped.values()),
        "dropped_by_error": dict(tally.dropped),
        "resent_after_closed_connection": dict(tally.resent),
        "mismatched": tally.mismatched,
        "solo_answers_unchanged_after": replay_ok,
        "latency_ms": {
            "p50": round(statistics.median(ms), 1),
            "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
            "max": round(ms[-1], 1),
        },
        "rss_mib": {
            "start": round(rss[0][1], 1),
            "after_warmup": round(base, 1),
            "end": round(after[-1], 1),
            "max_after_warmup": round(max(after), 1),
        },
        "rss_growth_after_warmup": round((max(after) - base) / base, 4),
    }
    figures["passed"] = (
        five_xx == 0
        and figures["dropped"] == 0
        and tally.mismatched == 0
        and replay_ok
        and figures["rss_growth_after_warmup"] < 0.10
        and figures["answered"] == tally.sent
    )
    return figures


def report(f: dict[str, Any]) -> str:
    lat, rss = f["latency_ms"], f["rss_mib"]
    return "\n".join(
        [
            f"Soak: {f['clients']} clients, {f['duration_s']:.0f} s, "
            f"warm-up {f['warmup_s']:.0f} s, {os.cpu_count()} cores",
            "",
            "| figure | value |",
            "|---|---|",
            f"| requests sent / answered | {f['requests']} / {f['answered']} |",
            f"| throughput | {f['throughput_rps']} req/s |",
            f"| statuses | {f['statuses']} |",
            f"| 5xx / dropped / mismatched | {f['5xx']} / {f['dropped']} / {f['mismatched']} |",
            f"| dropped by error | {f['dropped_by_error']} |",
            f"| resent once (connection broke, no answer) | "
            f"{f['resent_after_closed_connection']} |",
            f"| solo answers unchanged after the soak | {f['solo_answers_unchanged_after']} |",
            f"| latency p50 / p99 / max | {lat['p50']} / {lat['p99']} / {lat['max']} ms |",
            f"| RSS start / after warm-up / end / max | {rss['start']} / {rss['after_warmup']} / "
            f"{rss['end']} / {rss['max_after_warmup']} MiB |",
            f"| RSS growth after warm-up | {100 * f['rss_growth_after_warmup']:.1f}% |",
            f"| mix | {f['by_kind']} |",
            f"| verdict | {'PASS' if f['passed'] else 'FAIL'} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--warmup", type=float, default=30.0, help="seconds before the RSS baseline"
    )
    parser.add_argument("--per-kind", type=int, default=16, help="distinct requests per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.warmup >= args.duration:
        parser.error("--warmup must be shorter than --duration")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        write_test_repository(model_dir)
        shutil.copytree(ROOT / "models" / "concrete", model_dir / "concrete")
        proc, url, grpc_url = start_server(model_dir)
        try:
            pool = make_pool(args.seed, args.per_kind)
            solo = solo_answers(url, grpc_url, pool)
            tally, rss = asyncio.run(soak(url, grpc_url, proc.pid, args, pool, solo))
            replay_ok = solo_answers(url, grpc_url, pool) == solo
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    figures = summarise(args, tally, rss, replay_ok)
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
