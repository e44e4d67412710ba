"""The soak test in short (bench/soak.py; `make soak` runs it for minutes): 64 concurrent
clients of mixed eval/MC traffic against a real server process, every answer checked
against the same request sent alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_soak_loses_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "bench/soak.py", "--duration", "12", "--warmup", "4", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    print(done.stdout)
    figures = json.loads(out.read_text())
    assert figures["clients"] == 64
    assert figures["answered"] == figures["requests"] > 64
    assert figures["5xx"] == 0
    assert figures["dropped"] == 0, figures["dropped_by_error"]
    assert figures["mismatched"] == 0
    assert figures["solo_answers_unchanged_after"]
    assert len(figures["by_kind"]) >= 8  # every kind of the mix was sent, gRPC too
    assert any(kind.startswith("gRPC") for kind in figures["by_kind"])
    assert figures["rss_growth_after_warmup"] < 0.10
    assert done.returncode == 0, done.stderr[-2000:]
