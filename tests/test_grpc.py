"""The gRPC front door with the real tritonclient.grpc: health and metadata, the same bits as
v1 and REST v2 output by output, errors as status codes with REST's messages, limits,
overload and deadlines, concurrency, metrics and the access log, model control, and a
SIGTERM that lets calls in flight finish."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tg_aio
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from service.protocols.grpc import predict_v2_pb2 as pb
from service.protocols.grpc.server import SERVICE
from service.settings import Settings
from tests.helpers import (
    ROOT,
    LiveServer,
    free_port,
    grpc_infer_request,
    live_server,
    scrape,
    serve,
    write_test_repository,
)

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def grpc_client(server: LiveServer) -> Iterator[tg.InferenceServerClient]:
    with tg.InferenceServerClient(server.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def http_v2(server: LiveServer) -> Iterator[th.InferenceServerClient]:
    with th.InferenceServerClient(server.url.removeprefix("http://")) as c:
        yield c


def grpc_input(x: np.ndarray) -> tg.InferInput:
    i = tg.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def http_input(x: np.ndarray) -> th.InferInput:
    i = th.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    return i


def outputs_of(result: Any) -> dict[str, np.ndarray]:
    """Every output of a tritonclient answer (gRPC or HTTP), by name."""
    response = result.get_response()
    if isinstance(response, dict):  # HTTP's JSON header
        names = [o["name"] for o in response["outputs"]]
    else:  # gRPC's ModelInferResponse
        names = [o.name for o in response.outputs]
    return {name: result.as_numpy(name) for name in names}


def assert_same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def rows(model: str, n: int, seed: int = 0) -> np.ndarray:
    width = {"tiny": 2, "deep": 4, "clf": 5}[model]
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


# -- generated code --------------------------------------------------------------------


def test_generated_messages_match_the_proto(tmp_path: Path) -> None:
    """predict_v2_pb2.py and .pyi are what `make proto` makes from the committed .proto."""
    from grpc_tools import protoc

    rel = "service/protocols/grpc/predict_v2.proto"
    args = ["protoc", f"-I{ROOT}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}"]
    assert protoc.main([*args, str(ROOT / rel)]) == 0
    for suffix in ("_pb2.py", "_pb2.pyi"):
        name = rel.replace(".proto", suffix)
        fresh, committed = (tmp_path / name).read_text(), (ROOT / name).read_text()
        assert fresh == committed, f"{name} is stale: run make proto"


# -- health and metadata -----------------------------------------------------------------


def test_health_and_server_metadata(grpc_client: tg.InferenceServerClient) -> None:
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready()
    meta = grpc_client.get_server_metadata(as_json=True)
    assert meta["name"] == "dropout-service"
    assert meta["extensions"] == ["model_repository"]


@pytest.mark.parametrize("model", ["tiny", "deep", "clf"])
def test_model_metadata_is_rest_v2s(
    grpc_client: tg.InferenceServerClient, client: httpx.Client, model: str
) -> None:
    over_grpc = grpc_client.get_model_metadata(model, as_json=True)
    rest = client.get(f"/v2/models/{model}").json()
    for key in ("name", "versions", "platform"):
        assert over_grpc[key] == rest[key]
    for key in ("inputs", "outputs"):  # protobuf's JSON writes int64 shapes as strings
        shapes = [{**t, "shape": [int(d) for d in t["shape"]]} for t in over_grpc[key]]
        assert shapes == rest[key]


def test_model_ready_and_not_found(grpc_client: tg.InferenceServerClient) -> None:
    assert grpc_client.is_model_ready("tiny")
    assert grpc_client.is_model_ready("tiny", "3")
    for name, version in [("nope", ""), ("tiny", "9")]:
        with pytest.raises(InferenceServerException) as info:
            grpc_client.is_model_ready(name, version)
        assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        grpc_client.get_model_metadata("tiny", "9")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no version '9'" in info.value.message()


# -- the same bits as v1 and REST v2 -----------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "deep", "clf"])
@pytest.mark.parametrize("n", [1, 7])
def test_eval_is_v1s_and_rest_v2s_bits(
    grpc_client: tg.InferenceServerClient,
    http_v2: th.InferenceServerClient,
    client: httpx.Client,
    model: str,
    n: int,
) -> None:
    x = rows(model, n, seed=n)
    over_grpc = outputs_of(grpc_client.infer(model, [grpc_input(x)]))
    over_rest = outputs_of(http_v2.infer(model, [http_input(x)]))
    assert_same_bits(over_grpc, over_rest)
    v1 = client.post(f"/v1/models/{model}/predict", json={"inputs": x.tolist()}).json()
    assert over_grpc["output"].tolist() == v1["outputs"]


MC_PARAMETERS = [
    {"n_samples": 50, "seed": 7},
    {"seed": 11},  # the default n_samples
    {"n_samples": 20, "seed": 3, "return_samples": True},
    {"seed": 5, "target_se": 0.05, "n_samples": 400},
    {"seed": 5, "target_se": 1},  # an int where a float belongs: as REST takes it
]


@pytest.mark.parametrize("model", ["deep", "clf"])
@pytest.mark.parametrize("params", MC_PARAMETERS, ids=json.dumps)
def test_mc_is_v1s_and_rest_v2s_bits_output_by_output(
    grpc_client: tg.InferenceServerClient,
    http_v2: th.InferenceServerClient,
    client: httpx.Client,
    model: str,
    params: dict[str, Any],
) -> None:
    x = rows(model, 5, seed=1)
    g = grpc_client.infer(model, [grpc_input(x)], parameters=params)
    h = http_v2.infer(model, [http_input(x)], parameters=params)
    over_grpc, over_rest = outputs_of(g), outputs_of(h)
    assert_same_bits(over_grpc, over_rest)
    # The answer's parameters (passes drawn, seed) are REST's too.
    grpc_params = {k: int(v["int64_param"]) for k, v in g.get_response(True)["parameters"].items()}
    assert grpc_params == h.get_response()["parameters"]
    v1 = client.post(f"/v1/models/{model}/predict/mc", json={"inputs": x.tolist(), **params})
    assert over_grpc["mean"].tolist() == v1.json()["mean"]
    assert over_grpc["variance"].tolist() == v1.json()["variance"]


def test_mc_without_a_seed_reports_one_that_replays(
    grpc_client: tg.InferenceServerClient,
) -> None:
    x = rows("deep", 3)
    first = grpc_client.infer("deep", [grpc_input(x)], parameters={"n_samples": 30})
    seed = int(first.get_response(True)["parameters"]["seed"]["int64_param"])
    again = grpc_client.infer("deep", [grpc_input(x)], parameters={"n_samples": 30, "seed": seed})
    assert_same_bits(outputs_of(first), outputs_of(again))


def test_requested_outputs_and_id(grpc_client: tg.InferenceServerClient) -> None:
    x = rows("clf", 2)
    asked = [tg.InferRequestedOutput("entropy"), tg.InferRequestedOutput("mean")]
    r = grpc_client.infer(
        "clf", [grpc_input(x)], outputs=asked, parameters={"seed": 1}, request_id="req-9"
    )
    response = r.get_response(as_json=True)
    assert [o["name"] for o in response["outputs"]] == ["entropy", "mean"]
    assert response["id"] == "req-9"
    assert r.as_numpy("variance") is None


# -- by hand: contents instead of raw bytes, trailing metadata -------------------------


def call(url: str, method: str, request: Any, response_type: Any, **kwargs: Any) -> Any:
    """One unary call with the service's own messages; ``(response, call)``."""
    with grpc.insecure_channel(url) as channel:
        stub = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return stub.with_call(request, **kwargs)


def test_values_in_contents_compute_as_raw_bytes(server: LiveServer) -> None:
    x = rows("deep", 4, seed=3)
    answers = []
    for raw in (True, False):
        request = grpc_infer_request("deep", x, raw=raw, n_samples=25, seed=9)
        response, _ = call(server.grpc_url, "ModelInfer", request, pb.ModelInferResponse)
        answers.append(list(response.raw_output_contents))
    assert answers[0] == answers[1]
    assert len(answers[0]) > 3


def test_request_id_comes_back_in_trailing_metadata(server: LiveServer) -> None:
    request = grpc_infer_request("tiny", rows("tiny", 1))
    _, done = call(
        server.grpc_url,
        "ModelInfer",
        request,
        pb.ModelInferResponse,
        metadata=[("x-request-id", "grpc-id-1")],
    )
    assert ("x-request-id", "grpc-id-1") in done.trailing_metadata()
    _, done = call(server.grpc_url, "ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse)
    ids = [v for k, v in done.trailing_metadata() if k == "x-request-id"]
    assert len(ids) == 1
    assert len(ids[0]) == 32  # made here


# -- errors: status codes, REST v2's messages -------------------------------------------


def rest_error(client: httpx.Client, model: str, body: dict[str, Any]) -> str:
    r = client.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == 400, r.text
    return str(r.json()["error"])


GOOD = [[1.0, 2.0]]


@pytest.mark.parametrize(
    ("case", "params", "body"),
    [
        ("bool n_samples", {"n_samples": True}, {"n_samples": True}),
        ("n_samples 1", {"n_samples": 1}, {"n_samples": 1}),
        ("n_samples over the max", {"n_samples": 5001}, {"n_samples": 5001}),
        ("negative seed", {"seed": -1}, {"seed": -1}),
        ("unknown parameter", {"temperature": 2}, {"temperature": 2}),
        ("string parameter", {"n_samples": "10"}, {"n_samples": "10"}),
        ("coverage too low", {"coverage": 0.2}, {"coverage": 0.2}),
        ("target_se zero", {"target_se": 0.0}, {"target_se": 0.0}),
        ("too many samples returned", {"n_samples": 5000, "return_samples": True}, None),
    ],
)
def test_bad_parameters_are_invalid_argument_with_rests_message(
    grpc_client: tg.InferenceServerClient,
    client: httpx.Client,
    case: str,
    params: dict[str, Any],
    body: dict[str, Any] | None,
) -> None:
    x = np.array([[1.0] * 2] * 64, dtype=np.float32) if body is None else np.array(GOOD, "f4")
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("tiny", [grpc_input(x)], parameters=params)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", case
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
    expected = rest_error(client, "tiny", {"inputs": [tensor], "parameters": body or params})
    assert info.value.message() == expected


@pytest.mark.parametrize(
    ("case", "x", "message"),
    [
        ("wrong width", np.ones((1, 3), "f4"), "has shape [1, 3]"),
        ("no rows", np.ones((0, 2), "f4"), "has shape [0, 2]"),
        ("NaN", np.array([[1.0, np.nan]], "f4"), "row 0 holds a value that is not a finite"),
        ("infinity", np.array([[1, 1], [1, np.inf], [1, 1]], "f4"), "row 1 holds"),
        ("too many rows", np.ones((65, 2), "f4"), "65 rows"),
        ("three dimensions", np.ones((1, 2, 1), "f4"), "has shape [1, 2, 1]"),
    ],
)
def test_bad_inputs_are_invalid_argument_with_rests_message(
    grpc_client: tg.InferenceServerClient,
    client: httpx.Client,
    case: str,
    x: np.ndarray,
    message: str,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("tiny", [grpc_input(x)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", case
    assert message in info.value.message()
    i = th.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    with pytest.raises(InferenceServerException) as rest:
        th.InferenceServerClient(client.base_url.netloc.decode()).infer("tiny", [i])
    assert info.value.message() == rest.value.message()


def test_malformed_requests_by_hand_are_invalid_argument(server: LiveServer) -> None:
    x = np.array(GOOD, "f4")
    cases: list[tuple[Callable[[Any], None], str]] = [
        (lambda r: r.ClearField("inputs"), "no inputs"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "has datatype 'FP64'"),
        (lambda r: setattr(r.inputs[0], "name", "x"), "takes one input, 'input'"),
        (lambda r: r.raw_input_contents.append(b"1234"), "2 raw_input_contents for 1 input"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"123"), "3 bytes of binary data"),
        (lambda r: r.ClearField("raw_input_contents"), "neither contents nor raw_input"),
        (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "both contents and raw"),
        (lambda r: r.parameters["seed"].Clear(), "parameters.seed: the parameter has no value"),
        (lambda r: r.inputs[0].parameters["binary_data_size"].int64_param, "takes no param"),
        (lambda r: r.outputs.add(name="samples"), "set parameter return_samples"),
        (lambda r: r.outputs.add(name="nope"), "output 'nope' is not in this answer"),
        (
            lambda r: setattr(
                r.outputs.add(name="mean").parameters["class_count"], "int64_param", 3
            ),
            "output 'mean' takes no parameters: ['class_count']",
        ),
    ]
    for change, message in cases:
        request = grpc_infer_request("tiny", x, seed=1)
        change(request)
        with pytest.raises(grpc.RpcError) as info:
            call(server.grpc_url, "ModelInfer", request, pb.ModelInferResponse)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in info.value.details()
    request = grpc_infer_request("tiny", x)
    request.ClearField("raw_input_contents")
    request.inputs[0].contents.fp64_contents.extend([1.0, 2.0])
    with pytest.raises(grpc.RpcError) as info:
        call(server.grpc_url, "ModelInfer", request, pb.ModelInferResponse)
    assert "FP32 values go in contents.fp32_contents, not ['fp64_contents']" in info.value.details()


def test_unknown_model_and_version_are_not_found(grpc_client: tg.InferenceServerClient) -> None:
    x = np.array(GOOD, "f4")
    for model, version, message in [
        ("nope", "", "model 'nope' not found; served models: clf, deep, tiny"),
        ("tiny", "7", "model 'tiny' has no version '7'"),
    ]:
        with pytest.raises(InferenceServerException) as info:
            grpc_client.infer(model, [grpc_input(x)], model_version=version)
        assert info.value.status() == "StatusCode.NOT_FOUND"
        assert message in info.value.message()


def test_a_request_over_the_body_limit_is_resource_exhausted(server: LiveServer) -> None:
    limit = server.app.state.settings.max_body_bytes
    x = np.ones((limit // 8 + 1, 2), "f4")  # just over the limit
    with pytest.raises(grpc.RpcError) as info:
        call(server.grpc_url, "ModelInfer", grpc_infer_request("tiny", x), pb.ModelInferResponse)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # and the server carries on
    response, _ = call(
        server.grpc_url, "ModelInfer", grpc_infer_request("tiny", x[:1]), pb.ModelInferResponse
    )
    assert np.frombuffer(response.raw_output_contents[0], "<f4").shape == (1,)


def test_unserved_calls_are_unimplemented(server: LiveServer) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(
            server.grpc_url, "ModelConfig", pb.ModelReadyRequest(name="tiny"), pb.ServerLiveResponse
        )
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- concurrency, metrics and the access log ---------------------------------------------


def test_64_concurrent_calls_equal_their_solo_answers(
    server: LiveServer, grpc_client: tg.InferenceServerClient
) -> None:
    jobs = []
    for i in range(64):
        model = ["tiny", "deep", "clf"][i % 3]
        params = {"n_samples": 20 + i, "seed": i} if i % 2 else None
        jobs.append((model, rows(model, 1 + i % 5, seed=i), params))
    solo = [outputs_of(grpc_client.infer(m, [grpc_input(x)], parameters=p)) for m, x, p in jobs]

    async def together() -> list[dict[str, np.ndarray]]:
        async with tg_aio.InferenceServerClient(server.grpc_url) as c:
            calls = [c.infer(m, [grpc_input(x)], parameters=p) for m, x, p in jobs]
            return [outputs_of(r) for r in await asyncio.gather(*calls)]

    for alone, concurrent in zip(solo, asyncio.run(together()), strict=True):
        assert_same_bits(alone, concurrent)


def test_metrics_count_grpc_calls_by_method_model_and_code(
    server: LiveServer, grpc_client: tg.InferenceServerClient
) -> None:
    endpoint = f"/{SERVICE}/ModelInfer"

    def count(status: str) -> float:
        labels = {
            "protocol": "grpc",
            "method": "POST",
            "endpoint": endpoint,
            "model": "tiny" if status == "OK" else "",
            "status": status,
        }
        key = ("dropout_http_requests_total", tuple(sorted(labels.items())))
        return scrape(server.url).get(key, 0.0)

    ok, bad = count("OK"), count("NOT_FOUND")
    x = np.array(GOOD, "f4")
    grpc_client.infer("tiny", [grpc_input(x)])
    grpc_client.infer("tiny", [grpc_input(x)], parameters={"seed": 1})
    with pytest.raises(InferenceServerException):
        grpc_client.infer("nope", [grpc_input(x)])
    assert count("OK") == ok + 2
    assert count("NOT_FOUND") == bad + 1


def test_access_log_has_a_line_per_grpc_call(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.serving.observe import flush_access_log

    request = grpc_infer_request("deep", rows("deep", 2), n_samples=12, seed=4)
    call(
        server.grpc_url,
        "ModelInfer",
        request,
        pb.ModelInferResponse,
        metadata=[("x-request-id", "log-me-1")],
    )
    flush_access_log()
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if "log-me-1" in line
    ]
    assert len(lines) == 1
    line = lines[0]
    assert line["protocol"] == "grpc"
    assert line["endpoint"] == f"/{SERVICE}/ModelInfer"
    assert line["status"] == "OK"
    assert line["model"] == "deep"
    assert line["n_samples"] == 12
    assert line["rows"] == 2


# -- overload, deadlines, model control, SIGTERM -------------------------------------------


@pytest.fixture(scope="module")
def crowded(wide_model_dir: Path) -> Iterator[LiveServer]:
    """One request at a time, 0.3 s each at most: heavy MC requests meet both limits."""
    settings = Settings(
        model_dir=wide_model_dir,
        max_queue_size=1,
        request_timeout_s=0.3,
        max_n_samples=100_000,
        grpc_port=free_port(),
    )
    with live_server(settings) as s:
        yield s


def test_overload_is_unavailable_with_a_retry_hint_and_slow_is_deadline_exceeded(
    crowded: LiveServer,
) -> None:
    x = inputs_for_wide()
    request = grpc_infer_request("wide", x, n_samples=50_000, seed=1)
    results: list[Any] = []

    def heavy() -> None:
        try:
            call(crowded.grpc_url, "ModelInfer", request, pb.ModelInferResponse)
        except grpc.RpcError as exc:
            results.append(exc)

    threads = [threading.Thread(target=heavy) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    codes = sorted(e.code().name for e in results)
    assert len(codes) == 4
    assert set(codes) == {"DEADLINE_EXCEEDED", "UNAVAILABLE"}, codes
    busy = next(e for e in results if e.code() == grpc.StatusCode.UNAVAILABLE)
    assert ("retry-after", "1") in busy.trailing_metadata()
    late = next(e for e in results if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
    assert "did not answer within 0.3 s" in late.details()


def inputs_for_wide() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)


def test_a_client_deadline_is_deadline_exceeded(crowded: LiveServer) -> None:
    request = grpc_infer_request("wide", inputs_for_wide(), n_samples=50_000, seed=2)
    with pytest.raises(grpc.RpcError) as info:
        call(crowded.grpc_url, "ModelInfer", request, pb.ModelInferResponse, timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server stops that job: soon the one request it admits at a time is free again.
    small = grpc_infer_request("wide", inputs_for_wide()[:1])
    deadline = time.monotonic() + 10
    codes = []
    while True:
        try:
            response, _ = call(crowded.grpc_url, "ModelInfer", small, pb.ModelInferResponse)
            break
        except grpc.RpcError as exc:
            codes.append(exc.code())
        assert time.monotonic() < deadline, "the abandoned job still holds the model"
        time.sleep(0.05)
    assert set(codes) <= {grpc.StatusCode.UNAVAILABLE}
    assert len(response.raw_output_contents) == 1


@pytest.fixture(scope="module")
def controlled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("grpc-control")
    write_test_repository(root)
    settings = Settings(model_dir=root, admin_token=TOKEN, grpc_port=free_port())
    with live_server(settings) as s:
        yield s


def test_model_control_over_grpc(controlled: LiveServer) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    with tg.InferenceServerClient(controlled.grpc_url) as c:
        index = c.get_model_repository_index(headers=auth, as_json=True)["models"]
        assert [(m["name"], m["state"]) for m in index] == [
            ("clf", "READY"), ("deep", "READY"), ("tiny", "READY"),
        ]  # fmt: skip
        c.unload_model("deep", headers=auth)
        assert not c.is_model_ready("deep")  # a folder of the repository, not served
        with pytest.raises(InferenceServerException) as info:
            c.infer("deep", [grpc_input(rows("deep", 1))])
        assert info.value.status() == "StatusCode.NOT_FOUND"
        c.load_model("deep", headers=auth)
        assert c.is_model_ready("deep")
        with pytest.raises(InferenceServerException) as info:
            c.load_model("nope", headers=auth)
        assert info.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as info:
            c.load_model("deep", headers=auth, config='{"name": "deep"}')
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        for headers, code in [
            (None, "UNAUTHENTICATED"),
            ({"authorization": "Bearer no"}, "UNAUTHENTICATED"),
        ]:
            with pytest.raises(InferenceServerException) as info:
                c.unload_model("tiny", headers=headers)
            assert info.value.status() == f"StatusCode.{code}"
        assert c.is_model_ready("tiny")


def test_model_control_is_off_without_a_token(grpc_client: tg.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        grpc_client.get_model_repository_index(headers={"authorization": "Bearer x"})
    assert info.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "DROPOUT_ADMIN_TOKEN" in info.value.message()


@pytest.mark.slow
def test_sigterm_lets_grpc_calls_in_flight_finish(tmp_path: Path, wide_model_dir: Path) -> None:
    """`serve` with gRPC on: a call computing when SIGTERM arrives still gets its answer,
    and the process exits 0."""
    port = free_port()
    x = inputs_for_wide()
    with serve(
        tmp_path / "log", "--models", str(wide_model_dir), "--grpc-port", str(port),
        DROPOUT_MAX_N_SAMPLES="100000",
    ) as (proc, http_url):  # fmt: skip
        url = f"127.0.0.1:{port}"
        request = grpc_infer_request("wide", x, n_samples=3000, seed=1)
        result: list[Any] = []
        t = threading.Thread(
            target=lambda: result.append(call(url, "ModelInfer", request, pb.ModelInferResponse))
        )
        t.start()
        pending = ("dropout_inference_pending_requests", (("model", "wide"),))
        deadline = time.monotonic() + 30
        while scrape(http_url).get(pending) != 1:  # until the call computes
            assert time.monotonic() < deadline, "the call never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    assert len(result) == 1
    response, done = result[0]
    assert done.code() == grpc.StatusCode.OK
    assert np.frombuffer(response.raw_output_contents[0], "<f8").shape == (64,)


def test_a_grpc_port_in_use_stops_the_start_with_a_clear_error(
    model_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="did not start"):  # noqa: SIM117
            with live_server(Settings(model_dir=model_dir, grpc_port=port)):
                pass
    logged = capfd.readouterr().err  # uvicorn's startup error
    assert f"gRPC cannot listen on 127.0.0.1:{port}" in logged
    assert "DROPOUT_GRPC_PORT" in logged
