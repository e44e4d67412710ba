"""Before against after: the service at another commit and at this checkout, side by side.

Both serve the shipped concrete model from one uvicorn worker each (default settings, the
same Python environment, each its own code) on 127.0.0.1; wrk sends one-row requests to v1
eval, v1 MC T=100 and v2 eval (JSON) at 1, 8 and 64 connections. The two servers take
turns, endpoint by endpoint and round by round, the order flipped every round, so both see
the same machine; the table gives the median requests/s of the rounds. Needs wrk.

    python bench/ab.py --base e89fb90 --rounds 5 --seconds 5 --write

``--write`` puts the table into docs/benchmarks.md (between its ab markers, where make bench
keeps it), with a placeholder for the reading, which is written by hand.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import serving

ROOT = serving.ROOT
ROW = serving.ROW
#: The A/B section of docs/benchmarks.md: written by --write, kept by make bench.
AB_START, AB_END = "<!-- ab: written by bench/ab.py --write -->", "<!-- /ab -->"
ENDPOINTS: list[tuple[str, str, dict[str, object]]] = [
    ("v1 eval", "/v1/models/concrete/predict", {"inputs": [ROW]}),
    ("v1 MC T=100", "/v1/models/concrete/predict/mc", serving.MC_100),
    (
        "v2 eval",
        "/v2/models/concrete/infer",
        {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": ROW}]},
    ),
]


@contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """A detached worktree of ``rev``, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="dropout-ab-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=ROOT, check=True
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2, help="DROPOUT_TORCH_THREADS")
    parser.add_argument("--write", action="store_true", help="into docs/benchmarks.md")
    args = parser.parse_args()
    rps: dict[tuple[str, str, int], list[float]] = {}
    with ExitStack() as stack:
        trees = {"before": stack.enter_context(checkout(args.base)), "after": ROOT}
        urls = {
            side: stack.enter_context(serving.server(False, args.threads, root=tree))[0]
            for side, tree in trees.items()
        }
        for url in urls.values():  # warm-up: first-call allocations, lazy imports
            for _, path, body in ENDPOINTS:
                for _ in range(50):
                    httpx.post(url + path, json=body, timeout=30).raise_for_status()
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for name, path, body in ENDPOINTS:
                for c in serving.CONCURRENCY:
                    for side in order:
                        load = serving.with_wrk(urls[side] + path, body, c, args.seconds)
                        assert load.errors == 0, (side, name, c, load)
                        rps.setdefault((side, name, c), []).append(load.rps)
                        print(f"round {r} {side} {name} c={c}: {load.rps:.0f} req/s", flush=True)
    med = {k: statistics.median(v) for k, v in rps.items()}
    after = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"`python bench/ab.py --base {args.base} --rounds {args.rounds} "
        f"--seconds {args.seconds:g}`: {args.base} against {after} (this checkout), median "
        f"requests/s of {args.rounds} interleaved rounds, {serving.machine_line()}.",
        "",
        "| endpoint | clients | before | after | after / before | after, v2 / v1 eval |",
        "|---|---|---|---|---|---|",
    ]
    for name, _, _ in ENDPOINTS:
        for c in serving.CONCURRENCY:
            was, now = med[("before", name, c)], med[("after", name, c)]
            v2 = med[("after", "v2 eval", c)] / med[("after", "v1 eval", c)]
            shown = f"{v2:.2f}x" if name == "v2 eval" else ""
            lines.append(f"| {name} | {c} | {was:.0f} | {now:.0f} | {now / was:.2f}x | {shown} |")
    print("\n" + "\n".join(lines))
    if args.write:
        write(lines)


def write(lines: list[str]) -> None:
    """Replace the table between the markers of docs/benchmarks.md; the reading under it,
    within the markers, is written by hand for each comparison."""
    page = ROOT / "docs" / "benchmarks.md"
    text = page.read_text()
    if AB_START not in text:
        raise SystemExit(f"{page} has no {AB_START!r}: run make bench first")
    head, rest = text.split(AB_START, 1)
    _, tail = rest.split(AB_END, 1)
    body = "\n".join(lines)
    page.write_text(f"{head}{AB_START}\n{body}\n\n(reading: to be written)\n{AB_END}{tail}")


if __name__ == "__main__":
    main()
