"""Every example of the README and of the API pages runs as written against the shipped
models, served as `make run` serves them, and prints what the page says it prints.

Pages show numbers printed on the machine that wrote them: another CPU kind may differ in
the last digits (DESIGN.md contract 6), so printed numbers are compared within a relative
1e-6, far above last-bit differences (about 1e-7 for float32) and far below what a changed
model, seed or parameter moves. Text, integers and the structure compare exactly. Answers to
the same request through v1, v2 and the Python client are compared with each other bit for
bit, within this run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import ROOT, free_port, serve

PAGES = ["README.md", "docs/api.md", "docs/operations.md"]
ADDRESS = "127.0.0.1:8000"  # where `make run` serves, as the pages say
GRPC_ADDRESS = "127.0.0.1:8001"  # and its gRPC front door
#: The shell finds dropout-service where this interpreter's environment keeps its scripts.
PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Example:
    page: str
    command: str  # shell command or Python source
    printed: list[str]  # what the page says it prints (empty: not shown)


WALKTHROUGH = re.compile(r"<!-- walkthrough:.*?-->(.*?)<!-- /walkthrough -->", re.DOTALL)


def blocks(page: str, language: str) -> list[str]:
    """The page's code blocks in ``language``, but those of its walkthrough."""
    text = WALKTHROUGH.sub("", (ROOT / page).read_text())
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def walkthrough() -> list[tuple[str, str]]:
    """The README walkthrough's blocks in order: (language, code)."""
    (section,) = WALKTHROUGH.findall((ROOT / "README.md").read_text())
    return re.findall(r"```(\w+)\n(.*?)```", section, re.DOTALL)


def shell_examples(page: str) -> list[Example]:
    """Each curl command of the page's sh blocks, with the comment lines right after it."""
    starts = ("curl ", "dropout-service predict ")  # not the long-running commands
    return [e for block in blocks(page, "sh") for e in shell_examples_of(block, page, starts)]


def shell_examples_of(
    block: str, page: str = "", starts: tuple[str, ...] = ("curl ", "dropout-service ")
) -> list[Example]:
    """The commands of one sh block that start with ``starts``, each with the comment lines
    right after it (what the page says it prints)."""
    examples = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith(starts):
            i += 1
            continue
        command = [lines[i]]
        while command[-1].endswith("\\"):
            i += 1
            command.append(lines[i])
        i += 1
        printed = []
        while i < len(lines) and lines[i].startswith("# "):
            printed.append(lines[i].removeprefix("# "))
            i += 1
        examples.append(Example(page, "\n".join(command), printed))
    return examples


def printed_after_prints(code: str) -> list[str]:
    """The comment line right after each ``print(``: what the page says it prints."""
    lines = code.splitlines()
    prints = [i for i, line in enumerate(lines) if line.lstrip().startswith("print(")]
    return [lines[i + 1].removeprefix("# ") for i in prints]


def python_examples(page: str) -> list[Example]:
    """Each Python block, with the comment line after each ``print(``."""
    examples = []
    for block in blocks(page, "python"):
        examples.append(Example(page, block, printed_after_prints(block)))
    return examples


def tokens(text: str) -> list[tuple[str, str]]:
    """Numbers, and the text between them without whitespace."""
    out, pos = [], 0
    for m in NUMBER.finditer(text):
        out += [("text", re.sub(r"\s+", "", text[pos : m.start()])), ("number", m.group())]
        pos = m.end()
    return [*out, ("text", re.sub(r"\s+", "", text[pos:]))]


def same_up_to_last_digits(page_says: str, printed: str) -> bool:
    expected, actual = tokens(page_says), tokens(printed)
    if [k for k, _ in expected] != [k for k, _ in actual]:
        return False
    for (kind, want), (_, got) in zip(expected, actual, strict=True):
        if kind == "text" or not re.search(r"[.eE]", want + got):
            if want != got:  # text and integers (seeds, counts, shapes): exactly
                return False
        elif not math.isclose(float(want), float(got), rel_tol=1e-6, abs_tol=1e-9):
            return False
    return True


def test_the_comparison_tolerates_last_digits_only() -> None:
    assert same_up_to_last_digits("[[72.32688729]] {'seed': 7}", "[[72.32688757]] {'seed': 7}")
    assert not same_up_to_last_digits("[[72.32688729]]", "[[72.3270]]")
    assert not same_up_to_last_digits("{'seed': 7}", "{'seed': 8}")
    assert not same_up_to_last_digits('{"a":[[1.5]]}', '{"b":[[1.5]]}')
    assert not same_up_to_last_digits("[[1.5]]", "[[1.5, 2.5]]")


SHELL = [e for page in PAGES for e in shell_examples(page)]
PYTHON = [e for page in PAGES for e in python_examples(page)]


def test_the_pages_hold_the_examples_this_test_expects() -> None:
    assert len(SHELL) >= 12
    assert len(PYTHON) == 3
    assert sum(bool(e.printed) for e in SHELL) >= 5


@dataclass(frozen=True)
class Served:
    """Where this run's server listens, for the addresses the pages name."""

    http: str
    grpc: str

    def localize(self, code: str) -> str:
        return code.replace(ADDRESS, self.http).replace(GRPC_ADDRESS, self.grpc)


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("readme") / "log"
    grpc_port = free_port()
    with serve(log, "--models", "models", "--grpc-port", str(grpc_port)) as (_, url):
        yield Served(url.removeprefix("http://"), f"127.0.0.1:{grpc_port}")


def run_shell(command: str, address: Served) -> str:
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {address.localize(command)}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": PATH},
    )
    assert done.returncode == 0, (command, done.stderr)
    return done.stdout


@pytest.mark.parametrize("example", SHELL, ids=[f"{e.page}:{i}" for i, e in enumerate(SHELL)])
def test_shell_example_runs_and_prints_what_the_page_says(
    example: Example, address: Served
) -> None:
    out = run_shell(example.command, address)
    assert out.strip(), example.command
    assert '"detail"' not in out
    assert '"error"' not in out
    if example.printed:
        assert same_up_to_last_digits("\n".join(example.printed), out), (out, example.printed)


def run_python(example: Example, address: Served) -> tuple[dict[str, Any], list[str]]:
    namespace: dict[str, Any] = {}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(address.localize(example.command), namespace)
    # Access lines of the suite's in-process servers are written in batches, maybe here.
    lines = [x for x in stdout.getvalue().splitlines() if not x.startswith('{"ts"')]
    return namespace, lines


@pytest.mark.parametrize("example", PYTHON, ids=[e.page for e in PYTHON])
def test_python_example_runs_and_prints_what_the_page_says(
    example: Example, address: Served
) -> None:
    _, printed = run_python(example, address)
    assert len(printed) == len(example.printed)
    for says, got in zip(example.printed, printed, strict=True):
        assert same_up_to_last_digits(says, got), (got, says)


def find(page: str, *words: str) -> Example:
    """The one example of ``page`` that shows its output and holds ``words``."""
    (found,) = [
        e for e in SHELL if e.page == page and e.printed and all(w in e.command for w in words)
    ]
    return found


def test_v1_v2_and_the_python_client_answer_the_same_bits(address: Served) -> None:
    """The README's eval and MC request, sent four ways in one run (v1, REST v2, the
    tritonclient.http example, and over gRPC)."""
    eval_v1 = json.loads(run_shell(find("README.md", "/predict ").command, address))
    mc_v1 = json.loads(
        run_shell(find("README.md", "/predict/mc", '"n_samples": 1000, "seed": 7').command, address)
    )
    v2 = json.loads(run_shell(find("README.md", "/v2/", '"seed": 7').command, address))
    mc_v2 = {o["name"]: o["data"] for o in v2["outputs"]}
    readme_http, readme_grpc = [e for e in PYTHON if e.page == "README.md"]
    namespace, _ = run_python(readme_http, address)
    over_grpc, _ = run_python(readme_grpc, address)

    assert namespace["result"].as_numpy("output").tobytes() == (
        np.float32(eval_v1["outputs"]).tobytes()
    )
    for name in ("mean", "std"):
        v1 = np.float64(mc_v1[name]).reshape(-1)
        assert v1.tobytes() == np.float64(mc_v2[name]).tobytes()
        assert v1.tobytes() == namespace["mc"].as_numpy(name).reshape(-1).tobytes()
        assert v1.tobytes() == over_grpc["mc"].as_numpy(name).reshape(-1).tobytes()


def test_the_walkthrough_serves_a_model_trained_in_pytorch(tmp_path: Path) -> None:
    """Train in PyTorch, save, import, load into the running service, ask with the client:
    the README's blocks in order, in an empty folder beside a server of its models/."""
    work = tmp_path / "work"
    shutil.copytree(ROOT / "models", work / "models")
    token = "walkthrough-token"
    env = {**os.environ, "DROPOUT_ADMIN_TOKEN": token, "PATH": PATH}
    steps = walkthrough()
    assert [language for language, _ in steps] == ["python", "sh", "python"]
    log = tmp_path / "log"
    with serve(log, "--models", str(work / "models"), DROPOUT_ADMIN_TOKEN=token) as (_, url):
        address = url.removeprefix("http://")
        for language, code in steps:
            code = code.replace(ADDRESS, address)
            if language == "python":
                lines = code.splitlines()
                says = [
                    lines[i + 1][2:] for i, x in enumerate(lines) if x.lstrip().startswith("print(")
                ]
                done = subprocess.run(
                    [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True
                )
                assert done.returncode == 0, done.stderr[-2000:]
                assert done.stdout.splitlines() == says
                continue
            for example in shell_examples_of(code):
                out = subprocess.run(
                    ["bash", "-c", example.command], cwd=work, env=env, capture_output=True,
                    text=True, timeout=120,
                )  # fmt: skip
                assert out.returncode == 0, (example.command, out.stderr)
                assert same_up_to_last_digits("\n".join(example.printed), out.stdout), out.stdout
    assert (work / "model.safetensors").is_file()
    assert (work / "models" / "mine" / "config.json").is_file()
