"""`make bench`: run every benchmark, write docs/benchmarks.md and its plot.

Usage: python bench/report.py [--quick] [--threads N] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import engine
import matplotlib.pyplot as plt
import serving
import torch

from service.serving.jobs import MIN_SPREAD_TILE_MACS

ROOT = Path(__file__).resolve().parents[1]
ENGINE_COLUMNS = [
    "naive loop",
    "naive batched",
    "peer",
    "engine",
    "engine (torch masks)",
    "floor",
    "floor GEMMs",
]
MEMORY_BOUND_MIB = 400


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(threads: int, tool: str) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores, {cpu_name()} ({platform.machine()}), no GPU; "
        f"torch {torch.__version__} with {threads} intra-op threads; Python "
        f"{platform.python_version()}; HTTP load from {tool}; load average {load} at the start"
    )


def short_machine(threads: int) -> str:
    return (
        f"{datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores, {cpu_name()}, "
        f"{torch.backends.cpu.get_cpu_capability()}, {threads} threads"
    )


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def engine_tables(cells: list[engine.Cell]) -> list[str]:
    lines = []
    for model in engine.MODELS:
        for rows in engine.ROWS:
            lines += [
                f"**{model}, B = {rows}** (median ms per call; ratios are time over time)",
                "",
                "| T | " + " | ".join(ENGINE_COLUMNS) + " | engine/naive loop | engine/naive"
                " batched | engine/peer | engine/floor |",
                "|---|" + "---|" * (len(ENGINE_COLUMNS) + 4),
            ]
            for c in cells:
                if (c.model, c.rows) != (model, rows):
                    continue
                s = c.seconds.get
                cols = [fmt_ms(s(m)) if m in c.seconds else "skip" for m in ENGINE_COLUMNS]
                e = s("engine")
                lines.append(
                    f"| {c.samples} | "
                    + " | ".join(cols)
                    + f" | {ratio(e, s('naive loop'))} | {ratio(e, s('naive batched'))}"
                    f" | {ratio(e, s('peer'))} | {ratio(e, s('floor'))} |"
                )
            skipped = [
                f"T={c.samples} {m}: {why}"
                for c in cells
                if (c.model, c.rows) == (model, rows)
                for m, why in c.skipped.items()
            ]
            if skipped:
                lines += ["", "Not run: " + "; ".join(skipped) + "."]
            lines.append("")
    return lines


def engine_targets(cells: list[engine.Cell]) -> list[str]:
    def speedup(rows: int, vs: str) -> list[str]:
        # The floor bounds any speedup: no engine beats naive/floor.
        return [
            f"{c.seconds[vs] / c.seconds['engine']:.1f}x ({c.model}; the floor allows "
            f"{c.seconds[vs] / c.seconds['floor']:.1f}x)"
            for c in cells
            if c.rows == rows and c.samples == 100 and vs in c.seconds
        ]

    def loop_speedups(rows: int) -> list[float]:
        return [
            c.seconds["naive loop"] / c.seconds["engine"]
            for c in cells
            if c.rows == rows and c.samples == 100 and "naive loop" in c.seconds
        ]

    def met(values: list[float], ok: object) -> str:
        return "met" if values and all(ok(v) for v in values) else "**not met**"  # type: ignore[operator]

    loop1, loop32 = loop_speedups(1), loop_speedups(32)
    peer = [(c, c.seconds["peer"] / c.seconds["engine"]) for c in cells if "peer" in c.seconds]
    floor = [(c, c.seconds["engine"] / c.seconds["floor"]) for c in cells if c.samples >= 1000]
    slower = [f"{c.model} B={c.rows} T={c.samples} ({r:.2f}x)" for c, r in peer if r <= 1]
    far = [f"{c.model} B={c.rows} T={c.samples} ({r:.2f}x)" for c, r in floor if r > 2]
    return [
        "| target | measured | verdict |",
        "|---|---|---|",
        f"| >= 30x faster than the naive loop at B=1, T=100 | {', '.join(speedup(1, 'naive loop'))}"
        f" | {met(loop1, lambda v: v >= 30)} |",
        f"| >= 5x faster than the naive loop at B=32, T=100 | "
        f"{', '.join(speedup(32, 'naive loop'))} | {met(loop32, lambda v: v >= 5)} |",
        f"| faster than the peer at every point | slower at: {', '.join(slower) or 'none'} "
        f"(of {len(peer)} points run) | {met([r for _, r in peer], lambda v: v > 1)} |",
        f"| within 2x of the floor at T >= 1000 | over 2x at: {', '.join(far) or 'none'} "
        f"(of {len(floor)}) | {met([r for _, r in floor], lambda v: v <= 2)} |",
    ]


def serving_tables(loads: list[serving.Load]) -> list[str]:
    bare = {x.concurrency: x.rps for x in loads if x.target.startswith("bare")}
    lines = [
        "| endpoint | concurrency | requests/s | p50 ms | p99 ms | errors | vs bare app |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in loads:
        lines.append(
            f"| {x.target} | {x.concurrency} | {x.rps:.0f} | {x.p50_ms:.2f} | {x.p99_ms:.2f} "
            f"| {x.errors} | {x.rps / bare[x.concurrency]:.2f}x |"
        )
    lines += [
        "",
        "| target | measured (throughput vs bare app, c = 1 / 8 / 64) | verdict |",
        "|---|---|---|",
    ]
    for target, need in (("eval predict", 0.9), ("MC T=100", 0.5), ("MC T=100, packed masks", 0.5)):
        rel = [x.rps / bare[x.concurrency] for x in loads if x.target == target]
        verdict = "met" if all(r >= need for r in rel) else "**not met**"
        shown = " / ".join(f"{r:.2f}" for r in rel)
        lines.append(f"| {target} >= {need}x the bare app | {shown} | {verdict} |")
    one = next(x.rps / bare[1] for x in loads if x.target == "eval predict" and x.concurrency == 1)
    verdict = "met" if one >= 0.6 else "**not met**"
    lines.append(f"| eval predict at one client >= 0.6x the bare app | {one:.2f} | {verdict} |")
    return lines


HEADLINE_START = "<!-- headline: written by make bench (bench/report.py) -->"
HEADLINE_END = "<!-- /headline -->"


def headline(cells: list[engine.Cell], loads: list[serving.Load], machine: str) -> str:
    """The README's benchmark sentences, from this run's tables (docs/benchmarks.md)."""
    one = next(c for c in cells if c.model == "16-256-256-1" and c.rows == 1 and c.samples == 100)
    floor = [c.seconds["engine"] / c.seconds["floor"] for c in cells if c.samples >= 1000]
    rps = {(x.target, x.concurrency): x.rps for x in loads}
    bare = {c: rps[("bare FastAPI", c)] for c in (1, 64)}
    packed = [rps[("MC T=1000, packed masks", c)] / rps[("MC T=1000", c)] for c in (1, 8, 64)]
    return (
        f"Measured by `make bench` ({machine}): at T = 100 on one row of a 16-256-256-1 MLP "
        f"the MC engine is {one.seconds['naive loop'] / one.seconds['engine']:.1f}x faster "
        f"than a naive Python loop and {one.seconds['peer'] / one.seconds['engine']:.1f}x "
        f"faster than torch-uncertainty's `MCDropout`; from T = 1000 on it runs within "
        f"{max(floor):.2f}x of its floor (the matrix products plus the mask draws). Over HTTP "
        f"one worker answers {rps[('eval predict', 1)]:.0f} one-row eval requests a second at "
        f"one client and {rps[('eval predict', 64)]:.0f} at 64 "
        f"({rps[('eval predict', 1)] / bare[1]:.2f}x and "
        f"{rps[('eval predict', 64)] / bare[64]:.2f}x a bare FastAPI app that only parses the "
        f"body); packed masks serve {min(packed):.2f}x to {max(packed):.2f}x the MC "
        f"requests a second of torch's masks at T = 1000."
    )


def headline_block(text: str) -> str:
    return f"{HEADLINE_START}\n{textwrap.fill(text, 92)}\n{HEADLINE_END}"


def replace_headline(path: Path, text: str) -> None:
    """Put the headline between the markers of ``path`` (the README)."""
    doc = path.read_text()
    start, end = doc.index(HEADLINE_START), doc.index(HEADLINE_END) + len(HEADLINE_END)
    path.write_text(doc[:start] + headline_block(text) + doc[end:])


def plot(cells: list[engine.Cell], path: Path) -> None:
    plt.switch_backend("Agg")  # files only, no display
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (model, rows) in zip(
        axes.flat, [(m, r) for m in engine.MODELS for r in engine.ROWS], strict=True
    ):
        for method in ENGINE_COLUMNS:
            pts = [
                (c.samples, c.seconds[method] * 1e3)
                for c in cells
                if (c.model, c.rows) == (model, rows) and method in c.seconds
            ]
            if pts:
                style = "-" if method.startswith(("engine", "floor")) else "--"
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=method)
        ax.set(
            xscale="log",
            yscale="log",
            title=f"{model}, B = {rows}",
            xlabel="T samples",
            ylabel="ms per call (median)",
        )
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("MC dropout in process: engine vs naive, peer (torch-uncertainty) and floor")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def request_path_section(rounds: int) -> str:
    """The eval request's time, piece by piece, in process (bench/request_path.py)."""
    command = [sys.executable, "request_path.py", "--rounds", str(rounds)]
    table = subprocess.run(
        command, cwd=ROOT / "bench", capture_output=True, text=True, check=True
    ).stdout
    return (
        "\n## Where an eval request's time goes\n\n"
        f"`python bench/request_path.py --rounds {rounds}` (from `bench/`): each app called "
        "in process through ASGI, no sockets and no load generator, with one one-row eval "
        "request of the concrete model, round-robin, median per request; one torch thread.\n"
        "A row's difference from another is the cost of what they differ by.\n\n"
        f"{table}\n"
    )


def kept_section(page: Path, start: str, end: str, heading: str) -> str:
    """A section another script wrote between ``start`` and ``end``, carried over from the
    current page under ``heading``."""
    old = page.read_text() if page.exists() else ""
    if start not in old:
        return ""
    body = old[old.index(start) + len(start) : old.index(end)]
    return f"\n{heading}\n{start}{body}{end}\n"


def kept_ab_section(page: Path) -> str:
    """The before/after section bench/ab.py wrote."""
    from ab import AB_END, AB_START

    return kept_section(page, AB_START, AB_END, AB_HEADING)


def kept_peers_section(page: Path) -> str:
    """The peer table bench/peers.py wrote (make bench-peers)."""
    from peers import END, START

    return kept_section(page, START, END, PEERS_HEADING) + PEERS_READING


PEERS_HEADING = """## Against LitServe, KServe and MLServer

`make bench-peers` installs each peer into its own virtual environment under `.peers/` and
runs `bench/peers.py`: the same model and requests through every server, side by side.
"""
PEERS_READING = """
How to read it: every server runs one process and takes the same one-row requests; the
service answers v1 and v2 from the same data plane, so its two columns differ by the
protocol's parsing only. Each peer computes MC as a user would write it (one pass over
`x.repeat(T, 1)` with dropout on); the service draws its masks per request from a seed, so
its answers replay, and still leads in every cell. The p99 of MLServer (computing on its
event loop, parallel workers off) and of KServe v1 at T = 1000 reach seconds at 64 clients,
as the service's did on uvloop (below).

What moved the cells: earlier, fewer calls per request, MC tiles kept on one thread where
spreading them cost more than it saved ("MC tiles over threads"), and an MC job whose
request is alone in the worker computing on the event loop (`DROPOUT_INLINE_ALONE_MAX_MACS`);
since, the calls that start cold taken out of a request ("Where a one-client request's time
goes"). The run before this one had MC T=100 at one client at 1.49x (1188 against 796): it
ran before the MC summaries moved to Python, and beside LitServe worker processes that an
earlier round had left running (`bench/peers.py` now stops each server's whole process
group). The margins at one client rest on per-request cost: the service and the peers draw
the same masks with the same torch kernel (about 7 ns a mask element here, most of an MC
T=1000 request), and on this shared 2-core machine a cell moves by a few percent between
runs (KServe v1's MC T=100 at one client measured 783 to 807 requests a second across
three runs of one day, 796 and 806 in the last two).

What bounds MC under concurrency: one core's event loop, where each request's parsing,
passes and answer run. An MC job small enough to compute on the loop costs less there than
the hand-over to a thread: with every job on the MC threads, MC T = 100 at 64 clients served
710 requests a second against 1210 on the loop, the GIL passing between the loop and the
thread at every torch call (a GIL switch interval of 0.2 or 0.05 ms instead of 5 only
brought the threads to 783 and 799, measured side by side with the access log off). Within
a request, the masks: drawn from one seeded stream, one element after another.
"""


def kept_mixed_section(page: Path) -> str:
    """The mixed-load table bench/mixed.py wrote."""
    from mixed import END, START

    return kept_section(page, START, END, MIXED_HEADING) + MIXED_READING


MIXED_HEADING = """## Mixed load: eval first

Production depends on the cheap eval request; uncertainty queries (MC) cost many passes.
While eval requests are being served, MC jobs take turns in a lane and compute at most
`DROPOUT_MC_SHARE` (0.25) of the time (`service/serving/priority.py`). `bench/mixed.py`
measures eval alone, then beside as many MC T=100 clients, on the commit before the lane
(b4359c5, where a small MC job only moved to the MC threads while an eval waited) and on
this checkout:
"""


MIXED_READING = """
How to read it: one event loop reads every connection in turn, so without the lane the
32 MC clients were answered as often as the 32 eval clients and eval waited behind MC (its
p50 about 6x its p50 alone). With the lane, MC computes one job at a time while eval is
served, each job's successor starting no sooner than its own time divided by the share, so
eval keeps most of the loop: the targets, eval's latency at most 2x and its throughput at
least half of alone, are **met** in the table above (p50 and p99 ratios, requests a second
ratio). MC still progresses, at about three quarters of its former rate in this run, its
latency bounded by its turn (no starvation either way). The share is a setting: 1 turns the
priority off, a larger share moves throughput back to MC.
"""


def kept_loops_section(page: Path) -> str:
    """The event-loop comparison bench/loops.py wrote."""
    from loops import END, START

    return kept_section(page, START, END, LOOPS_HEADING) + LOOPS_READING


LOOPS_HEADING = """## The tail at 64 clients: asyncio's loop, not uvloop

Small jobs (at most `DROPOUT_INLINE_MAX_MACS` multiply-adds, as MC T=100 on concrete is)
compute on the event loop: handing them to a thread costs more than they do. Under uvloop,
with 64 clients each sending its next request as soon as an answer comes, a few requests
(about 4%) waited close to a second before their handler ran, while the access log showed
every handler done within 2 ms. On asyncio's own loop, the same server serves every
connection in turn. `python bench/loops.py` runs both:
"""
LOOPS_READING = """
Same requests a second on both loops, within the noise of one run; at 64 clients on MC
T=100, uvloop's p99 is about twenty times its p50 and asyncio's about 1.05 times. What was
tried first: the access log, batching and the admission deadline made no difference (p99
still about 1 s with each off); computing every job on a thread
(`DROPOUT_INLINE_MAX_MACS=0`) removed the tail but cost about 40% of the MC requests a
second at 64 clients; one or two `await asyncio.sleep(0)` before each inline job cut the
p99 to 400 and 250 ms. The mechanism inside uvloop (libuv's order of I/O and ready
callbacks when every iteration computes) was not isolated; asyncio's loop removes the tail
at no measured cost, so the service runs on it (`uvicorn_options` in
`service/protocols/http/server.py`).
"""


AB_HEADING = """## Before and after: calls that start cold

`bench/ab.py` serves the shipped concrete model from a worktree of an earlier commit and from
this checkout, one uvicorn worker each, and measures them with wrk in turns. It is run by
hand for a change that must not cost speed; `make bench` keeps its last table.
"""


def script_output(script: str, *args: str) -> str:
    """What ``bench/<script>`` prints, run as its own process from the repository root."""
    command = [sys.executable, str(ROOT / "bench" / script), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def script_section(heading: str, intro: str, script: str, *args: str, reading: str) -> str:
    """A section of the page: ``heading``, ``intro``, what ``bench/<script> args`` prints
    (``script_output``), then ``reading``."""
    return f"\n## {heading}\n\n{intro}\n\n{script_output(script, *args)}{reading}"


def cold_section() -> str:
    """A small call right after other memory was read (bench/cold_calls.py), its own process."""
    return script_section(
        "Where a one-client request's time goes",
        "`python bench/cold_calls.py`: one add of 8 values through torch and through numpy, "
        "timed right after reading so many MiB of other memory, median of 2000 trials, one "
        "process.",
        "cold_calls.py",
        reading=COLD_READING,
    )


COLD_READING = """
How to read it: the in-process table above prices each piece of a request hot, its code
still in the caches from the round before. Served over HTTP to one client, the same request
cost the server about twice that CPU time (from `/proc/PID/stat` around a wrk run), and its
forward pass, 31 us in a loop, took 94 us among the rest of the request (timed inside the
server). Between two of its calls the event loop, uvicorn, pydantic and the service run
enough other code, and touch enough memory, that each distinct library call starts cold, as
the table shows for a single add once more than the core's 2 MiB of L2 cache was read in
between. So the last round counted calls rather than microseconds:

- access lines are formatted, and metric observations folded into prometheus_client,
  together every 50 ms (`service/serving/gather.py`; a scrape, or anything reading the
  registry, folds first), instead of about six locked updates, an orjson and a datetime
  call in every request;
- a small answer is checked for NaN and infinity in Python rather than with numpy
  (`dataplane.check_outputs`), and v2 flattens its rows in Python rather than through a
  numpy view and reshape;
- a few rows are standardised, and a regression target's transform undone, in Python,
  rounding to float32 after each operation as torch's kernels do, and the padded block is
  written into a fresh tensor in one copy: five torch calls fewer
  (`MLPEngine.predict_block`; the same bits, tested over float32's whole range on every
  kind of model);
- a few MC summaries (std, standard error, predictive variance, OOD scores and flags) are
  computed in Python rather than numpy (`outputs.mc_outputs`, the same bits): MC T=100 at
  one client 1430 to 1564 requests a second, interleaved, server on one core and wrk on
  the other (its CPU time per request 696 to 632 us).

Side by side ("Before and after" below): eval at one client 1.32x the requests a second of
the session's start (v1 2481 to 3275), the server's CPU time per request from about 410 us
to about 310 us. Tried and dropped, for no change beyond the noise in interleaved runs
(server pinned to one core, wrk to the other): one send per answer instead of two (headers
held for the body), one header-deadline timer per connection instead of one armed and
cancelled per request, and admission without its deadline timer (about 2%, short of paying
for a timer of our own).
"""


def throughput_section(seconds: int) -> str:
    """Dynamic batching on against off (bench/throughput.py), run as its own process."""
    return script_section(
        "Eval throughput: dynamic batching on against off",
        f"`python bench/throughput.py --seconds {seconds}` (also `make bench-throughput`): one "
        "uvicorn worker per mode, one-row eval requests from 1, 8 and 64 keep-alive clients.",
        "throughput.py",
        "--seconds",
        str(seconds),
        reading="\n",
    )


def tiles_section(seconds: float) -> str:
    """MC tiles in order against over the tile threads (bench/tiles.py), its own process."""
    return script_section(
        "MC tiles over threads",
        f"`python bench/tiles.py --seconds {seconds:g}`: one MC request in process, its tiles "
        "computed in order on one thread or spread over a pool of 2 tile threads (the "
        "service's `JobRunner.map_tiles`), median of up to 200 calls; requests of more than "
        "one tile. The last column is what the service does: it spreads tiles of at least "
        f"{MIN_SPREAD_TILE_MACS // 1_000_000} M multiply-adds (`jobs.MIN_SPREAD_TILE_MACS`).",
        "tiles.py",
        "--seconds",
        str(seconds),
        reading=TILES_READING,
    )


TILES_READING = """
How to read it: a chunk's masks come from one random stream, drawn on one thread before any
tile computes, and on the shipped models (100 and 128 wide) they are most of an MC request
(torch's `bernoulli_` spends about 7 ns a mask element here). Spreading only splits the
products, and each tile's dozen torch calls then pass the GIL between threads; for tiles
of 7 to 9 M multiply-adds (the shipped models) that costs more than the second core saves,
the 256-wide model's 17 M tiles come out about even (slower in two cells, faster in one),
and the 512-wide model's tiles carry 68 M multiply-adds each, where spreading pays.
"""


def adaptive_section() -> str:
    """Adaptive sampling against a fixed T (bench/adaptive.py), run as its own process."""
    text = script_output("adaptive.py")
    return f"\n## Adaptive sampling: target_se against a fixed T\n\n{text}{ADAPTIVE_READING}"


ADAPTIVE_READING = """
How to read it: a fixed T must serve the widest row, so every narrower row pays for passes
it does not need; with `target_se` each request stops at its own need (32 passes, then the
total doubling, so up to twice the minimum). Concrete's spread varies a lot from row to row
and adaptive requests take 5 to 9 times fewer passes than T* (pass counts, unlike times, are
the same in every run here); sine-gap's held-out rows all lie on the data with similar
spreads, so the saving is about 2 times and the doubling's overshoot eats part of it. One
request holding many rows stops when its worst row meets the target, so the saving is per
request, not per row. The fixed T* misses the target on 1 to 2% of sine-gap's rows because
T* comes from the 10 000-pass variance and a shorter run's estimate varies; adaptive answers
check their own estimate and meet it by construction.
"""


GRPC_START = "<!-- grpc: written by bench/grpc_rest.py --write -->"
GRPC_END = "<!-- /grpc -->"
GRPC_READING = """
How to read it: both doors call the same data plane, so the difference is the transport.
With one-row requests the tensors are a few dozen bytes and the per-call cost dominates:
grpc.aio's Python server costs about what the service's REST hot path does at one client,
and more under MC load at 8 and 64 clients (the ratio column), while its p99 stays closer to
its p50. Binary tensors save parsing in proportion to their size, which these requests do
not test. The load generator is an asyncio client on the same two cores as the server
(httpx for REST, grpc.aio for gRPC), so its own cost is in both columns.
"""


def grpc_section(seconds: int) -> str:
    """gRPC against REST v2 (bench/grpc_rest.py), run as its own process."""
    text = script_output("grpc_rest.py", "--seconds", str(seconds))
    return f"\n## gRPC against REST v2\n\n{GRPC_START}\n{text}{GRPC_END}\n{GRPC_READING}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (about 3 minutes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, header = time.perf_counter(), machine(args.threads, serving.load_tool())
    cells = engine.run(budget=0.25 if args.quick else 1.0)
    loads = serving.run(2 if args.quick else 10, args.threads)
    memory = serving.peak_memory(args.threads)
    png = args.out.with_suffix(".png")
    plot(cells, png)
    minutes = (time.perf_counter() - started) / 60
    load_end = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    command = "make bench" + (" BENCH_ARGS=--quick" if args.quick else "")
    head = headline(cells, loads, short_machine(args.threads))
    text = TEMPLATE.format(
        headline=headline_block(head),
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=header,
        load_end=load_end,
        minutes=minutes,
        command=command,
        commit=subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        or "unknown",
        engine_tables="\n".join(engine_tables(cells)),
        engine_targets="\n".join(engine_targets(cells)),
        serving_tables="\n".join(serving_tables(loads)),
        seconds=2 if args.quick else 10,
        png=png.name,
        rows=serving.MEMORY_ROWS,
        samples=serving.MEMORY_SAMPLES,
        before=memory["before_mib"],
        peak=memory["peak_mib"],
        growth=memory["peak_mib"] - memory["before_mib"],
        mem_seconds=memory["seconds"],
        bound=MEMORY_BOUND_MIB,
        mem_verdict="met"
        if memory["peak_mib"] - memory["before_mib"] < MEMORY_BOUND_MIB
        else "**not met**",
    )
    sections = request_path_section(100 if args.quick else 300)
    sections += cold_section()
    sections += throughput_section(2 if args.quick else 5)
    sections += tiles_section(0.5 if args.quick else 1.0)
    sections += adaptive_section()
    sections += grpc_section(2 if args.quick else 5)
    sections += kept_peers_section(args.out)
    sections += kept_loops_section(args.out)
    sections += kept_mixed_section(args.out)
    sections += kept_ab_section(args.out)
    args.out.write_text(text + sections + NOTES)
    replace_headline(ROOT / "README.md", head)
    print(f"wrote {args.out}, {png} and the README's headline in {minutes:.1f} min")


TEMPLATE = """# Benchmarks

Generated by `{command}` on {date} (commit {commit}) in {minutes:.1f} minutes.

Machine: {machine}; {load_end} at the end. Numbers below are medians of interleaved runs,
so the methods of one table row shared the same conditions; on a shared machine compare the
ratios, not the absolute times.

{headline}

![MC dropout timings](benchmarks.png)

## MC dropout engine, in process

MLPs with dropout p = 0.1 after each hidden layer, regression heads, random weights; every
method returns the mean and population variance over T passes for B rows.

- **naive loop**: `model.train()`, `torch.stack([model(x) for _ in range(T)])`, mean/var.
- **naive batched**: `model(x.repeat(T, 1))` in train mode, then mean/var.
- **peer**: torch-uncertainty's `mc_dropout(model, T, on_batch=True)` wrapper (its
  `_MCDropout` module, eval mode with the dropout layers kept on), then mean/var.
- **engine**: `MLPEngine.predict_mc` with packed masks (`DROPOUT_MC_MASK=packed`).
- **engine (torch masks)**: the same with `mask_mode="torch"`, torch's own `bernoulli_`
  (the service's default, faithful to `F.dropout` mask for mask).
- **floor**: every product after the first layer as one GEMM over T x B rows into a
  preallocated output, plus drawing the masks the cheapest exact way (packed); **floor
  GEMMs** is the products alone. Over 8192 rows the floor runs 8192 and scales linearly;
  masks are drawn in pieces of one engine chunk (2^21 values).

{engine_tables}
### Targets

{engine_targets}

## HTTP serving

One uvicorn worker (`dropout-service serve`, default settings but
`DROPOUT_TORCH_THREADS` set to the same thread count as above) on 127.0.0.1, the shipped
`concrete` model (8-100-100-1), one row per request; wrk with one thread and a Lua body
script, {seconds}-second closed-loop runs per concurrency level. The **bare FastAPI** app
(`bench/bare_app.py`) parses the same body with the service's pydantic schema and returns a
constant: the framework's floor. The load generator shares the 2 cores with the server.

{serving_tables}

## Memory

Peak RSS (VmHWM) of the server process for one MC request of {rows} rows and T = {samples}:
{before:.0f} MiB before, {peak:.0f} MiB peak (+{growth:.0f} MiB), answered in {mem_seconds:.1f} s.
Bound: growth under {bound} MiB: {mem_verdict}. The engine walks T in chunks of at most
2^21 activation values, so the growth does not depend on T.
"""

NOTES = """
## What the engine does, and what was removed from the request path

- The layers before the first dropout run once per request; the prefix `(B, d)` is
  broadcast over T without a copy (`expand`), and the first mask is multiplied into it in
  place, in the freshly drawn mask's own buffer.
- Masks are 0/1: inverted dropout's `1/(1-p)` is folded into the weights of the layer that
  reads the mask, once at load, which saves a pass over every mask. Activations run in place
  on the fresh `F.linear` output.
- The `engine` column draws masks in the **packed** mode (`DROPOUT_MC_MASK=packed`, opt-in):
  one random byte per element instead of a 64-bit mt19937 word (words from torch's
  generator, or from numpy's SFC64 stream for masks past 2^16 elements; masks under 2^14
  elements from torch's kernel), exact Bernoulli(1-p) at torch's 53-bit resolution (see the
  "MC dropout masks" in docs/operations.md); a mask of 2^20 elements costs about a tenth of
  `bernoulli_`'s. The
  `engine (torch masks)` column is the same engine with torch's `bernoulli_`, the service's
  default, which keeps DESIGN.md contract 3's mask-for-mask equality with `F.dropout`; the
  HTTP rows say which mode each ran, and the memory row runs the default.
- T is walked in chunks of at most 2^21 activation values (a pure function of the request
  shape, so seeds replay); summaries accumulate in float64 per chunk (Chan et al.; a single
  chunk in one `var_mean`), a cost proportional to the output width only.
- Request path (the table "Where an eval request's time goes" prices each piece):
  - **Jobs small enough run on the event loop.** A forward job of at most
    `DROPOUT_INLINE_MAX_MACS` multiply-adds (a 16-row eval block of concrete is 0.17 M, an
    MC request of T=100 on one row 1 M) runs on the loop: the hand-off to a pool thread and
    back costs more than the job. Larger ones go to a pool (eval jobs and MC jobs each to
    their own), so the loop is held for about 0.2 ms at most while other requests are in
    flight; an MC request alone in the worker computes on the loop up to
    `DROPOUT_INLINE_ALONE_MAX_MACS` (16 M, about 2 ms: MC T=1000 on concrete is 11 M), since
    nothing waits for the loop then and the hand-off costs a tenth of the job. Every pass computes
    on one intra-op thread wherever it runs, so no answer depends on the thread settings; a
    large MC request spreads its tiles over `DROPOUT_TORCH_THREADS` threads instead, when
    they hold enough work to pay for the hand-over ("MC tiles over threads" above).
  - **A hot path for v1 predict and v2 infer.** FastAPI's routing over every route,
    dependency solving, exception middleware and response model cost about as much as the
    bare app's whole request; `HotPath` (`service/protocols/http/hotpath.py`) answers
    well-formed predict, predict/mc and v2 infer requests before them, calling the functions
    the routes call on the same data plane, and passes everything else on, so error answers
    keep one source per protocol.
  - **orjson bodies**, written by the handlers themselves instead of a response model that
    validated each answer a second time.
  - **uvicorn with httptools and uvloop**: about twice the requests/s of h11 on asyncio's
    loop for the bare app and the service alike; it raises the bare app's floor as much as
    the service's throughput, so the ratios below got harder, not easier. (Later uvloop was
    dropped for asyncio's loop at the same requests/s, for its tail: see above; httptools
    stays, and carries the gain.)
  - **One observability middleware** (request id, Prometheus, access log) instead of two;
    memoised metric children; access lines built with orjson, without `logging`'s stack walk,
    and written to stdout in batches every 50 ms instead of one write and flush per request;
    since, the lines are formatted and the metric observations folded in at that time, all
    in a row ("Where a one-client request's time goes").
  - Earlier: `async` dependencies (no threadpool hop before the handler).
- **Subnormal weights dropped at load.** Weight decay left 155 of the concrete model's
  weights below float32's normal range; on this Xeon a 1000x100 by 100x100 product with them
  took 7.4 ms against 0.16 ms (AMD CPUs barely slow down), which had made every concrete
  request several times slower here. Their products lie some 30 orders of magnitude below
  the rest of each sum, so the answers keep their bits (tests/test_engine.py).
- Not tried: `torch.compile` (the work left is GEMMs and random numbers, which it does not
  fuse, and it would add compile time per shape).

## Where the remaining gaps come from

- **Engine against the naive loop at T = 100**: the targets ask for 30x (B = 1) and 5x
  (B = 32). The products alone (**floor GEMMs**) bound what any implementation can reach;
  where the targets table says "the floor allows" less than the target, no exact
  implementation of the same products can meet it on this machine (the wide model's
  512 x 512 products at 3200 rows take longer than a fifth of the naive loop).
- **Engine over the floor**: per dropout layer the engine also runs the activation and the
  mask multiply, two passes over T x B x width values that the floor does not make, plus
  about 20 torch calls per chunk; at T = 10 and B = 1 those calls (microseconds each) are
  most of the time, so the floor ratio is only a target from T = 1000 on.
- **HTTP eval over the bare app**: the hot path skips FastAPI's machinery (about
  the bare app's whole request, see "service through FastAPI" against "service" in the
  request-path table), but what is left costs more than FastAPI did. The padded forward
  pass is the largest piece: three products of a 16-row block, the smallest that keeps
  every row's bits at every position under MKL's AVX-512 and AVX2 kernels here (8 and,
  under AVX2, 32 do not; measured with `MKL_ENABLE_INSTRUCTIONS`), checked per model at
  load (`batching.choose_block`). On top come the request's bookkeeping: admission with
  its deadline, the batcher's test for a request alone on the loop, the input checks,
  the tensor conversion, the request id, and the metrics and access line, now gathered
  and done every 50 ms. At one client the server's event loop is busy the whole time, and
  its calls meet cold caches ("Where a one-client request's time goes"): the rounds of
  this issue took the server's CPU time per eval request from 540 us to about 310 us,
  against about 180 us for the bare app. What is left is the forward pass's products
  and activations and many small costs; no single piece is near the size of the ones
  taken out. Under load the batcher shares one pass among many requests and the ratio
  rises (the c = 64 row).
- **MC over the bare app**: MC requests add the engine time itself (three masks and two
  products over T rows), which at T = 1000 is most of the request.
- **One core per pass**: the engine tables give torch all cores (`--threads`), and the
  floor's products use them; the engine computes each tile on one core and spreads tiles
  over the tile threads, which is why its ratio to the floor grows with the product size
  (the 512-wide model at B = 32).
- **Shared machine**: the load generator runs on the same 2 cores as the server. The
  tables say how many threads ran, and the load average is in the header; read the HTTP
  ratios to about +-0.1 between runs.

## How to read and rerun

`make bench` installs the `bench` and `peers` extras and wrk (through apt-get when run as
root; otherwise the HTTP load comes from an asyncio httpx client, which saturates before the
server does) and regenerates this page and `benchmarks.png`. `make bench BENCH_ARGS=--quick`
takes shorter runs. The engine tables run with `torch.set_num_threads(cores)` (the engine
still computes each tile on one core); `--threads N` changes that.
"""


if __name__ == "__main__":
    main()
