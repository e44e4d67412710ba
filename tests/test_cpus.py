"""Thread pools are sized from the CPUs a process may use: a container's cgroup quota, not
the host's core count (fake cgroup trees, as a container and a host would show them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.core.cpus import available_cpus, cgroup_cpu_quota
from service.settings import Settings


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_in_a_container(tmp_path: Path) -> None:
    proc = write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", "150000 100000\n")  # 1.5 CPUs
    assert cgroup_cpu_quota(proc, tmp_path / "cg") == 1.5
    assert available_cpus(proc, tmp_path / "cg") == min(affinity(), 2)


def test_cgroup_v2_tightest_quota_on_the_path_wins(tmp_path: Path) -> None:
    proc = write(tmp_path / "proc", "0::/kubepods/pod1/box\n")
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "kubepods" / "cpu.max", "800000 100000\n")
    write(tmp_path / "cg" / "kubepods" / "pod1" / "cpu.max", "100000 100000\n")
    write(tmp_path / "cg" / "kubepods" / "pod1" / "box" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(proc, tmp_path / "cg") == 1.0
    assert available_cpus(proc, tmp_path / "cg") == 1


def test_cgroup_v1_quota_with_a_host_path_inside_the_container(tmp_path: Path) -> None:
    proc = write(tmp_path / "proc", "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "cpu.cfs_quota_us", "200000\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(proc, tmp_path / "cg") == 2.0


@pytest.mark.parametrize(
    "files",
    [
        {"proc": "0::/\n", "cg/cpu.max": "max 100000\n"},  # v2, no limit
        {"proc": "1:cpu:/\n", "cg/cpu/cpu.cfs_quota_us": "-1\n", "cg/cpu/cpu.cfs_period_us": "1"},
        {"proc": "0::/\n"},  # no cpu.max at all
    ],
)
def test_no_quota_leaves_the_affinity(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        write(tmp_path / name, text)
    assert cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") is None
    assert available_cpus(tmp_path / "proc", tmp_path / "cg") == affinity()


def test_no_cgroups_at_all(tmp_path: Path) -> None:
    assert available_cpus(tmp_path / "absent", tmp_path / "absent") == affinity()


def test_settings_share_the_usable_cpus_among_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.settings.available_cpus", lambda: 2)
    # torch_threads=None: the default, whatever DROPOUT_TORCH_THREADS this run has.
    assert Settings(workers=1, torch_threads=None).intra_op_threads() == 2
    assert Settings(workers=2, torch_threads=None).intra_op_threads() == 1
    assert Settings(workers=4, torch_threads=None).intra_op_threads() == 1
    assert Settings(workers=1, torch_threads=3).intra_op_threads() == 3
