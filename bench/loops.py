"""The event loop under the service: asyncio's own against uvloop, same server otherwise.

Why the service runs on asyncio's loop (protocols/http/server.py): with small jobs computing
on the loop (DROPOUT_INLINE_MAX_MACS) and many clients, uvloop leaves a few requests waiting
about a second before their handler runs. One uvicorn worker serves the shipped models with
each loop in turn; wrk (one thread) sends one-row requests; rounds alternate the loops.

    python bench/loops.py                 # prints the Markdown table
    python bench/loops.py --write         # and replaces it in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import serving  # noqa: E402

START = "<!-- loops: written by bench/loops.py --write -->"
END = "<!-- /loops -->"
LOOPS = ("asyncio", "uvloop")
CELLS = [
    ("eval", "/v1/models/concrete/predict", {"inputs": [serving.ROW]}, 1),
    ("eval", "/v1/models/concrete/predict", {"inputs": [serving.ROW]}, 64),
    ("MC T=100", "/v1/models/concrete/predict/mc", serving.MC_100, 1),
    ("MC T=100", "/v1/models/concrete/predict/mc", serving.MC_100, 64),
    ("MC T=1000", "/v1/models/concrete/predict/mc", serving.MC_1000, 64),
]
RUNNER = """
import sys, uvicorn
from service.protocols.http.server import uvicorn_options
from service.settings import Settings
settings = Settings()
uvicorn.run("service.app:create_app", factory=True, **uvicorn_options(settings, loop=sys.argv[1]))
"""


@contextmanager
def server(loop: str) -> Iterator[str]:
    port = serving.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROPOUT_")}
    env |= {"DROPOUT_PORT": str(port), "DROPOUT_GRPC_PORT": "0", "DROPOUT_LOG_LEVEL": "warning"}
    env |= {"DROPOUT_ACCESS_LOG": "false"}  # its lines would land among the tables
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, loop], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        serving.wait_ready(url + "/readyz", proc, f"the server on {loop}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(seconds: float, rounds: int) -> dict[tuple[str, int, str], list[serving.Load]]:
    results: dict[tuple[str, int, str], list[serving.Load]] = {}
    for r in range(rounds):
        for loop in LOOPS if r % 2 == 0 else LOOPS[::-1]:
            with server(loop) as url:
                for kind, path, body, clients in CELLS:
                    serving.with_wrk(url + path, body, clients, 2)  # warm-up
                    load = serving.with_wrk(url + path, body, clients, seconds)
                    results.setdefault((kind, clients, loop), []).append(load)
                    print(f"{r} {loop} {kind} {clients}: {load}", file=sys.stderr)
    return results


def table(
    results: dict[tuple[str, int, str], list[serving.Load]], seconds: float, rounds: int
) -> str:
    def median(loads: list[serving.Load]) -> serving.Load:
        return sorted(loads, key=lambda x: x.rps)[(len(loads) - 1) // 2]

    lines = [
        f"`python bench/loops.py --seconds {seconds:g} --rounds {rounds}` "
        f"({serving.machine_line()}; wrk -t1; median round):",
        "",
        "| request | clients | asyncio req/s | p50 / p99 ms | uvloop req/s | p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for kind, _, _, clients in CELLS:
        a, u = (median(results[(kind, clients, loop)]) for loop in LOOPS)
        lines.append(
            f"| {kind} | {clients} | {a.rps:.0f} | {a.p50_ms:.1f} / {a.p99_ms:.1f} "
            f"| {u.rps:.0f} | {u.p50_ms:.1f} / {u.p99_ms:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    text = table(run(args.seconds, args.rounds), args.seconds, args.rounds)
    print(text)
    if args.write:
        serving.replace_section(ROOT / "docs" / "benchmarks.md", START, END, text)


if __name__ == "__main__":
    main()
