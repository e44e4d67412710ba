"""Single-client latency of eval against MC dropout: in process and over HTTP.

Starts `python -m service serve` on a free loopback port with the shipped models, sends
sequential requests with one keep-alive client, and prints a Markdown table of medians and
p99s. Usage: python bench/latency.py [--model concrete] [--repeats 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from service.repository import load_model

ROOT = Path(__file__).resolve().parents[1]
ROW = [540.0, 0.0, 0.0, 162.0, 2.5, 1040.0, 676.0, 28.0]
CASES = [("eval", None), ("MC T=100", 100), ("MC T=1000", 1000), ("MC T=10000", 10_000)]


def quantiles(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, int(0.99 * len(ms)))]


def repeats_for(t: int | None, repeats: int) -> int:
    return max(10, repeats // 10) if t and t >= 10_000 else repeats


def in_process(model: str, repeats: int) -> dict[str, list[float]]:
    engine = load_model(ROOT / "models" / model).engine
    x = torch.tensor([ROW[: engine.config.input_dim]])
    out: dict[str, list[float]] = {}
    for name, t in CASES:
        times = []
        for i in range(repeats_for(t, repeats) + 5):
            start = time.perf_counter()
            engine.predict(x) if t is None else engine.predict_mc(x, t, seed=i)
            times.append(time.perf_counter() - start)
        out[name] = times[5:]
    return out


def over_http(model: str, repeats: int) -> dict[str, list[float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DROPOUT_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), "--models", "models"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(300):
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            out: dict[str, list[float]] = {}
            for name, t in CASES:
                path = f"/v1/models/{model}/predict" + ("" if t is None else "/mc")
                times = []
                for i in range(repeats_for(t, repeats) + 5):
                    body: dict[str, object] = {"inputs": [ROW]}
                    if t is not None:
                        body |= {"n_samples": t, "seed": i}
                    start = time.perf_counter()
                    r = client.post(path, json=body)
                    times.append(time.perf_counter() - start)
                    r.raise_for_status()
                out[name] = times[5:]
            return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="concrete")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    engine = in_process(args.model, args.repeats)
    http = over_http(args.model, args.repeats)
    eval_e, eval_h = quantiles(engine["eval"])[0], quantiles(http["eval"])[0]
    print(
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model}, 1 row."
    )
    print()
    print(
        "| request | engine p50 (ms) | engine p99 | HTTP p50 (ms) | HTTP p99 "
        "| engine / eval | HTTP / eval |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, _ in CASES:
        (e50, e99), (h50, h99) = quantiles(engine[name]), quantiles(http[name])
        print(
            f"| {name} | {e50:.3f} | {e99:.3f} | {h50:.3f} | {h99:.3f} | "
            f"{e50 / eval_e:.1f}x | {h50 / eval_h:.1f}x |"
        )


if __name__ == "__main__":
    main()
