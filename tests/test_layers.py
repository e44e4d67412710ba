"""The layers of DESIGN.md hold: core < settings < serving | offline < protocols < app < cli,
each importing only downwards, and nothing below the front doors imports an HTTP framework
(import-linter's contracts in pyproject.toml). The command line imports a command's modules
only when that command runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the ``service`` package found in ``tree``."""
    return subprocess.run(
        [str(LINT), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": str(LINT.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_layers() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 kept, 0 broken" in done.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "service", tmp_path / "service", ignore=shutil.ignore_patterns("data"))
    engine = tmp_path / "service" / "core" / "engine.py"
    engine.write_text(engine.read_text() + "\nfrom service.serving import dataplane  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "service.core.engine -> service.serving.dataplane" in done.stdout


def test_the_command_line_imports_no_framework_until_a_command_runs() -> None:
    code = (
        "import sys, service.cli\n"
        "service.cli.build_parser().format_help()\n"
        "heavy = {'torch', 'numpy', 'fastapi', 'uvicorn', 'prometheus_client', 'pydantic'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
    helped = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "service", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--workers" in helped.stdout
    assert " torch" not in helped.stderr  # -X importtime lists every module imported
