"""The production image, checked without a Docker engine.

hadolint lints the Dockerfile. Then the image is replayed: the build stage's commands run
verbatim on a copy of the build context (as .dockerignore filters it); the wheel goes into a
fresh virtual environment with constraints.txt, as the runtime stage installs it; the
runtime's ENV, entrypoint and health check run as written, from another directory, as
PID 1 of its own PID namespace (where, as in a container, the kernel delivers SIGTERM only if
the process handles it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from service.core.repository import load_model
from tests.dockerfile import DockerIgnore, Stage, parse
from tests.helpers import every_worker_ready, free_port, is_ready, poll_readyz

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = parse(ROOT / "Dockerfile")
BUILD, RUNTIME = STAGES["build"], STAGES["runtime"]
IGNORE = DockerIgnore(ROOT / ".dockerignore")
CONCRETE_ROW = [540.0, 0.0, 0.0, 162.0, 2.5, 1040.0, 676.0, 28.0]
WORKERS = 2  # more than the image's default, to see DROPOUT_WORKERS honoured


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_passes_on_the_dockerfile() -> None:
    done = hadolint(ROOT / "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_ignores_are_justified() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore" in line:
            why = lines[n - 1] if n else ""
            assert why.startswith("#"), f"line {n + 1}: an ignored rule needs a reason above"
            assert "hadolint" not in why, f"line {n + 1}: an ignored rule needs a reason above"


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD dropout-service serve\n")
    done = hadolint(bad)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):  # :latest, unpinned, cache, shell CMD
        assert rule in done.stdout


def test_dockerignore_keeps_only_what_the_image_needs() -> None:
    for kept in (
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "service/app.py",
        "service/data/uci/concrete/data.txt",
        "models/concrete/config.json",
    ):
        assert not IGNORE.excluded(kept), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_api.py",
        "docs/deploy.md",
        "bench/latency.py",
        "deploy/kubernetes/deployment.yaml",
        "build/lib/x.py",
        "service/__pycache__/app.cpython-311.pyc",
        ".pytest_cache/v/x",
        "dropout_service.egg-info/PKG-INFO",
        "reports/x.png",
    ):
        assert IGNORE.excluded(dropped), dropped


def test_runtime_stage_is_hardened() -> None:
    user = RUNTIME.one("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot check it"
    assert int(uid) != 0
    env = RUNTIME.env()
    assert env["DROPOUT_HOST"] == "0.0.0.0"  # reachable through the container's port mapping
    assert RUNTIME.one("EXPOSE").split() == [env["DROPOUT_PORT"], env["DROPOUT_GRPC_PORT"]]
    assert Path(env["DROPOUT_MODEL_DIR"]).is_absolute()
    assert env["PIP_NO_CACHE_DIR"] == "1"
    install = " ".join(RUNTIME.all("RUN"))
    # torch alone from the CPU-only index, never PyPI's CUDA build
    assert RUNTIME.one("ARG").startswith("TORCH_INDEX_URL=")
    assert RUNTIME.one("ARG").endswith("/cpu")
    assert '--no-deps --index-url "$TORCH_INDEX_URL"' in install
    assert install.count("-c /tmp/constraints.txt") == 2
    for keyword in ("ENTRYPOINT", "HEALTHCHECK"):
        RUNTIME.exec_form(keyword)  # exec form, or this raises


@pytest.mark.parametrize("target", ["run", "test"])
def test_make_and_the_dockerfile_honour_one_torch_index_knob(tmp_path: Path, target: str) -> None:
    """TORCH_INDEX_URL: a make variable (or environment variable) and the Dockerfile's build
    argument of the same name; unset, make installs from the machine's own indexes."""

    def pip_lines(*variables: str) -> list[str]:
        dry = subprocess.run(
            ["make", "-n", target, f"VENV={tmp_path / 'venv'}", *variables],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line for line in dry.splitlines() if " -m pip install " in line]

    chosen = pip_lines("TORCH_INDEX_URL=https://example.org/whl/cpu")
    assert chosen
    assert all("--extra-index-url https://example.org/whl/cpu" in line for line in chosen)
    assert all("-c constraints.txt" in line for line in chosen)
    assert not any("index-url" in line for line in pip_lines())
    assert RUNTIME.one("ARG").partition("=")[0] == "TORCH_INDEX_URL"


# -- the replayed image -------------------------------------------------------------------


def build_mount_source() -> str:
    """Where the runtime stage mounts the build stage's wheels from."""
    for run in RUNTIME.all("RUN"):
        for flag in run.split():
            if flag.startswith("--mount=") and "from=build" in flag:
                return dict(kv.split("=", 1) for kv in flag[8:].split(","))["source"]
    raise AssertionError("the runtime stage mounts nothing from the build stage")


@dataclass
class Image:
    """A replayed image: a root folder standing for ``/`` and the venv inside it."""

    root: Path

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    @property
    def bin(self) -> Path:
        return self.path("/opt/venv/bin")

    def wheels(self) -> list[Path]:
        return sorted(self.path(build_mount_source()).glob("*.whl"))

    def env(self, **overrides: str) -> dict[str, str]:
        """The runtime stage's ENV, paths mapped into the root, and a clean environment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DROPOUT_", "PYTHON"))}
        env.update({k: v for k, v in RUNTIME.env().items() if k != "PATH"})
        env["DROPOUT_MODEL_DIR"] = str(self.path(env["DROPOUT_MODEL_DIR"]))
        env["PATH"] = f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}"
        env["HOME"] = "/nonexistent"  # the image's user has no home
        env.update(overrides)
        return env


def copy_in(context_rel: str, dest: Path) -> None:
    """COPY from the build context, minus what .dockerignore drops."""
    src = ROOT / context_rel
    if src.is_file():
        assert not IGNORE.excluded(context_rel), f"COPY {context_rel}: excluded by .dockerignore"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        return
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and not IGNORE.excluded(rel):
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def replay_copies_and_runs(stage: Stage, image: Image, env: dict[str, str], run: bool) -> None:
    """WORKDIR, COPY (from the context) and, if ``run``, RUN: each as Docker would."""
    workdir = "/"
    for ins in stage.instructions:
        if ins.keyword == "WORKDIR":
            workdir = os.path.join(workdir, ins.args)
            image.path(workdir).mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            *sources, dest = ins.args.split()
            assert not any(s.startswith("--") for s in sources), "COPY flags are not replayed"
            target = image.path(os.path.join(workdir, dest))
            for source in sources:
                into_dir = len(sources) > 1 or dest.endswith(("/", "."))
                copy_in(source, target / Path(source).name if into_dir else target)
        elif ins.keyword == "RUN" and run:
            subprocess.run(
                ["sh", "-c", ins.args], cwd=image.path(workdir), env=env, check=True, timeout=300
            )


def pip(image: Image, *args: str) -> None:
    subprocess.run(
        [str(image.bin / "python"), "-m", "pip", "install", "-q", "--no-cache-dir", *args],
        check=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    # Not pytest's tmp_path, which keeps the last runs: this venv holds torch (about 600 MB).
    root = Path(tempfile.mkdtemp(prefix="dropout-image-"))
    image = Image(root)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(image.path("/opt/venv"))], check=True)
        # Build stage, verbatim; its `python` is the fresh venv's Python 3.
        replay_copies_and_runs(BUILD, image, image.env(), run=True)
        # Runtime stage: the same two installs under constraints.txt. torch comes from this
        # machine's pip configuration (the local CPU wheel, as for `make`) instead of the
        # CPU index that CI cannot reach.
        constraints = str(ROOT / "constraints.txt")
        pip(image, "--no-deps", "-c", constraints, "torch")
        pip(image, "-c", constraints, *map(str, image.wheels()))
        replay_copies_and_runs(RUNTIME, image, image.env(), run=False)
        yield image
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_build_stage_makes_one_wheel_with_the_package_data(image: Image) -> None:
    (wheel,) = image.wheels()
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "service" / "data").rglob("*")
        if p.is_file() and not IGNORE.excluded(p.relative_to(ROOT).as_posix())
    }
    assert "service/data/uci/concrete/data.txt" in data
    assert data <= names, sorted(data - names)[:5]
    assert not any(n.startswith(("tests/", "models/")) for n in names)


def test_installed_wheel_works_outside_the_source_tree(image: Image) -> None:
    probe = (
        "import service, torch; from service.offline.datasets import UCIDataset; "
        "print(service.__file__); print(torch.version.cuda); "
        "print(UCIDataset.load('concrete').x.shape)"
    )
    out = subprocess.run(
        [str(image.bin / "python"), "-c", probe],
        cwd=image.root,
        env=image.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    assert Path(out[0]).is_relative_to(image.path("/opt/venv")), out[0]
    assert out[1] == "None", "a CUDA build of torch was installed"
    assert out[2] == "(1030, 8)"  # the shipped UCI data, read from the installed package


def pid1_wrapper() -> list[str]:
    """Run a command as PID 1 of a new PID namespace (in a user namespace unless root)."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--pid", "--fork", "--kill-child", "--"]


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


@dataclass
class Container:
    proc: subprocess.Popen[bytes]
    pid1: int  # the server, as this machine sees it
    url: str
    port: int
    grpc_port: int


@pytest.fixture(scope="module")
def container(image: Image) -> Iterator[Container]:
    port, grpc_port = free_port(), free_port()
    env = image.env(
        DROPOUT_HOST="127.0.0.1",
        DROPOUT_PORT=str(port),
        DROPOUT_GRPC_PORT=str(grpc_port),
        DROPOUT_WORKERS=str(WORKERS),
    )
    proc = subprocess.Popen(
        [*pid1_wrapper(), *RUNTIME.exec_form("ENTRYPOINT")],
        cwd=image.root,  # "/", not the WORKDIR: the model path must not depend on it
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not children(proc.pid):
            assert proc.poll() is None, "unshare failed"
            assert time.monotonic() < deadline, "unshare did not fork"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        box = Container(proc, children(proc.pid)[0], url, port, grpc_port)
        poll_readyz(box.url, is_ready, timeout=240, proc=proc)  # two workers import torch
        every_worker_ready(box.url)
        yield box
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.slow
def test_entrypoint_serves_as_pid1_with_the_configured_workers(container: Container) -> None:
    status = Path(f"/proc/{container.pid1}/status").read_text()
    nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()
    assert nspid[-1] == "1", nspid
    workers = [
        c
        for c in children(container.pid1)
        if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
    ]
    assert len(workers) == WORKERS  # DROPOUT_WORKERS was honoured


@pytest.mark.slow
def test_entrypoint_answers_like_the_source_tree(container: Container) -> None:
    r = httpx.post(
        f"{container.url}/v1/models/concrete/predict", json={"inputs": [CONCRETE_ROW]}, timeout=30
    )
    assert r.status_code == 200, r.text
    model = load_model(ROOT / "models" / "concrete")
    expected = model.engine.predict(torch.tensor([CONCRETE_ROW])).tolist()
    assert r.json()["version"] == model.config.version
    (row,) = r.json()["outputs"]
    assert row == pytest.approx(expected[0], rel=1e-6)


@pytest.mark.slow
def test_entrypoint_answers_grpc_with_two_workers_on_one_port(container: Container) -> None:
    """Both workers listen on the one gRPC port (the kernel spreads connections); fresh
    clients get the REST answer's bits whichever worker they reach."""
    import numpy as np
    import tritonclient.grpc as tg

    x = np.array([CONCRETE_ROW], dtype=np.float32)
    rest = httpx.post(
        f"{container.url}/v1/models/concrete/predict", json={"inputs": x.tolist()}, timeout=30
    ).json()["outputs"]
    for _ in range(8):  # fresh connections
        with tg.InferenceServerClient(f"127.0.0.1:{container.grpc_port}") as c:
            assert c.is_server_ready()
            tensor = tg.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            assert c.infer("concrete", [tensor]).as_numpy("output").tolist() == rest


@pytest.mark.slow
def test_healthcheck_command_passes_live_and_fails_dead(image: Image, container: Container) -> None:
    check = RUNTIME.exec_form("HEALTHCHECK")

    def run(port: int) -> int:
        env = image.env(DROPOUT_PORT=str(port))
        return subprocess.run(check, env=env, capture_output=True, timeout=30).returncode

    assert run(container.port) == 0
    assert run(free_port()) != 0


@pytest.mark.slow
def test_sigterm_to_pid1_shuts_down_gracefully(container: Container) -> None:
    os.kill(container.pid1, signal.SIGTERM)
    code = container.proc.wait(timeout=60)
    assert container.proc.stdout is not None
    log = container.proc.stdout.read().decode()
    assert code == 0, log[-2000:]
    assert "Finished server process" in log or "Stopping parent process" in log, log[-2000:]
