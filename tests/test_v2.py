"""The Open Inference Protocol API through tritonclient and raw HTTP, against real uvicorn.

Every answer is checked against v1 for the same inputs and seed, bit for bit: FP32 outputs
against v1's float32-valued JSON, FP64 MC summaries against v1's float64 JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as aio
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.settings import Settings
from tests.helpers import LiveServer

WIDTH = {"tiny": 2, "deep": 4, "clf": 5}
MC_FIELDS = (
    "mean",
    "variance",
    "std",
    "mc_standard_error",
    "predictive_variance",
    "entropy",
    "mutual_information",
    "samples",
)


@pytest.fixture
def client_v2(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(
        server.url.removeprefix("http://"), connection_timeout=30, network_timeout=30
    )
    yield c
    c.close()


def rows(name: str, n: int = 3) -> np.ndarray:
    """Float32 rows with full-precision values, so any lossy conversion would show."""
    return np.random.default_rng(len(name)).standard_normal((n, WIDTH[name])).astype(np.float32)


def infer(
    c: triton.InferenceServerClient,
    name: str,
    x: np.ndarray,
    *,
    binary_in: bool = True,
    binary_out: bool = True,
    outputs: list[str] | None = None,
    **kwargs: Any,
) -> triton.InferResult:
    inp = triton.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x, binary_in)
    wanted = None
    if outputs is not None or not binary_out:
        names = outputs or (["output"] if not kwargs.get("parameters") else [])
        wanted = [triton.InferRequestedOutput(n, binary_data=binary_out) for n in names]
    return c.infer(name, [inp], outputs=wanted, **kwargs)


def v1(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def same_bits(got: np.ndarray, want: Any, dtype: type) -> bool:
    return got.dtype == dtype and got.tobytes() == np.asarray(want, dtype=dtype).tobytes()


# -- health and metadata ----------------------------------------------------------------


def test_live_and_ready(client_v2: triton.InferenceServerClient) -> None:
    assert client_v2.is_server_live()
    assert client_v2.is_server_ready()
    assert client_v2.is_model_ready("tiny")
    assert client_v2.is_model_ready("tiny", "3")
    assert not client_v2.is_model_ready("tiny", "1")
    assert not client_v2.is_model_ready("nope")


def test_server_metadata(client_v2: triton.InferenceServerClient) -> None:
    meta = client_v2.get_server_metadata()
    assert meta["name"] == "dropout-service"
    assert meta["extensions"] == ["binary_tensor_data"]
    assert meta["version"]


def test_model_metadata_lists_inputs_and_outputs(client_v2: triton.InferenceServerClient) -> None:
    meta = client_v2.get_model_metadata("clf")
    assert meta == client_v2.get_model_metadata("clf", "1")
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 5]}]
    assert meta["outputs"] == [
        {"name": "output", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "mean", "datatype": "FP64", "shape": [-1, 3]},
        {"name": "variance", "datatype": "FP64", "shape": [-1, 3]},
        {"name": "std", "datatype": "FP64", "shape": [-1, 3]},
        {"name": "mc_standard_error", "datatype": "FP64", "shape": [-1, 3]},
        {"name": "entropy", "datatype": "FP64", "shape": [-1]},
        {"name": "mutual_information", "datatype": "FP64", "shape": [-1]},
        {"name": "prediction_sets", "datatype": "BOOL", "shape": [-1, 3]},
        {"name": "samples", "datatype": "FP32", "shape": [-1, -1, 3]},
    ]
    regression = [o["name"] for o in client_v2.get_model_metadata("deep")["outputs"]]
    assert "predictive_variance" in regression
    assert "entropy" not in regression


def test_metadata_of_an_unknown_version_is_404(client_v2: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as e:
        client_v2.get_model_metadata("tiny", "1")
    assert e.value.status() == "404"
    assert "has no version '1'; served version: '3'" in e.value.message()


# -- inference equals v1 --------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "deep", "clf"])
@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False), (True, False)])
def test_eval_infer_equals_v1_predict(
    client_v2: triton.InferenceServerClient,
    client: httpx.Client,
    name: str,
    binary_in: bool,
    binary_out: bool,
) -> None:
    x = rows(name)
    result = infer(client_v2, name, x, binary_in=binary_in, binary_out=binary_out)
    want = v1(client, f"/v1/models/{name}/predict", {"inputs": x.tolist()})
    assert same_bits(result.as_numpy("output"), want["outputs"], np.float32)
    response = result.get_response()
    assert (response["model_name"], response["model_version"]) == (name, want["version"])
    assert "parameters" not in response
    (out,) = response["outputs"]
    assert ("data" in out) == (not binary_out)


def test_few_or_many_json_rows_round_to_float32_alike(client: httpx.Client) -> None:
    """A few JSON values are checked and converted in one torch call, many with numpy
    (``DataPlane.to_tensor``): both round float64 to float32 alike, so a row answers the
    same bits alone and among many."""
    rng = np.random.default_rng(5)
    row = rng.standard_normal(WIDTH["clf"]) * 10.0 ** rng.integers(-42, 3, WIDTH["clf"])
    row[0] = 3.4028235e38 / 1e38  # 17 digits: none of these is a float32
    alone = v1(client, "/v1/models/clf/predict", {"inputs": [row.tolist()]})
    many = 256 // WIDTH["clf"] + 1  # past the few, within the row limit
    among = v1(client, "/v1/models/clf/predict", {"inputs": [row.tolist()] * many})
    assert same_bits(np.asarray(among["outputs"][:1], np.float32), alone["outputs"], np.float32)
    assert same_bits(np.asarray(among["outputs"], np.float32), alone["outputs"] * many, np.float32)


def test_eval_infer_known_answer(client_v2: triton.InferenceServerClient) -> None:
    x = np.array([[1, 2], [0, 0]], dtype=np.float32)
    assert infer(client_v2, "tiny", x).as_numpy("output").tolist() == [[6.5], [0.5]]


@pytest.mark.parametrize("name", ["tiny", "deep", "clf"])
@pytest.mark.parametrize("binary", [True, False])
def test_mc_infer_equals_v1_predict_mc(
    client_v2: triton.InferenceServerClient, client: httpx.Client, name: str, binary: bool
) -> None:
    x = rows(name)
    params = {"n_samples": 40, "seed": 1234567, "return_samples": True}
    result = infer(client_v2, name, x, binary_in=binary, parameters=params)
    if not binary:  # the client asks binary by default; this one asks JSON for every output
        result = infer(
            client_v2,
            name,
            x,
            binary_in=False,
            binary_out=False,
            parameters=params,
            outputs=[o["name"] for o in result.get_response()["outputs"]],
        )
    want = v1(client, f"/v1/models/{name}/predict/mc", {"inputs": x.tolist(), **params})
    response = result.get_response()
    assert response["parameters"] == {"n_samples": 40, "seed": 1234567}
    names = [o["name"] for o in response["outputs"]]
    assert names == [k for k in MC_FIELDS if want.get(k) is not None]
    for k in names:
        dtype = np.float32 if k == "samples" else np.float64
        assert same_bits(result.as_numpy(k), want[k], dtype), k


def test_mc_without_seed_reports_one_that_replays(
    client_v2: triton.InferenceServerClient,
) -> None:
    x = rows("deep")
    first = infer(client_v2, "deep", x, parameters={"n_samples": 20})
    seed = first.get_response()["parameters"]["seed"]
    assert 0 <= seed < 2**63
    again = infer(client_v2, "deep", x, parameters={"n_samples": 20, "seed": seed})
    assert again.as_numpy("mean").tobytes() == first.as_numpy("mean").tobytes()


def test_mc_default_n_samples_when_only_a_seed_is_given(
    client_v2: triton.InferenceServerClient,
) -> None:
    result = infer(client_v2, "tiny", rows("tiny"), parameters={"seed": 5})
    assert result.get_response()["parameters"] == {"n_samples": 100, "seed": 5}


def test_outputs_filter_id_and_binary_per_output(
    client_v2: triton.InferenceServerClient, client: httpx.Client
) -> None:
    x = rows("deep")
    inp = triton.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)
    wanted = [
        triton.InferRequestedOutput("std", binary_data=False),
        triton.InferRequestedOutput("mean", binary_data=True),
    ]
    params = {"n_samples": 30, "seed": 9}
    result = client_v2.infer("deep", [inp], outputs=wanted, request_id="r-17", parameters=params)
    response = result.get_response()
    assert response["id"] == "r-17"
    std, mean = response["outputs"]
    assert (std["name"], mean["name"]) == ("std", "mean")
    assert "data" in std
    assert "parameters" not in std
    assert mean["parameters"] == {"binary_data_size": x.shape[0] * 2 * 8}
    assert result.as_numpy("variance") is None
    want = v1(client, "/v1/models/deep/predict/mc", {"inputs": x.tolist(), **params})
    assert same_bits(result.as_numpy("std"), want["std"], np.float64)
    assert same_bits(result.as_numpy("mean"), want["mean"], np.float64)


def test_asyncio_client_concurrent_requests_keep_their_bits(
    server: LiveServer, client_v2: triton.InferenceServerClient
) -> None:
    """tritonclient.http.aio (aiohttp) works too; MC and eval requests interleaved on the
    server answer the bits that each answers alone."""
    x = rows("deep", 4)
    inp = triton.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)
    alone_mc = infer(client_v2, "deep", x, parameters={"n_samples": 200, "seed": 11})
    alone_eval = infer(client_v2, "deep", x)

    async def together() -> list[triton.InferResult]:
        async with aio.InferenceServerClient(server.url.removeprefix("http://")) as c:
            calls = [
                c.infer("deep", [inp], parameters={"n_samples": 200, "seed": 11})
                if i % 2
                else c.infer("deep", [inp])
                for i in range(12)
            ]
            return list(await asyncio.gather(*calls))

    for i, result in enumerate(asyncio.run(together())):
        if i % 2:
            assert result.as_numpy("mean").tobytes() == alone_mc.as_numpy("mean").tobytes()
            assert result.as_numpy("std").tobytes() == alone_mc.as_numpy("std").tobytes()
        else:
            assert result.as_numpy("output").tobytes() == alone_eval.as_numpy("output").tobytes()


# -- errors, as tritonclient shows them ------------------------------------------------


def _expect(status: str, message: str, call: Any) -> None:
    with pytest.raises(InferenceServerException) as e:
        call()
    assert e.value.status() == status, e.value.message()
    assert message in e.value.message()


def test_bad_shape(client_v2: triton.InferenceServerClient) -> None:
    x = np.ones((1, 3), dtype=np.float32)
    _expect(
        "400",
        "has shape [1, 3]; model 'tiny' takes [rows >= 1, 2]",
        lambda: infer(client_v2, "tiny", x),
    )


def test_bad_datatype(client_v2: triton.InferenceServerClient) -> None:
    inp = triton.InferInput("input", [1, 2], "FP64").set_data_from_numpy(np.ones((1, 2)))
    _expect(
        "400", "datatype 'FP64'; model 'tiny' takes FP32", lambda: client_v2.infer("tiny", [inp])
    )


def test_unknown_model_and_version(client_v2: triton.InferenceServerClient) -> None:
    x = rows("tiny")
    _expect("404", "model 'nope' not found", lambda: infer(client_v2, "nope", x))
    _expect("404", "no version '2'", lambda: infer(client_v2, "tiny", x, model_version="2"))
    assert infer(client_v2, "tiny", x, model_version="3").as_numpy("output").shape == (3, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"outputs": ["nope"]}, "output 'nope' is not in this answer"),
        ({"outputs": ["mean"]}, "MC outputs need parameter n_samples"),
        ({"outputs": ["samples"], "parameters": {"seed": 1}}, "set parameter return_samples"),
        ({"parameters": {"n_samples": 1}}, "parameters.n_samples"),
        ({"parameters": {"n_samples": 5001}}, "n_samples must be in [2, 5000]"),
        ({"parameters": {"seed": -1}}, "parameters.seed"),
        ({"parameters": {"samples": 10}}, "parameters.samples: Extra inputs are not permitted"),
    ],
)
def test_bad_requests_are_400_with_the_reason(
    client_v2: triton.InferenceServerClient, kwargs: dict[str, Any], message: str
) -> None:
    _expect("400", message, lambda: infer(client_v2, "tiny", rows("tiny"), **kwargs))


def test_wrong_input_name_rows_limit_and_non_finite(
    client_v2: triton.InferenceServerClient,
) -> None:
    inp = triton.InferInput("x", [1, 2], "FP32").set_data_from_numpy(np.ones((1, 2), np.float32))
    _expect("400", "takes one input, 'input'", lambda: client_v2.infer("tiny", [inp]))
    many = np.ones((65, 2), dtype=np.float32)
    _expect("400", "65 rows exceed the maximum of 64", lambda: infer(client_v2, "tiny", many))
    nan = np.array([[1.0, np.nan]], dtype=np.float32)
    _expect("400", "row 0", lambda: infer(client_v2, "tiny", nan))


# -- raw HTTP: content types and the error body ------------------------------------------

TINY_JSON = b'{"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}'


@pytest.mark.parametrize("content_type", [None, "application/json", "application/octet-stream"])
def test_json_body_with_any_or_no_content_type(
    client: httpx.Client, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/v2/models/tiny/infer", content=TINY_JSON, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "model_name": "tiny",
        "model_version": "3",
        "outputs": [{"name": "output", "shape": [1, 1], "datatype": "FP32", "data": [6.5]}],
    }


def test_binary_request_and_response_by_hand(client: httpx.Client) -> None:
    header = (
        b'{"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32",'
        b' "parameters": {"binary_data_size": 8}}], "parameters": {"binary_data_output": true}}'
    )
    body = header + np.array([1, 2], dtype="<f4").tobytes()
    r = client.post(
        "/v2/models/tiny/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    assert r.headers["content-type"] == "application/octet-stream"
    assert np.frombuffer(r.content[n:], dtype="<f4").tolist() == [6.5]


@pytest.mark.parametrize(
    ("content", "headers", "message"),
    [
        (b'{"inputs": [', {}, "Invalid JSON"),
        (TINY_JSON, {"Inference-Header-Content-Length": "9999"}, "not a byte count"),
        (
            TINY_JSON + b"\x00" * 4,
            {"Inference-Header-Content-Length": str(len(TINY_JSON))},
            "claim 0 binary bytes",
        ),
        (b'{"inputs": []}', {}, "inputs: List should have at least 1 item"),
        (b'{"input": []}', {}, "input: Extra inputs are not permitted"),
        (TINY_JSON.replace(b'"data": [1, 2]', b'"data": [1, true]'), {}, "holds bool"),
        (
            TINY_JSON.replace(b'"data"', b'"parameters": {"binary_data_size": 8}, "data"'),
            {},
            "claim more",
        ),
        (
            TINY_JSON.replace(b"]}]", b']}, {"name": "b", "shape": [1], "datatype": "FP32"}]'),
            {},
            "inputs ['input', 'b']: model 'tiny' takes one input",
        ),
        # An integer past float64's range: Python parses it, torch.tensor would overflow.
        (
            TINY_JSON.replace(b'"data": [1, 2]', b'"data": [1, 1' + b"0" * 400 + b"]"),
            {},
            "input 'input': holds a number beyond FP32 range",
        ),
        (
            TINY_JSON.replace(b'"data": [1, 2]', b'"data": [[1], [-1' + b"0" * 400 + b"]]"),
            {},
            "input 'input': holds a number beyond FP32 range",
        ),
    ],
)
def test_bad_bodies_are_400_error_objects(
    client: httpx.Client, content: bytes, headers: dict[str, str], message: str
) -> None:
    r = client.post("/v2/models/tiny/infer", content=content, headers=headers)
    assert r.status_code == 400, r.text
    body = r.json()
    assert list(body) == ["error"]
    assert message in body["error"]


def test_unknown_model_and_endpoint_are_404_error_objects(client: httpx.Client) -> None:
    r = client.post("/v2/models/nope/infer", content=TINY_JSON)
    assert (r.status_code, list(r.json())) == (404, ["error"])
    r = client.get("/v2/models/tiny/config")
    assert r.status_code == 404
    assert r.json() == {"error": "/v2/models/tiny/config is not an endpoint of this server"}
    # v1 keeps its own error format.
    assert list(client.post("/v1/models/nope/predict", json={"inputs": [[1]]}).json()) == ["detail"]


def test_not_ready_is_503_with_retry_after(settings: Settings) -> None:
    # ASGITransport does not run the lifespan, so nothing loads: a pod's state while it starts.
    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return [
                await http.get("/v2/health/live"),
                await http.get("/v2/health/ready"),
                await http.post("/v2/models/tiny/infer", content=TINY_JSON),
            ]

    live, ready, infer = asyncio.run(calls())
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (503, {"ready": False})
    assert ready.headers["retry-after"] == "1"
    assert infer.status_code == 503
    assert infer.headers["retry-after"] == "1"
    assert infer.json() == {"error": "models are still loading"}


def test_openapi_documents_the_infer_body(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v2/models/{name}/versions/{version}/infer"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema["examples"][1]["parameters"] == {"n_samples": 1000, "seed": 7}
    assert {p["name"] for p in post["parameters"]} == {"name", "version"}
    assert "$ref" not in str(schema)
