"""Mixed load: does the cheap eval request keep its speed while MC requests run beside it?

One uvicorn worker serves the shipped concrete model. wrk sends one-row eval requests from
`--clients` connections alone, then again while a second wrk sends MC T=100 requests from as
many connections; the table compares eval's requests/s and latency alone and mixed, and
shows MC's. With `--base REV` the same is measured on a worktree of that commit, in turns,
so a change's effect shows side by side.

    python bench/mixed.py [--base REV] [--seconds 20] [--clients 32] [--write]
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import serving  # noqa: E402
from ab import checkout  # noqa: E402

START = "<!-- mixed: written by bench/mixed.py --write -->"
END = "<!-- /mixed -->"
EVAL = ("/v1/models/concrete/predict", {"inputs": [serving.ROW]})
MC = ("/v1/models/concrete/predict/mc", serving.MC_100)


def measure(root: Path, clients: int, seconds: float) -> dict[str, serving.Load]:
    settings = {"ACCESS_LOG": "false", "GRPC_PORT": "0"}
    with serving.server(False, 2, settings, root=root) as (url, _):
        for path, body in (EVAL, MC):  # warm-up
            serving.with_wrk(url + path, body, clients, 2)
        alone = serving.with_wrk(url + EVAL[0], EVAL[1], clients, seconds)
        with ThreadPoolExecutor(2) as pool:
            mixed_eval = pool.submit(serving.with_wrk, url + EVAL[0], EVAL[1], clients, seconds)
            mixed_mc = pool.submit(serving.with_wrk, url + MC[0], MC[1], clients, seconds)
            return {"alone": alone, "eval": mixed_eval.result(), "mc": mixed_mc.result()}


def row(name: str, m: dict[str, serving.Load]) -> str:
    a, e, mc = m["alone"], m["eval"], m["mc"]
    return (
        f"| {name} | {a.rps:.0f} | {a.p50_ms:.1f} / {a.p99_ms:.1f} | {e.rps:.0f} "
        f"({e.rps / a.rps:.2f}x) | {e.p50_ms:.1f} / {e.p99_ms:.1f} ({e.p50_ms / a.p50_ms:.1f}x) "
        f"| {mc.rps:.0f} | {mc.p50_ms:.1f} / {mc.p99_ms:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", help="a commit to measure beside this checkout")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    rows = []
    if args.base:
        with checkout(args.base) as tree:
            rows.append(row(args.base, measure(tree, args.clients, args.seconds)))
    rows.append(row("this checkout", measure(ROOT, args.clients, args.seconds)))
    text = "\n".join(
        [
            f"`python bench/mixed.py{' --base ' + args.base if args.base else ''} --seconds "
            f"{args.seconds:g} --clients {args.clients}` ({serving.machine_line()}; wrk -t1 per "
            f"load, {args.clients} eval clients, then as many MC T=100 clients beside them):",
            "",
            "| code | eval alone req/s | p50 / p99 ms | eval mixed req/s | p50 / p99 ms "
            "| MC mixed req/s | p50 / p99 ms |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(text)
    if args.write:
        serving.replace_section(ROOT / "docs" / "benchmarks.md", START, END, text)


if __name__ == "__main__":
    main()
