"""gRPC against REST v2: requests/s and latency of the same Open Inference Protocol requests
through both front doors of one server.

One `dropout-service serve` worker (gRPC on) serves the shipped concrete model; eval and MC
T=100 requests of one row come from 1, 8 and 64 closed-loop clients, each with its own
connection: REST v2 JSON bodies from an asyncio httpx client, gRPC ModelInfer (raw input
bytes, what tritonclient sends) from grpc.aio channels. No C or Go load generator for gRPC
is a Debian package, so both sides use an asyncio client in this one process, which
shares the machine with the server: read the ratios, not the absolute rates. The access log
is off (on both doors alike). Cells are
interleaved over rounds and the median round is shown.

    python bench/grpc_rest.py              # prints the Markdown section
    python bench/grpc_rest.py --write      # and replaces it in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import serving  # noqa: E402

from service.protocols.grpc import predict_v2_pb2 as pb  # noqa: E402
from service.protocols.grpc.server import SERVICE  # noqa: E402
from tests.helpers import grpc_infer_request  # noqa: E402

START = "<!-- grpc: written by bench/grpc_rest.py --write -->"
END = "<!-- /grpc -->"
CLIENTS = (1, 8, 64)
KINDS = {"eval": {}, "MC T=100": {"n_samples": 100, "seed": 7}}


@dataclass
class Cell:
    kind: str
    protocol: str
    clients: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def rest_body(params: dict[str, int]) -> dict[str, object]:
    tensor = {"name": "input", "shape": [1, 8], "datatype": "FP32", "data": serving.ROW}
    body: dict[str, object] = {"inputs": [tensor]}
    if params:
        body["parameters"] = params
    return body


def grpc_request(params: dict[str, int]) -> pb.ModelInferRequest:
    return grpc_infer_request(serving.MODEL, [serving.ROW], **params)


async def closed_loop(
    clients: list[Callable[[], Awaitable[bool]]], seconds: float
) -> tuple[list[float], int]:
    """Each client sends, waits for its answer, and sends again until time is up."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def run(send: Callable[[], Awaitable[bool]]) -> None:
        nonlocal errors
        while (start := time.perf_counter()) < deadline:
            ok = await send()
            latencies.append(time.perf_counter() - start)
            errors += not ok

    await asyncio.gather(*(run(c) for c in clients))
    return latencies, errors


async def measure_rest(url: str, params: dict[str, int], n: int, seconds: float) -> Cell:
    body = rest_body(params)
    path = f"{url}/v2/models/{serving.MODEL}/infer"
    sessions = [httpx.AsyncClient(timeout=30) for _ in range(n)]

    def client(s: httpx.AsyncClient) -> Callable[[], Awaitable[bool]]:
        async def send() -> bool:
            return (await s.post(path, json=body)).status_code == 200

        return send

    try:
        latencies, errors = await closed_loop([client(s) for s in sessions], seconds)
    finally:
        for s in sessions:
            await s.aclose()
    return cell("", "REST v2", n, latencies, errors, seconds)


async def measure_grpc(address: str, params: dict[str, int], n: int, seconds: float) -> Cell:
    request = grpc_request(params)
    channels = [grpc.aio.insecure_channel(address) for _ in range(n)]

    def client(channel: grpc.aio.Channel) -> Callable[[], Awaitable[bool]]:
        infer = channel.unary_unary(
            f"/{SERVICE}/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )

        async def send() -> bool:
            try:
                await infer(request, timeout=30)
            except grpc.aio.AioRpcError:
                return False
            return True

        return send

    try:
        latencies, errors = await closed_loop([client(c) for c in channels], seconds)
    finally:
        for c in channels:
            await c.close()
    return cell("", "gRPC", n, latencies, errors, seconds)


def cell(
    kind: str, protocol: str, n: int, latencies: list[float], errors: int, seconds: float
) -> Cell:
    ms = sorted(x * 1e3 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return Cell(kind, protocol, n, len(ms) / seconds, statistics.median(ms), p99, errors)


def run(seconds: float, rounds: int, threads: int) -> list[list[Cell]]:
    grpc_port = serving.free_port()
    # No access log: its lines would go to this process's stdout, between the tables.
    settings = {"GRPC_PORT": str(grpc_port), "ACCESS_LOG": "false"}
    address = f"127.0.0.1:{grpc_port}"
    measured: list[list[Cell]] = []
    with serving.server(False, threads, settings) as (url, _):

        async def main() -> None:
            for params in KINDS.values():  # warm-up: lazy imports, first allocations
                await measure_rest(url, params, 1, 0.5)
                await measure_grpc(address, params, 1, 0.5)
            for r in range(rounds):
                cells = []
                for n in CLIENTS:
                    for kind, params in KINDS.items():
                        doors = [
                            lambda p=params, n=n: measure_rest(url, p, n, seconds),
                            lambda p=params, n=n: measure_grpc(address, p, n, seconds),
                        ]
                        for measure in doors if r % 2 == 0 else doors[::-1]:  # interleaved
                            c = await measure()
                            c.kind = kind
                            cells.append(c)
                            print(c, file=sys.stderr)
                measured.append(cells)

        asyncio.run(main())
    return measured


def median_cells(rounds: list[list[Cell]]) -> list[Cell]:
    """Per (kind, protocol, clients), the round with the median requests/s."""
    out = []
    for key in sorted({(c.kind, c.protocol, c.clients) for r in rounds for c in r}):
        same = sorted((c for r in rounds for c in r if (c.kind, c.protocol, c.clients) == key),
                      key=lambda c: c.rps)  # fmt: skip
        out.append(same[(len(same) - 1) // 2])
    return out


def table(cells: list[Cell], seconds: float, rounds: int) -> str:
    find = {(c.kind, c.protocol, c.clients): c for c in cells}
    lines = [
        f"`python bench/grpc_rest.py --seconds {seconds:g} --rounds {rounds}` "
        f"({serving.machine_line()}; server and asyncio load generator on the same cores):",
        "",
        "| request | clients | REST v2 req/s | gRPC req/s | gRPC / REST | REST p50 / p99 ms "
        "| gRPC p50 / p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        for n in CLIENTS:
            rest, rpc = find[(kind, "REST v2", n)], find[(kind, "gRPC", n)]
            lines.append(
                f"| {kind} | {n} | {rest.rps:.0f} | {rpc.rps:.0f} | {rpc.rps / rest.rps:.2f}x "
                f"| {rest.p50_ms:.2f} / {rest.p99_ms:.2f} | {rpc.p50_ms:.2f} / {rpc.p99_ms:.2f} "
                f"| {rest.errors + rpc.errors} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--write", action="store_true", help="replace the docs section")
    args = parser.parse_args()
    cells = median_cells(run(args.seconds, args.rounds, args.threads))
    text = table(cells, args.seconds, args.rounds)
    print(text)
    if args.write:
        serving.replace_section(ROOT / "docs" / "benchmarks.md", START, END, text)


if __name__ == "__main__":
    main()
