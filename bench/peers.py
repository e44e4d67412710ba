"""The service against the servers a user would otherwise pick, side by side in one run.

LitServe, KServe and MLServer (versions in bench/peers/requirements.txt) are installed each
into its own virtual environment under .peers/ (`make bench-peers` does it) and serve the
shipped concrete model (8-100-100-1) loaded as a plain nn.Sequential the way each one's docs
show (bench/peers/), with MC dropout written as a user would: train(), x.repeat(T, 1), mean
and variance. Every server runs one process on 127.0.0.1 with its defaults; all of them are
up for the whole run and take turns, idle when not measured. wrk (one thread) sends one-row
requests from 1, 8 and 64 keep-alive clients: eval, MC T=100 and MC T=1000; ours on v1 and
on REST v2 (JSON), KServe on its v1 and v2, LitServe and MLServer on their own. Each cell
runs `--seconds` per round; rounds go through the servers in turn (the order rotates), and
the table shows each cell's median round.

    python bench/peers.py                       # prints the Markdown section
    python bench/peers.py --write               # and replaces it in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import serving  # noqa: E402

PEERS = ROOT / ".peers"
APPS = ROOT / "bench" / "peers"
START = "<!-- peers: written by bench/peers.py --write -->"
END = "<!-- /peers -->"
ROW = serving.ROW
CLIENTS = (1, 8, 64)
KINDS = {"eval": None, "MC T=100": 100, "MC T=1000": 1000}


@dataclass(frozen=True)
class Target:
    """One server and protocol: how to start it, and the path and body of each request."""

    name: str
    server: str  # targets of one server share its process

    def request(self, n_samples: int | None) -> tuple[str, dict[str, object]]:
        mc = n_samples is not None
        if self.name == "ours v1":
            body: dict[str, object] = {"inputs": [ROW]}
            if mc:
                body |= {"n_samples": n_samples, "seed": 7}
            return "/v1/models/concrete/predict" + ("/mc" if mc else ""), body
        if self.name in ("ours v2", "KServe v2", "MLServer v2"):
            tensor = {"name": "input", "shape": [1, 8], "datatype": "FP32", "data": ROW}
            body = {"inputs": [tensor]}
            if mc:
                body["parameters"] = {"n_samples": n_samples} | (
                    {"seed": 7} if self.name == "ours v2" else {}
                )
            return "/v2/models/concrete/infer", body
        if self.name == "LitServe":
            body = {"inputs": [ROW]} | ({"n_samples": n_samples} if mc else {})
            return "/predict", body
        if self.name == "KServe v1":
            body = {"instances": [ROW]} | ({"parameters": {"n_samples": n_samples}} if mc else {})
            return "/v1/models/concrete:predict", body
        raise ValueError(self.name)


TARGETS = [
    Target("ours v1", "ours"),
    Target("ours v2", "ours"),
    Target("LitServe", "litserve"),
    Target("KServe v1", "kserve"),
    Target("KServe v2", "kserve"),
    Target("MLServer v2", "mlserver"),
]


def versions() -> dict[str, str]:
    pins = (APPS / "requirements.txt").read_text().splitlines()
    return dict(p.split("==") for p in pins if "==" in p and not p.startswith("#"))


@contextmanager
def started(server: str) -> Iterator[str]:
    """A server of the concrete model on a free loopback port; its URL."""
    port = serving.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DROPOUT_", "PYTHON"))}
    if server == "ours":
        env |= {"DROPOUT_GRPC_PORT": "0", "DROPOUT_LOG_LEVEL": "warning"}
        cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), "--models", "models"]
        cwd, probe = ROOT, "/readyz"
    else:
        python = str(PEERS / server / "bin" / "python")
        if not Path(python).exists():
            raise SystemExit(f"{python} is missing: run make bench-peers (it installs the peers)")
        cwd = APPS
        if server == "litserve":
            cmd, probe = [python, "litserve_app.py", str(port)], "/health"
        elif server == "kserve":
            grpc = serving.free_port()
            cmd, probe = [python, "kserve_app.py", str(port), str(grpc)], "/v2/health/ready"
        else:
            env |= {
                "MLSERVER_HTTP_PORT": str(port),
                "MLSERVER_GRPC_PORT": str(serving.free_port()),
                "MLSERVER_METRICS_PORT": str(serving.free_port()),
                "MLSERVER_LOGGING_LEVEL": "WARNING",
                # Inference in the server process, as every other server here: MLServer's
                # separate inference worker (its default) dies at start with this uvloop.
                "MLSERVER_PARALLEL_WORKERS": "0",
            }
            cmd = [str(PEERS / server / "bin" / "mlserver"), "start", str(APPS / "mlserver")]
            probe = "/v2/models/concrete/ready"
    log = open(f"/tmp/peer-{server}.log", "wb")  # noqa: SIM115
    # Its own process group: LitServe's workers outlive a stopped parent, and kept the CPU
    # busy through the rest of a run, unless the whole group is stopped.
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        serving.wait_ready(url + probe, proc, f"{server} (see /tmp/peer-{server}.log)", 180)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def check(url: str, target: Target) -> None:
    """Every target answers every request kind with a 200 before it is measured."""
    for n_samples in KINDS.values():
        path, body = target.request(n_samples)
        for _ in range(10):  # and warms up
            r = httpx.post(url + path, json=body, timeout=60)
            if r.status_code != 200:
                raise RuntimeError(f"{target.name} {path}: {r.status_code} {r.text[:300]}")


Cells = dict[tuple[str, str, int], list[serving.Load]]


def run(seconds: float, rounds: int) -> Cells:
    cells: Cells = {}
    with ExitStack() as stack:
        urls = {
            s: stack.enter_context(started(s)) for s in dict.fromkeys(t.server for t in TARGETS)
        }
        for t in TARGETS:
            check(urls[t.server], t)
        for r in range(rounds):
            order = TARGETS[r % len(TARGETS) :] + TARGETS[: r % len(TARGETS)]
            for kind, n_samples in KINDS.items():
                for clients in CLIENTS:
                    for t in order:
                        path, body = t.request(n_samples)
                        load = serving.with_wrk(urls[t.server] + path, body, clients, seconds)
                        cells.setdefault((kind, t.name, clients), []).append(load)
                        said = (
                            f"{load.rps:.0f} req/s, p99 {load.p99_ms:.1f} ms, {load.errors} errors"
                        )
                        print(f"round {r} {kind} {clients} {t.name}: {said}", file=sys.stderr)
    return cells


def median(loads: list[serving.Load]) -> serving.Load:
    ordered = sorted(loads, key=lambda x: x.rps)
    return ordered[(len(ordered) - 1) // 2]


def medians(cells: Cells, kind: str, clients: int) -> dict[str, serving.Load]:
    """Each target's median round in one cell, by target name."""
    return {t.name: median(cells[(kind, t.name, clients)]) for t in TARGETS}


def lead(loads: dict[str, serving.Load]) -> float:
    """Ours best over the best peer, in requests a second."""
    ours = max(x.rps for n, x in loads.items() if n.startswith("ours"))
    return ours / max(x.rps for n, x in loads.items() if not n.startswith("ours"))


def table(cells: Cells, seconds: float, rounds: int) -> str:
    pins = versions()
    names = [t.name for t in TARGETS]
    lines = [
        f"`python bench/peers.py --seconds {seconds:g} --rounds {rounds}` "
        f"({serving.machine_line()}; wrk -t1; LitServe {pins['litserve']}, KServe "
        f"{pins['kserve']}, MLServer {pins['mlserver']}): requests/s, median of {rounds} "
        "interleaved rounds, then p50 / p99 latency in ms, and errors (non-2xx or socket).",
        "",
        "| request | clients | " + " | ".join(names) + " | ours best / best peer |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for kind in KINDS:
        for clients in CLIENTS:
            loads = medians(cells, kind, clients)
            row = " | ".join(f"{loads[n].rps:.0f}" for n in names)
            lines.append(f"| {kind} | {clients} | {row} | {lead(loads):.2f}x |")
    lines += ["", "| request | clients | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]  # fmt: skip
    for kind in KINDS:
        for clients in CLIENTS:
            loads = medians(cells, kind, clients)
            row = " | ".join(
                f"{loads[n].p50_ms:.1f} / {loads[n].p99_ms:.1f}"
                + (f" ({loads[n].errors} err)" if loads[n].errors else "")
                for n in names
            )
            lines.append(f"| {kind} | {clients} | {row} |")
    return "\n".join(lines) + "\n\n" + textwrap.fill(standing(cells), 92) + "\n"


#: The issue's targets: ours at least this many times the best peer in every cell, and at
#: 64 clients a p99 at most this many times the p50 on every endpoint of ours.
TARGET_RATIO, TAIL_RATIO = 1.5, 3.0


def standing(cells: Cells) -> str:
    """Where this run's table stands against the targets, cell by cell."""
    met, missed, tails = [], [], []
    for kind in KINDS:
        for clients in CLIENTS:
            loads = medians(cells, kind, clients)
            ratio = lead(loads)
            (met if ratio >= TARGET_RATIO else missed).append(f"{kind} at {clients}: {ratio:.2f}x")
            if clients == max(CLIENTS):
                tails += [x.p99_ms / x.p50_ms for n, x in loads.items() if n.startswith("ours")]
    cells_said = f"met in {len(met)} of {len(met) + len(missed)}" + (
        f" ({'; '.join(met)})" if met else ""
    )
    if missed:
        cells_said += f", not met in {len(missed)} ({'; '.join(missed)})"
    tail_verdict = "met" if max(tails) <= TAIL_RATIO else "**not met**"
    return (
        f"Where the targets stand (this run): at least {TARGET_RATIO:g}x the best peer in "
        f"every cell is {cells_said}. p99 at most {TAIL_RATIO:g}x p50 at {max(CLIENTS)} "
        f"clients on every endpoint of ours: {tail_verdict} (at most {max(tails):.1f}x)."
    )


HEADLINE_START = "<!-- peers-headline: written by bench/peers.py --write -->"
HEADLINE_END = "<!-- /peers-headline -->"


def headline(cells: Cells) -> str:
    """The README's sentence on the peers, from this run's table."""
    ratios = [lead(medians(cells, kind, clients)) for kind in KINDS for clients in CLIENTS]
    pins = versions()
    return (
        f"Against the servers you would otherwise pick (`make bench-peers`, "
        f"{time.strftime('%Y-%m-%d')}, {serving.machine_line()}): on the shipped concrete "
        f"model one worker answers {min(ratios):.2f}x to {max(ratios):.2f}x the requests a "
        f"second of the best of LitServe {pins['litserve']}, KServe {pins['kserve']} and "
        f"MLServer {pins['mlserver']} in each of the {len(ratios)} cells (eval, MC T = 100 and "
        f"T = 1000 at 1, 8 and 64 clients)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="replace the docs section")
    args = parser.parse_args()
    cells = run(args.seconds, args.rounds)
    text = table(cells, args.seconds, args.rounds)
    print(text)
    if args.write:
        serving.replace_section(ROOT / "docs" / "benchmarks.md", START, END, text)
        sentence = textwrap.fill(headline(cells), 92)
        serving.replace_section(ROOT / "README.md", HEADLINE_START, HEADLINE_END, sentence)


if __name__ == "__main__":
    main()
