"""How many CPUs this process may use: its affinity, capped by a cgroup CPU quota.

``os.cpu_count()`` is the host's count: a container limited to 2 CPUs on a 64-core host sees
64, and a service sizing its thread pools from that oversubscribes its quota by 32 times.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on, at most its cgroup's CPU quota rounded up; at least 1."""
    if hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS, Windows
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc_cgroup, cgroup_root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(proc_cgroup: Path, cgroup_root: Path) -> float | None:
    """The tightest CPU quota, in CPUs, on this process's cgroup or an ancestor (cgroup v2's
    ``cpu.max`` or v1's ``cpu.cfs_quota_us``); None when there is none or no cgroups."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:  # cgroup v2, the unified hierarchy
            quotas += (q for d in _up(cgroup_root, path) if (q := _v2(d)) is not None)
        elif "cpu" in controllers.split(","):  # cgroup v1, the cpu controller's hierarchy
            base = cgroup_root / controllers
            base = base if base.is_dir() else cgroup_root / "cpu"
            quotas += (q for d in _up(base, path) if (q := _v1(d)) is not None)
    return min(quotas, default=None)


def _up(base: Path, path: str) -> Iterator[Path]:
    """The process's cgroup folder under ``base`` and its ancestors up to ``base``. Inside a
    container the path may name a folder of the host's tree; those that do not exist here
    are skipped, and ``base`` (the container's own cgroup) is always read."""
    folder = base / path.lstrip("/")
    while folder != base and base in folder.parents:
        yield folder
        folder = folder.parent
    yield base


def _v2(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
