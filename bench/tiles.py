"""MC tiles over threads: when spreading one request's tiles pays (jobs.MIN_SPREAD_TILE_MACS).

An MC chunk draws all its masks on one thread first (one random stream per request), then
computes its tiles: in order on the job's thread, or spread over the tile pool. This times
both, in process, for the shipped models and bench/engine.py's wider ones, on requests of
more than one tile, and says which the service picks: tiles of at least
``MIN_SPREAD_TILE_MACS`` multiply-adds go to the pool.

    python bench/tiles.py            # prints the Markdown table (about a minute)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from engine import MODELS, config_for, random_weights  # noqa: E402

from service.core.engine import MLPEngine  # noqa: E402
from service.core.repository import load_model  # noqa: E402
from service.serving.jobs import MIN_SPREAD_TILE_MACS, JobRunner  # noqa: E402

SHIPPED = ("concrete", "digits", "sine-gap")
CELLS = ((1, 1000), (32, 100), (32, 1000))  # (rows, T): each more than one tile


def engines() -> dict[str, MLPEngine]:
    found = {name: load_model(ROOT / "models" / name).engine for name in SHIPPED}
    for name in MODELS:
        config = config_for(name)
        found[name] = MLPEngine(config, random_weights(config))
    return found


def median_ms(fn: Callable[[], object], budget_s: float) -> float:
    fn()  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(budget_s: float, threads: int) -> list[str]:
    torch.set_num_threads(1)
    jobs = JobRunner(inline_max_macs=0, inference_threads=1, tile_threads=threads)
    lines = [
        f"| model | rows | T | tiles | M multiply-adds a tile | in order, ms | over {threads} "
        "threads, ms | in order / spread | the service |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    try:
        for name, mlp in engines().items():
            for rows, n in CELLS:
                tile = mlp.tile_size(rows, n)
                if tile >= n:
                    continue
                x = torch.randn(rows, mlp.config.input_dim)
                alone = median_ms(functools.partial(mlp.predict_mc, x, n, 7), budget_s)
                spread = median_ms(
                    functools.partial(mlp.predict_mc, x, n, 7, map_tiles=jobs.map_tiles),
                    budget_s,
                )
                macs = mlp.tile_macs(rows, n)
                picks = "spreads" if macs >= MIN_SPREAD_TILE_MACS else "in order"
                lines.append(
                    f"| {name} | {rows} | {n} | {-(-n // tile)} | {macs / 1e6:.1f} | "
                    f"{alone:.2f} | {spread:.2f} | {alone / spread:.2f}x | {picks} |"
                )
    finally:
        jobs.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per cell")
    parser.add_argument("--threads", type=int, default=2, help="tile threads")
    args = parser.parse_args()
    print("\n".join(run(args.seconds, args.threads)))


if __name__ == "__main__":
    main()
