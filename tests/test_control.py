"""Live model control: Triton's repository extension through tritonclient, its token, and
reloads that swap atomically under load."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.settings import Settings
from tests.helpers import (
    LiveServer,
    live_server,
    random_tensors,
    serve,
    tiny_regression_config,
    tiny_tensors,
    write_model,
    write_test_repository,
)

TOKEN = "a-token-that-must-never-be-logged"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_test_repository(root)
    return root


@pytest.fixture
def server(repo: Path) -> Iterator[LiveServer]:
    with live_server(Settings(model_dir=repo, admin_token=TOKEN)) as s:
        yield s


@pytest.fixture
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)
    yield c
    c.close()


def status_of(call: Any) -> tuple[str | None, str]:
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value.status(), e.value.message()


def test_index_unload_and_load_with_tritonclient(
    client: triton.InferenceServerClient, server: LiveServer, repo: Path
) -> None:
    index = client.get_model_repository_index(headers=AUTH)
    assert [(m["name"], m["state"]) for m in index] == [
        ("clf", "READY"), ("deep", "READY"), ("tiny", "READY")
    ]  # fmt: skip
    client.unload_model("tiny", headers=AUTH)
    assert not client.is_model_ready("tiny")
    eval_ = {"inputs": [[1, 2]]}
    assert httpx.post(f"{server.url}/v1/models/tiny/predict", json=eval_).status_code == 404
    client.unload_model("tiny", headers=AUTH)  # not served: nothing to do
    unavailable = {m["name"]: m for m in client.get_model_repository_index(headers=AUTH)}
    assert unavailable["tiny"] == {"name": "tiny", "version": "", "state": "UNAVAILABLE",
                                   "reason": "not loaded"}  # fmt: skip
    ready_only = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}, headers=AUTH)
    assert [m["name"] for m in ready_only.json()] == ["clf", "deep"]
    client.load_model("tiny", headers=AUTH)
    assert client.is_model_ready("tiny")
    assert httpx.post(f"{server.url}/v1/models/tiny/predict", json=eval_).json()["outputs"] == [
        [6.5]
    ]
    # A folder added while serving is served once loaded.
    write_model(repo, tiny_regression_config(name="newcomer"), tiny_tensors())
    client.load_model("newcomer", headers=AUTH)
    assert client.is_model_ready("newcomer")
    assert status_of(lambda: client.load_model("nope", headers=AUTH))[0] == "404"
    assert status_of(lambda: client.unload_model("../tiny", headers=AUTH))[0] == "404"


def test_a_broken_folder_leaves_the_old_version_serving(
    client: triton.InferenceServerClient, server: LiveServer, repo: Path
) -> None:
    body = {"inputs": [[0.5, -1.0, 2.0, 0.25]], "n_samples": 50, "seed": 3}
    before = httpx.post(f"{server.url}/v1/models/deep/predict/mc", json=body).json()
    config = repo / "deep" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "sha256": "f" * 64}))
    status, message = status_of(lambda: client.load_model("deep", headers=AUTH))
    assert status == "400"
    assert "model 'deep' was not loaded: weights.safetensors: sha256" in message
    assert str(repo) not in message
    assert httpx.post(f"{server.url}/v1/models/deep/predict/mc", json=body).json() == before
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_control_needs_the_token_compares_it_and_never_logs_it(
    repo: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    calls = [
        ("/v2/repository/index", None),
        ("/v2/repository/models/tiny/load", None),
        ("/v2/repository/models/tiny/unload", None),
    ]
    with live_server(Settings(model_dir=repo)) as off:
        for path, _ in calls:
            r = httpx.post(off.url + path, headers=AUTH)
            assert r.status_code == 403
            assert "set DROPOUT_ADMIN_TOKEN" in r.json()["error"]
    with live_server(Settings(model_dir=repo, admin_token=TOKEN)) as on:
        for path, _ in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                r = httpx.post(on.url + path, headers=headers)
                assert r.status_code == 401
                assert r.headers["www-authenticate"] == "Bearer"
        predict = httpx.post(f"{on.url}/v1/models/tiny/predict", json={"inputs": [[1, 2]]})
        assert predict.status_code == 200  # predictions never need a token
        assert httpx.post(f"{on.url}/v2/repository/index", headers=AUTH).status_code == 200
    logged = caplog.text + capsys.readouterr().out
    assert "/v2/repository/index" in logged  # the access lines were there to look at
    assert TOKEN not in logged


def test_control_is_refused_with_several_workers(tmp_path: Path, repo: Path) -> None:
    env = {"DROPOUT_ADMIN_TOKEN": TOKEN}
    with serve(tmp_path / "log", "--workers", "2", "--models", str(repo), **env) as (_, url):
        r = httpx.post(f"{url}/v2/repository/models/tiny/load", headers=AUTH)
        assert r.status_code == 409
        assert "2 worker processes" in r.json()["error"]


def version_files(tmp_path: Path, seed: int) -> Path:
    """A 'swap' folder whose weights come from ``seed``, kept aside to copy in."""
    config = tiny_regression_config(name="swap", input_dim=4, hidden=[32], dropout=[0.2])
    write_model(tmp_path / f"v{seed}", config, random_tensors(config, seed=seed))
    return tmp_path / f"v{seed}" / "swap"


def put(version: Path, repo: Path) -> None:
    for name in ("weights.safetensors", "config.json"):
        shutil.copyfile(version / name, repo / "swap" / name)


def test_reloads_under_load_swap_atomically(tmp_path: Path, repo: Path) -> None:
    """8 clients send predictions during 20 reloads of their model: none fails, and every
    answer is the old or the new version's, all its rows from one of them."""
    versions = [version_files(tmp_path, 1), version_files(tmp_path, 2)]
    shutil.copytree(versions[0], repo / "swap")
    rows = [[0.5, -1.0, 2.0, 0.25], [3.0, 3.0, -3.0, 0.0], [0.1, 0.2, 0.3, 0.4]]
    eval_body = {"inputs": rows}
    mc_body = {"inputs": rows, "n_samples": 200, "seed": 9}

    with live_server(Settings(model_dir=repo, admin_token=TOKEN)) as s:
        expected: list[tuple[Any, Any]] = []
        for version in versions:  # each version's answers, alone
            put(version, repo)
            assert httpx.post(f"{s.url}/v2/repository/models/swap/load", headers=AUTH).is_success
            ev = httpx.post(f"{s.url}/v1/models/swap/predict", json=eval_body).json()["outputs"]
            mc = httpx.post(f"{s.url}/v1/models/swap/predict/mc", json=mc_body).json()["mean"]
            expected.append((ev, mc))
        assert expected[0] != expected[1]

        async def run() -> tuple[list[tuple[str, int, Any]], int]:
            answers: list[tuple[str, int, Any]] = []
            done = asyncio.Event()
            limits = httpx.Limits(max_connections=16)
            async with httpx.AsyncClient(base_url=s.url, timeout=60, limits=limits) as http:

                async def predictor(k: int) -> None:
                    while not done.is_set():
                        mc = k % 2 == 1
                        path = "/v1/models/swap/predict" + ("/mc" if mc else "")
                        r = await http.post(path, json=mc_body if mc else eval_body)
                        answers.append(("mc" if mc else "eval", r.status_code, r.json()))

                async def reloader() -> int:
                    loads = 0
                    for i in range(20):
                        put(versions[i % 2], repo)
                        r = await http.post("/v2/repository/models/swap/load", headers=AUTH)
                        assert r.status_code == 200, r.text
                        loads += 1
                        await asyncio.sleep(0.02)
                    done.set()
                    return loads

                tasks = [asyncio.create_task(predictor(k)) for k in range(8)]
                loads = await reloader()
                await asyncio.gather(*tasks)
            return answers, loads

        answers, loads = asyncio.run(run())
    assert loads == 20
    assert len(answers) > 40
    seen = set()
    for kind, status, body in answers:
        assert status == 200, body
        got = body["outputs"] if kind == "eval" else body["mean"]
        which = [i for i, (ev, mc) in enumerate(expected) if got == (ev if kind == "eval" else mc)]
        assert len(which) == 1, f"{kind} answer from neither version, or rows mixed: {got}"
        seen.add(which[0])
    assert seen == {0, 1}  # both versions answered: the swaps happened under load
