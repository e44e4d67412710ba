"""The README's tritonclient example runs as written against the shipped model, and prints
what the README says it prints."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.settings import Settings
from tests.helpers import live_server

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Open Inference Protocol") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python example in the README's v2 section"
    return match.group(1)


def printed_comments(code: str) -> list[str]:
    """The ``# ...`` line right after each ``print(...)``: what the README promises."""
    lines = code.splitlines()
    return [
        lines[i + 1].removeprefix("# ") for i, line in enumerate(lines) if line.startswith("print(")
    ]


def test_readme_tritonclient_example(capsys: pytest.CaptureFixture[str]) -> None:
    code = readme_example()
    assert '"127.0.0.1:8000"' in code  # as `make run` serves it
    settings = Settings(model_dir=ROOT / "models", torch_threads=1, access_log=False)
    with live_server(settings) as server:
        ns: dict[str, Any] = {}
        exec(code.replace("127.0.0.1:8000", server.url.removeprefix("http://")), ns)
        row = ns["x"].tolist()
        v1 = httpx.post(f"{server.url}/v1/models/concrete/predict", json={"inputs": row}).json()
        mc = httpx.post(
            f"{server.url}/v1/models/concrete/predict/mc",
            json={"inputs": row, "n_samples": 1000, "seed": 7},
        ).json()
    assert ns["result"].as_numpy("output").tobytes() == np.float32(v1["outputs"]).tobytes()
    assert ns["mc"].as_numpy("mean").tobytes() == np.float64(mc["mean"]).tobytes()
    # Access lines of the suite's other servers are written in batches and may land here.
    printed = [x for x in capsys.readouterr().out.splitlines() if not x.startswith('{"ts"')]
    assert printed == printed_comments(code)
