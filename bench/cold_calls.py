"""What one small torch or numpy call costs once other work has pushed it out of the caches.

A served request runs a little of many libraries (uvicorn, pydantic, the service, torch,
orjson): by the time it reaches a torch call, that call's code and data may no longer be in
the CPU's caches. This times the same call (an 8-value add) right after reading N MiB of
other memory, median of many trials, in one process: with N past the core's L2 cache the
call costs several times what a benchmark loop that repeats it shows. It is why the service
keeps the distinct calls of a one-row request few (docs/benchmarks.md, "Where a one-client
request's time goes").

Run: python bench/cold_calls.py [--trials 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

MIB = 1 << 20


def median_us(call: Callable[[], object], between: Callable[[], object], trials: int) -> float:
    times = []
    for _ in range(trials):
        between()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.rand(1, 8)
    a = x.numpy()
    memory = np.ones(16 * MIB, np.uint8)
    print("| read between two calls | torch.add, us | numpy.add, us |")
    print("|---|---|---|")
    for mib in (0, 1, 4, 16):

        def between(n: int = mib * MIB) -> object:
            return memory[:n].sum() if n else None

        t = median_us(lambda: torch.add(x, 1.0), between, args.trials)
        n = median_us(lambda: np.add(a, 1.0), between, args.trials)
        print(f"| {mib} MiB | {t:.1f} | {n:.1f} |")


if __name__ == "__main__":
    main()
