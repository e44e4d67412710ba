"""Damaged model folders, served side by side with a good one through a live server.

Each damaged folder must be refused at load with one log line naming the folder, the file
and the reason; /readyz must report it (503 under the default policy) without leaking a file
path; the good model must keep answering; and nothing in a model file is ever executed.
Unit-level refusals of single folders are in tests/test_repository.py.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from service.core.repository import sha256_of
from service.settings import Settings
from tests.helpers import (
    is_loaded,
    live_server,
    poll_readyz,
    serve,
    tiny_regression_config,
    tiny_tensors,
    write_model,
)

Damage = Callable[[Path], None]


class Tripwire:
    """Unpickling this creates ``path``: proof that a model file's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.path),))  # type: ignore[return-value]


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def replace_weights(folder: Path, data: bytes) -> None:
    """New weights with a matching sha256: the format check is the one that must refuse them."""
    (folder / "weights.safetensors").write_bytes(data)
    edit_config(folder, sha256=sha256_of(folder / "weights.safetensors"))


def truncate(folder: Path) -> None:
    replace_weights(folder, (folder / "weights.safetensors").read_bytes()[:100])


def wrong_shapes(folder: Path) -> None:
    wide = tiny_regression_config(name=folder.name, hidden=[5])
    write_model(folder.parent, wide, {k: torch.ones(s) for k, s in wide.weight_shapes().items()})
    edit_config(folder, hidden=[3])


def drop_field(name: str) -> Damage:
    def damage(folder: Path) -> None:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        del config[name]
        path.write_text(json.dumps(config))

    return damage


def pickle_weights(folder: Path) -> None:
    replace_weights(folder, pickle.dumps(Tripwire(folder / "PICKLE_RAN")))


def torch_save_weights(folder: Path) -> None:
    path = folder / "weights.safetensors"
    torch.save({"linear0.weight": Tripwire(folder / "TORCH_PICKLE_RAN")}, path)
    edit_config(folder, sha256=sha256_of(path))


#: folder name -> (damage, what the log line and /readyz must say)
DAMAGES: dict[str, tuple[Damage, str]] = {
    "bad-sha": (lambda f: edit_config(f, sha256="a" * 64), "weights.safetensors: sha256"),
    "truncated": (truncate, "weights.safetensors: not a valid safetensors file"),
    "wrong-shapes": (wrong_shapes, "weights.safetensors: tensor linear0.weight has shape (5, 2)"),
    "no-config": (lambda f: (f / "config.json").unlink(), "config.json: No such file"),
    "config-not-json": (
        lambda f: (f / "config.json").write_text("{"),
        "config.json: (root): Invalid JSON",
    ),
    "config-no-sha": (drop_field("sha256"), "config.json: sha256: Field required"),
    "config-bad-field": (
        lambda f: edit_config(f, input_dim=-2),
        "config.json: input_dim: Input should be greater than 0",
    ),
    "no-weights": (
        lambda f: (f / "weights.safetensors").unlink(),
        "weights.safetensors: file missing",
    ),
    "pickle": (pickle_weights, "weights.safetensors: not a valid safetensors file"),
    "torch-pickle": (torch_save_weights, "weights.safetensors: not a valid safetensors file"),
}


@pytest.fixture(scope="module")
def damaged_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("damaged")
    write_model(root, tiny_regression_config(), tiny_tensors())
    for name, (damage, _) in DAMAGES.items():
        write_model(root, tiny_regression_config(name=name), tiny_tensors())
        damage(root / name)
    return root


def test_every_damaged_model_is_refused_logged_and_reported(
    damaged_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="service.core.repository")
    with live_server(Settings(model_dir=damaged_root), wait_ready=False) as s:
        r = poll_readyz(s.url, is_loaded)
        good = httpx.post(f"{s.url}/v1/models/tiny/predict", json={"inputs": [[1, 2]]})
        refused = httpx.post(f"{s.url}/v1/models/pickle/predict", json={"inputs": [[1, 2]]})

    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "not ready"
    assert body["models"] == ["tiny"]
    assert set(body["failed"]) == set(DAMAGES)
    assert str(damaged_root) not in r.text
    assert "Traceback" not in r.text
    lines = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]
    for name, (_, reason) in DAMAGES.items():
        assert reason in body["failed"][name], (name, body["failed"][name])
        assert any(
            line.startswith(f"refused model {name}: ") and reason in line for line in lines
        ), name
    assert good.json()["outputs"] == [[6.5]]
    assert refused.status_code == 404
    assert "served models: tiny" in refused.json()["detail"]
    assert not list(damaged_root.rglob("*_RAN"))  # no code from a model file ran


def test_partial_ready_policy_serves_the_good_model(damaged_root: Path) -> None:
    settings = Settings(model_dir=damaged_root, allow_partial_ready=True)
    with live_server(settings) as s:
        body = httpx.get(f"{s.url}/readyz").json()
        assert body["status"] == "ready"
        assert set(body["failed"]) == set(DAMAGES)
        r = httpx.post(f"{s.url}/v1/models/tiny/predict/mc", json={"inputs": [[1, 2]], "seed": 1})
        assert r.status_code == 200
    assert not list(damaged_root.rglob("*_RAN"))


def unreadable_weights(folder: Path) -> None:
    """A weights path that exists as a file but fails every read (EIO), even for root."""
    path = folder / "weights.safetensors"
    path.unlink()
    path.symlink_to("/proc/self/mem")


def test_a_folder_failing_in_an_unforeseen_way_is_refused_and_the_rest_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(tmp_path, tiny_regression_config(), tiny_tensors())
    write_model(tmp_path, tiny_regression_config(name="unreadable"), tiny_tensors())
    unreadable_weights(tmp_path / "unreadable")
    caplog.set_level(logging.ERROR, logger="service.core.repository")
    with live_server(Settings(model_dir=tmp_path), wait_ready=False) as s:
        r = poll_readyz(s.url, is_loaded, timeout=20)
        good = httpx.post(f"{s.url}/v1/models/tiny/predict", json={"inputs": [[1, 2]]})
    assert r.status_code == 503
    assert r.json()["models"] == ["tiny"]
    assert "weights.safetensors" in r.json()["failed"]["unreadable"]
    assert any(rec.getMessage().startswith("refused model unreadable: ") for rec in caplog.records)
    assert good.json()["outputs"] == [[6.5]]


def test_changing_the_files_of_a_served_model_changes_no_answer(tmp_path: Path) -> None:
    """Tensors are the process's own once loaded: overwriting the weights with others, then
    truncating the file (as a copy or `train --out` over a served folder does first) must
    neither change an answer nor stop the server. A separate process: a SIGBUS would kill it."""
    root = tmp_path / "models"
    write_model(root, tiny_regression_config(), tiny_tensors())
    weights = root / "tiny" / "weights.safetensors"
    body = {"inputs": [[1, 2], [3, -4]], "n_samples": 50, "seed": 9}
    with serve(tmp_path / "log", "--models", str(root)) as (proc, url):
        before = httpx.post(f"{url}/v1/models/tiny/predict/mc", json=body).json()
        other = {k: v * 3 + 1 for k, v in tiny_tensors().items()}
        write_model(tmp_path / "elsewhere", tiny_regression_config(), other)
        weights.write_bytes((tmp_path / "elsewhere" / "tiny" / "weights.safetensors").read_bytes())
        assert httpx.post(f"{url}/v1/models/tiny/predict/mc", json=body).json() == before
        with weights.open("r+b") as f:
            f.truncate(0)
        after = httpx.post(f"{url}/v1/models/tiny/predict/mc", json=body)
        assert proc.poll() is None, (tmp_path / "log").read_text()[-2000:]
        assert after.json() == before
        eval_ = httpx.post(f"{url}/v1/models/tiny/predict", json={"inputs": [[1, 2]]}).json()
        assert eval_["outputs"] == [[6.5]]
