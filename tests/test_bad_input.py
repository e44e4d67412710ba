"""The bad-input battery: one table row per kind of bad request, sent over real HTTP.

Every row must get its documented 4xx with a JSON error that names the problem (the field
for a 422, a sentence for the others), carry no stack trace or file path, come back well
inside the client's timeout (a hang guard, not a speed target), and leave the service
answering a normal request correctly. Add a row to cover a new endpoint or a new way to fail.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch

from service.core.errors import InvalidInput
from service.serving.dataplane import SMALL_OUTPUT_VALUES, check_outputs
from tests.helpers import LiveServer, grpc_infer_request

PREDICT = "/v1/models/tiny/predict"
MC = "/v1/models/tiny/predict/mc"
GOOD = {"inputs": [[1.0, 2.0]]}
GOOD_ANSWER = {"model": "tiny", "version": "3", "outputs": [[6.5]]}
MC_BODY = {"inputs": [[1.0, 2.0]], "n_samples": 20, "seed": 42}
#: The session server's limits (tests/conftest.py); the body limit is the default 8 MiB.
MAX_ROWS, MAX_N_SAMPLES = 64, 5000
HANG_GUARD_S = 120  # generous: the slowest row parses a 6 MB body on a shared machine
MB = 1 << 20


@dataclass(frozen=True)
class Bad:
    id: str
    status: int
    says: str  # must appear in the error message (case-insensitive)
    loc: list[str | int] | None = None  # 422: the field the error must name
    body: Any = None  # sent as JSON unless ``raw`` is given
    raw: bytes | None = None
    path: str = PREDICT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    streamed: bool = False  # send ``raw`` chunked, without Content-Length


def raw_inputs(*values: str) -> bytes:
    return f'{{"inputs": [[{", ".join(values)}]]}}'.encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


TEXT = {"content-type": "text/plain"}

BATTERY = [
    # -- not JSON, or not sent as JSON ---------------------------------------------------
    Bad("not-json", 422, "JSON decode error: expecting", ["body", 1], raw=b"{not json"),
    Bad("truncated-json", 422, "JSON decode error", raw=b'{"inputs": [[1.0, 2'),
    Bad("not-utf8", 422, "not UTF-8", ["body"], raw=b'{"inputs": [[1.0, 2.0]], "x": "\xff"}'),
    Bad("utf16", 422, "not UTF-8", ["body"], raw=json.dumps(GOOD).encode("utf-16")),
    Bad("text-plain", 422, "Content-Type: application/json", ["body"], GOOD, headers=TEXT),
    Bad("no-content-type", 422, "Content-Type: application/json", ["body"], GOOD, headers={}),
    Bad("empty-body", 422, "field required", ["body"], raw=b""),
    Bad("json-null", 422, "valid dictionary", ["body"], raw=b"null"),
    Bad("json-array", 422, "valid dictionary", ["body"], raw=b"[[1.0, 2.0]]"),
    # -- inputs of the wrong shape -------------------------------------------------------
    Bad("no-inputs", 422, "field required", ["body", "inputs"], {}),
    Bad("empty-inputs", 422, "at least 1", ["body", "inputs"], {"inputs": []}),
    Bad("empty-row", 422, "expects 2", ["body", "inputs", 0], {"inputs": [[]]}),
    Bad("ragged-rows", 422, "row 1 has 1 values", ["body", "inputs", 1], {"inputs": [[1, 2], [1]]}),
    Bad("wrong-width", 422, "expects 2", ["body", "inputs", 0], {"inputs": [[1.0, 2.0, 3.0]]}),
    Bad("flat-inputs", 422, "valid list", ["body", "inputs", 0], {"inputs": [1.0, 2.0]}),
    Bad("inputs-object", 422, "valid list", ["body", "inputs"], {"inputs": {"a": 1}}),
    Bad("row-nested", 422, "valid number", ["body", "inputs", 0, 1], {"inputs": [[1.0, [2.0]]]}),
    Bad("too-many-rows", 422, "exceed the maximum", ["body", "inputs"], {"inputs": [[1, 2]] * 65}),
    Bad(
        "a-million-rows",
        422,
        f"1000000 rows exceed the maximum of {MAX_ROWS}",
        ["body", "inputs"],
        raw=b'{"inputs":[' + b"[0,0]," * (10**6 - 1) + b"[0,0]]}",
    ),
    # -- values that are not finite numbers ----------------------------------------------
    Bad("string", 422, "valid number", ["body", "inputs", 0, 1], {"inputs": [[1.0, "2"]]}),
    Bad("boolean", 422, "valid number", ["body", "inputs", 0, 0], {"inputs": [[True, 1.0]]}),
    Bad("null", 422, "valid number", ["body", "inputs", 0, 1], {"inputs": [[1.0, None]]}),
    Bad("nan", 422, "finite number", ["body", "inputs", 0, 1], raw=raw_inputs("1.0", "NaN")),
    Bad("inf", 422, "finite number", ["body", "inputs", 0, 1], raw=raw_inputs("1", "Infinity")),
    Bad("-inf", 422, "finite number", ["body", "inputs", 0, 0], raw=raw_inputs("-Infinity", "1")),
    Bad(
        "beyond-float32",
        422,
        "within float32 range",
        ["body", "inputs", 0],
        {"inputs": [[1.0, 1e39]]},
    ),
    Bad(
        "beyond-float64",
        422,
        "finite number",
        ["body", "inputs", 0, 1],
        raw=raw_inputs("1", "1e400"),
    ),
    Bad("5000-digits", 422, "could not be parsed", ["body"], raw=raw_inputs("1" * 5000, "1")),
    # -- MC parameters out of range ------------------------------------------------------
    *(
        Bad(
            f"n_samples={v!r}",
            422,
            says,
            ["body", "n_samples"],
            {**MC_BODY, "n_samples": v},
            path=MC,
        )
        for v, says in [
            (0, "greater than or equal to 2"),
            (1, "greater than or equal to 2"),
            (MAX_N_SAMPLES + 1, f"n_samples must be in [2, {MAX_N_SAMPLES}]"),
            (-5, "greater than or equal to 2"),
            (2.5, "valid integer"),
            (10.0, "valid integer"),
            ("10", "valid integer"),
            (True, "valid integer"),
            (10**30, "n_samples must be in"),
        ]
    ),
    *(
        Bad(f"seed={v!r}", 422, says, ["body", "seed"], {**MC_BODY, "seed": v}, path=MC)
        for v, says in [
            (-1, "greater than or equal to 0"),
            (2**63, "less than or equal to 9223372036854775807"),
            (2**64, "less than or equal to"),
            ("7", "valid integer"),
            (1.5, "valid integer"),
            ([7], "valid integer"),
        ]
    ),
    Bad(
        "return_samples-string",
        422,
        "valid boolean",
        ["body", "return_samples"],
        {**MC_BODY, "return_samples": "yes"},
        path=MC,
    ),
    Bad(
        "samples-over-limit",
        422,
        "over the limit",
        ["body", "return_samples"],
        {**MC_BODY, "n_samples": 5000, "return_samples": True, "inputs": [[1.0, 2.0]] * 64},
        path=MC,
    ),
    # -- unknown fields and deep nesting -------------------------------------------------
    Bad("unknown-field", 422, "extra inputs", ["body", "extra"], {**GOOD, "extra": 1}),
    Bad(
        "unknown-field-mc",
        422,
        "extra inputs",
        ["body", "temperature"],
        {**MC_BODY, "temperature": 2},
        path=MC,
    ),
    Bad(
        "depth-33",
        422,
        "nested 33 levels deep; the limit is 32",
        ["body"],
        raw=f'{{"inputs": [[1, 2]], "x": {nested(32)}}}'.encode(),
    ),
    Bad(
        "depth-33-inputs",
        422,
        "nested 33 levels",
        ["body"],
        raw=f'{{"inputs": {nested(32)}}}'.encode(),
    ),
    Bad("depth-100k", 422, "nested 100000 levels", ["body"], raw=nested(100_000).encode()),
    Bad(
        "depth-objects",
        422,
        "nested 20001 levels",
        ["body"],
        raw=b'{"a":' * 20_000 + b"{}" + b"}" * 20_000,
    ),
    Bad("unbalanced-brackets", 422, "JSON decode error", raw=b"[" * 10 + b"]" * 20),
    # -- bodies over the size limit (8 MiB), announced and streamed ----------------------
    Bad("50MB", 413, "over the limit of 8388608 bytes", raw=b"x" * (50 * MB)),
    Bad(
        "50MB-streamed", 413, "over the limit of 8388608 bytes", raw=b"x" * (50 * MB), streamed=True
    ),
    Bad(
        "9MB-json-streamed",
        413,
        "over the limit",
        streamed=True,
        raw=b'{"inputs": [' + b"[1.0, 2.0], " * (9 * MB // 12) + b"[1.0, 2.0]]}",
    ),
    # -- model names -----------------------------------------------------------------------
    Bad(
        "unknown-model",
        404,
        "'nope' not found; served models: clf, deep, tiny",
        body=GOOD,
        path="/v1/models/nope/predict",
    ),
    Bad(
        "unknown-model-mc", 404, "'nope' not found", body=MC_BODY, path="/v1/models/nope/predict/mc"
    ),
    Bad("unknown-model-get", 404, "'nope' not found", method="GET", path="/v1/models/nope"),
    Bad(
        "traversal-slash",
        404,
        "not found",
        body=GOOD,
        path="/v1/models/..%2F..%2F..%2Fetc%2Fpasswd/predict",
    ),
    Bad("traversal-get", 404, "not found", method="GET", path="/v1/models/..%2Ftiny"),
    Bad("dot-dot", 404, "'..' not found", method="GET", path="/v1/models/%2E%2E"),
    Bad("nul-in-name", 404, "not found", method="GET", path="/v1/models/tiny%00"),
    Bad(
        "long-name",
        422,
        "at most 256 characters",
        ["path", "name"],
        GOOD,
        path=f"/v1/models/{'a' * 300}/predict",
    ),
    Bad(
        "very-long-name",
        422,
        "at most 256 characters",
        ["path", "name"],
        method="GET",
        path=f"/v1/models/{'a' * 8000}",
    ),
]


COMPARE = "/v1/models/tiny/compare"
BATTERY += [
    Bad(
        "compare-wrong-width",
        422,
        "expects 2",
        ["body", "inputs", 0],
        {"inputs": [[1.0]]},
        path=COMPARE,
    ),
    Bad(
        "compare-train-passes",
        422,
        "less than or equal to 32",
        ["body", "n_train_passes"],
        {**GOOD, "n_train_passes": 33},
        path=COMPARE,
    ),
    Bad(
        "compare-depth",
        422,
        "nested 100000 levels",
        ["body"],
        raw=nested(100_000).encode(),
        path=COMPARE,
    ),
    Bad(
        "compare-unknown-model", 404, "'nope' not found", body=GOOD, path="/v1/models/nope/compare"
    ),
]

# Finite inputs whose outputs overflow inside the model: never an answer carrying null.
HUGE = [3e38] * 5
BATTERY += [
    Bad(
        "outputs-overflow-eval",
        422,
        "beyond float range for rows [1]",
        ["body", "inputs", 1],
        {"inputs": [[1, 2, 3, 4, 5], HUGE]},
        path="/v1/models/clf/predict",
    ),
    Bad(
        "outputs-overflow-mc",
        422,
        "beyond float range for rows [0, 1]",
        ["body", "inputs", 0],
        {"inputs": [HUGE, HUGE], "seed": 1},
        path="/v1/models/clf/predict/mc",
    ),
    Bad(
        "outputs-overflow-compare",
        422,
        "beyond float range for rows [0]",
        ["body", "inputs", 0],
        {"inputs": [HUGE]},
        path="/v1/models/clf/compare",
    ),
    Bad(
        "outputs-overflow-v2",
        400,
        "beyond float range for rows [0]",
        body={"inputs": [{"name": "input", "shape": [1, 5], "datatype": "FP32", "data": HUGE}]},
        path="/v2/models/clf/infer",
    ),
]

# Open Inference Protocol (v2): bad input is its 400 {"error": ...} (tests/test_v2.py has the
# protocol's own cases); these are the rows where the shared guards meet v2.
V2_INFER = "/v2/models/tiny/infer"
BATTERY += [
    Bad("v2-depth", 400, "nested 100000 levels deep", raw=nested(100_000).encode(), path=V2_INFER),
    Bad("v2-not-utf8", 400, "not UTF-8", raw=b'{"inputs": "\xff"}', path=V2_INFER),
    Bad("v2-50MB", 413, "over the limit", raw=b"x" * (50 * MB), path=V2_INFER),
    Bad("v2-unknown-model", 404, "not found", body={"inputs": []}, path="/v2/models/nope/infer"),
    Bad("v2-wrong-method", 405, "not allowed", method="PUT", path="/v2/health/live"),
]


def send(client: httpx.Client, case: Bad) -> httpx.Response:
    content = case.raw if case.raw is not None else None
    if content is None and case.body is not None:
        content = json.dumps(case.body).encode()
    if case.streamed and content is not None:
        data = content

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(data), MB):
                yield data[i : i + MB]

        return client.request(case.method, case.path, content=chunks(), headers=case.headers)
    return client.request(case.method, case.path, content=content, headers=case.headers)


def messages(body: Any) -> list[str]:
    if "error" in body:  # Open Inference Protocol (v2) errors
        return [body["error"]]
    detail = body["detail"]
    return [e["msg"] for e in detail] if isinstance(detail, list) else [detail]


@pytest.fixture
def slow_client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=HANG_GUARD_S) as c:
        yield c


@pytest.mark.parametrize("case", BATTERY, ids=[c.id for c in BATTERY])
def test_bad_input_gets_a_clear_4xx_and_the_service_carries_on(
    slow_client: httpx.Client, model_dir: Path, case: Bad
) -> None:
    r = send(slow_client, case)
    assert r.status_code == case.status, r.text[:300]
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    said = " | ".join(messages(body))
    assert case.says.lower() in said.lower(), said[:300]
    if case.status == 422:
        assert all({"type", "loc", "msg"} <= set(e) for e in body["detail"])
        if case.loc is not None:
            assert case.loc in [e["loc"] for e in body["detail"]], body["detail"]
    for leak in ("Traceback", 'File "', "site-packages", str(model_dir), str(Path.cwd())):
        assert leak not in r.text
    after = slow_client.post(PREDICT, json=GOOD)
    assert after.status_code == 200
    assert after.json() == GOOD_ANSWER


def test_battery_covers_every_v1_operation(slow_client: httpx.Client) -> None:
    """A new v1 operation needs rows here: fail until it has some."""
    spec = slow_client.get("/openapi.json").json()
    operations = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        if path.startswith("/v1/models/{name}")
        for method in item
    }
    covered = {(c.method, p) for c in BATTERY for p in operations_matching(c.path)}
    assert operations <= covered, operations - covered


def operations_matching(path: str) -> list[str]:
    parts = path.split("/")
    if len(parts) < 4 or parts[1:3] != ["v1", "models"]:
        return []
    return ["/".join(["", "v1", "models", "{name}", *parts[4:]])]


@pytest.mark.parametrize(
    ("content_types", "status", "says"),
    [
        # The first Content-Type is what every part reads (as Starlette's Request.headers).
        (["text/plain", "application/json"], 422, "body must be JSON, sent with Content-Type"),
        (["application/json", "text/plain"], 422, "JSON nested 100 levels deep"),
    ],
)
def test_repeated_headers_are_read_alike_by_every_part(
    slow_client: httpx.Client, content_types: list[str], status: int, says: str
) -> None:
    headers = [("content-type", value) for value in content_types]
    r = slow_client.post(PREDICT, content=nested(100).encode(), headers=headers)
    assert r.status_code == status
    assert says in " | ".join(messages(r.json()))
    good = slow_client.post(PREDICT, content=json.dumps(GOOD).encode(), headers=headers)
    assert good.status_code == (200 if content_types[0] == "application/json" else 422)


# -- gRPC: the same guards behind the Open Inference Protocol's gRPC door ----------------


def _grpc_infer(
    model: str = "tiny", shape: tuple[int, ...] = (1, 2), raw: bytes | None = None, **params: int
) -> bytes:
    """A serialized ModelInferRequest, good unless the arguments say otherwise: ``shape``
    declared (with as many ones as it holds, or ``raw`` bytes instead)."""
    import numpy as np

    request = grpc_infer_request(model, np.ones((1, 2)), **params)
    request.inputs[0].shape[:] = list(shape)
    request.raw_input_contents[0] = np.ones(shape, "<f4").tobytes() if raw is None else raw
    return bytes(request.SerializeToString())


@dataclass(frozen=True)
class BadCall:
    id: str
    code: str  # grpc.StatusCode's name
    says: str
    payload: bytes
    method: str = "ModelInfer"


GRPC_BATTERY = [
    BadCall("garbage", "INVALID_ARGUMENT", "does not parse", b"\xff\xfe\xfd"),
    BadCall("truncated", "INVALID_ARGUMENT", "does not parse", _grpc_infer()[:-3]),
    BadCall("not-utf8-name", "INVALID_ARGUMENT", "does not parse", b"\x0a\x02\xff\xfe"),
    BadCall("empty", "NOT_FOUND", "model '' not found", b""),
    BadCall("unknown-model", "NOT_FOUND", "'nope' not found", _grpc_infer("nope")),
    BadCall("long-name", "NOT_FOUND", "not found", _grpc_infer("a" * 100_000)),
    BadCall("wrong-width", "INVALID_ARGUMENT", "has shape [1, 3]", _grpc_infer(shape=(1, 3))),
    BadCall(
        "huge-shape",
        "INVALID_ARGUMENT",
        "0 bytes of binary data",
        _grpc_infer(shape=(2**62, 2), raw=b""),
    ),
    BadCall("too-many-rows", "INVALID_ARGUMENT", "65 rows exceed", _grpc_infer(shape=(65, 2))),
    BadCall("short-bytes", "INVALID_ARGUMENT", "3 bytes of binary", _grpc_infer(raw=b"abc")),
    BadCall("nan", "INVALID_ARGUMENT", "not a finite", _grpc_infer(raw=b"\x00\x00\xc0\x7f" * 2)),
    BadCall("n-samples-1", "INVALID_ARGUMENT", "parameters.n_samples", _grpc_infer(n_samples=1)),
    BadCall("negative-seed", "INVALID_ARGUMENT", "parameters.seed", _grpc_infer(seed=-5)),
    BadCall("50MB", "RESOURCE_EXHAUSTED", "larger than max", b"\x0a" + b"\xff" * (50 * MB)),
    BadCall(
        "metadata-garbage", "INVALID_ARGUMENT", "does not parse", b"\x0a\x05ab", "ModelMetadata"
    ),
]


@pytest.mark.parametrize("case", GRPC_BATTERY, ids=[c.id for c in GRPC_BATTERY])
def test_bad_grpc_calls_get_a_clear_code_and_the_service_carries_on(
    case: BadCall, server: LiveServer
) -> None:
    import grpc

    from service.protocols.grpc.server import SERVICE

    with grpc.insecure_channel(server.grpc_url) as channel:
        send = channel.unary_unary(f"/{SERVICE}/{case.method}")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as info:
            send(case.payload, timeout=HANG_GUARD_S)
        assert info.value.code().name == case.code, info.value.details()
        details = info.value.details() or ""
        assert case.says.lower() in details.lower()
        assert "Traceback" not in details
        assert ".py" not in details
        answer = send(_grpc_infer(), timeout=HANG_GUARD_S)  # the next good call is answered
        assert len(answer) > 0


@pytest.mark.parametrize("rows", [1, SMALL_OUTPUT_VALUES])  # checked in Python, with numpy
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_an_answer_past_float_range_is_refused_naming_its_row(rows: int, bad: float) -> None:
    model = SimpleNamespace(config=SimpleNamespace(name="m"))
    outputs = {
        "mean": torch.zeros(rows, 2, dtype=torch.float64),
        "score": torch.zeros(rows),
        "flagged": torch.zeros(rows, dtype=torch.bool),
        "samples": torch.full((3, rows, 2), math.nan),  # finite where its mean is: not read
    }
    check_outputs(model, outputs)  # type: ignore[arg-type]
    for name, at in (("mean", (rows - 1, 1)), ("score", (rows - 1,))):
        outputs[name][at] = bad
        with pytest.raises(InvalidInput, match=rf"for rows \[{rows - 1}\]"):
            check_outputs(model, outputs)  # type: ignore[arg-type]
        outputs[name][at] = 0.0
