"""Adaptive sampling (``target_se``) against a fixed T that reaches the same worst-case error.

For each shipped regression model, its own held-out rows are sent one row per request, as a
client would: with ``target_se`` each row stops when its own MC standard error
``sqrt(variance / T)`` is at most the target (32 passes, then the total doubling, up to
10 000); a fixed T must be large enough for the widest row, ``T* = max over rows of
variance / target**2`` (the variance from 10 000 passes). The table gives the mean passes
and the mean time per request of both, and the share of rows whose answer met the target.
Targets are set from each model's median MC std, so that the median row needs about 25,
100 and 400 passes. One torch thread, the engine's own MC path (no HTTP).

    python bench/adaptive.py            # prints the Markdown section
    python bench/adaptive.py --write    # and replaces it in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.core.engine import MLPEngine
from service.core.repository import load_model
from service.offline.datasets import UCIDataset
from service.offline.demos import sine_gap_data

ROOT = Path(__file__).resolve().parents[1]
CAP = 10_000
#: Each target is the model's median MC std over sqrt(k): the median row needs about k passes.
PASSES_AT_MEDIAN = (25, 100, 400)
ADAPTIVE_START = "<!-- adaptive: written by bench/adaptive.py --write -->"
ADAPTIVE_END = "<!-- /adaptive -->"


@dataclass(frozen=True)
class Row:
    model: str
    rows: int
    target: float
    fixed_t: int
    adaptive_passes: float
    adaptive_ms: float
    fixed_ms: float
    adaptive_met: float
    fixed_met: float


def held_out_rows(name: str) -> np.ndarray:
    """The model's own held-out rows: concrete's published test split 0, sine-gap's first
    fifth (the rows its trainer held out)."""
    if name == "concrete":
        return UCIDataset.load("concrete").split(0).x_test
    x, _ = sine_gap_data(0)
    return x[: len(x) // 5]


def timed(
    engine: MLPEngine, x: torch.Tensor, n: int, target: float | None
) -> tuple[float, int, float]:
    """(ms, passes, worst standard error) of one request."""
    start = time.perf_counter()
    result = engine.predict_mc(x, n, 7, target_se=target)
    ms = (time.perf_counter() - start) * 1e3
    se = float((result.variance / result.n_samples).sqrt().max())
    return ms, result.n_samples, se


def measure(name: str) -> list[Row]:
    engine = load_model(ROOT / "models" / name).engine
    x = torch.as_tensor(held_out_rows(name), dtype=torch.float32)
    variance = engine.predict_mc(x, CAP, 1).variance.max(1).values.numpy()  # widest output
    median_std = float(np.median(np.sqrt(variance)))
    out = []
    for k in PASSES_AT_MEDIAN:
        target = median_std / math.sqrt(k)
        fixed_t = min(CAP, max(2, math.ceil(float(variance.max()) / target**2)))
        adaptive = [timed(engine, x[i : i + 1], CAP, target) for i in range(len(x))]
        fixed = [timed(engine, x[i : i + 1], fixed_t, None) for i in range(len(x))]
        out.append(
            Row(
                model=name,
                rows=len(x),
                target=target,
                fixed_t=fixed_t,
                adaptive_passes=statistics.fmean(a[1] for a in adaptive),
                adaptive_ms=statistics.fmean(a[0] for a in adaptive),
                fixed_ms=statistics.fmean(f[0] for f in fixed),
                adaptive_met=statistics.fmean(a[2] <= target for a in adaptive),
                fixed_met=statistics.fmean(f[2] <= target for f in fixed),
            )
        )
    return out


def table(rows: list[Row]) -> str:
    lines = [
        "| model | held-out rows | target_se | passes, adaptive (mean) | fixed T* | "
        "ms per request, adaptive | ms, fixed T* | time saved | met the target: adaptive | "
        "fixed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        saved = 1 - r.adaptive_ms / r.fixed_ms
        lines.append(
            f"| {r.model} | {r.rows} | {r.target:.3g} | {r.adaptive_passes:.0f} | {r.fixed_t} "
            f"| {r.adaptive_ms:.2f} | {r.fixed_ms:.2f} | {saved:.0%} | {r.adaptive_met:.0%} "
            f"| {r.fixed_met:.0%} |"
        )
    return "\n".join(lines)


def section(rows: list[Row]) -> str:
    return (
        f"{ADAPTIVE_START}\n"
        "`python bench/adaptive.py` (also part of `make bench`): each held-out row sent alone "
        "with `target_se`, against the fixed T* that meets the target on the widest row; one "
        f"torch thread, {torch.backends.cpu.get_cpu_capability()}.\n\n"
        f"{table(rows)}\n"
        f"{ADAPTIVE_END}"
    )


def write(page: Path, text: str) -> None:
    old = page.read_text()
    if ADAPTIVE_START in old:
        head, rest = old.split(ADAPTIVE_START, 1)
        tail = rest.split(ADAPTIVE_END, 1)[1]
        page.write_text(head + text + tail)
    else:
        page.write_text(old.rstrip("\n") + "\n\n## Adaptive sampling\n\n" + text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["concrete", "sine-gap"])
    parser.add_argument("--write", action="store_true", help="into docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [r for name in args.models for r in measure(name)]
    text = section(rows)
    print(text)
    if args.write:
        write(ROOT / "docs" / "benchmarks.md", text)


if __name__ == "__main__":
    main()
