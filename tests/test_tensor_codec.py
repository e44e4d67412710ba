"""The tensor codec without HTTP, checked against tritonclient's own encoder and decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.http as triton

from service.core.errors import InvalidInput
from service.protocols.http.schemas_v2 import InferenceRequest
from service.protocols.http.v2 import input_tensor
from service.protocols.tensors import (
    binary_chunks,
    datatype_of,
    from_bytes,
    from_json,
    rows_from_json,
    split_body,
    to_bytes,
    to_json,
)
from service.serving.dataplane import SMALL_INPUT_VALUES
from tests.helpers import tiny_regression_config


def test_split_body_without_header_length_is_all_json() -> None:
    assert split_body(b'{"a": 1}', None) == (b'{"a": 1}', b"")


def test_split_body_cuts_at_the_header_length() -> None:
    assert split_body(b"{}\x01\x02", "2") == (b"{}", b"\x01\x02")


@pytest.mark.parametrize("length", ["5", "-1", "x", "", "1e3"])
def test_split_body_refuses_a_bad_header_length(length: str) -> None:
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        split_body(b"{}\x01", length)


def test_binary_chunks_follow_tensor_order() -> None:
    assert binary_chunks([2, None, 3], b"abcde") == [b"ab", None, b"cde"]


@pytest.mark.parametrize(("sizes", "tail"), [([4], b"abc"), ([2], b"abc"), ([None], b"a")])
def test_binary_chunks_must_account_for_every_byte(sizes: list[int | None], tail: bytes) -> None:
    with pytest.raises(InvalidInput, match="binary_data_size"):
        binary_chunks(sizes, tail)


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_bytes_round_trip_is_little_endian_row_major(datatype: str) -> None:
    dtype = np.float32 if datatype == "FP32" else np.float64
    a = np.arange(6, dtype=dtype).reshape(2, 3) / 7
    raw = a.astype(a.dtype.newbyteorder("<")).tobytes(order="C")
    decoded = from_bytes(raw, [2, 3], datatype, "x")
    assert decoded.dtype == dtype
    assert np.array_equal(decoded, a)
    t = torch.from_numpy(decoded)
    assert to_bytes(t) == raw
    assert datatype_of(t) == datatype


def test_from_bytes_refuses_a_length_that_does_not_fit_the_shape() -> None:
    with pytest.raises(InvalidInput, match="needs 24"):
        from_bytes(b"\x00" * 20, [2, 3], "FP32", "input 'input'")


@pytest.mark.parametrize("data", [[1, 2.5, 3, 4], [[1, 2.5], [3, 4]], [[[1], [2.5]], [3, [4]]]])
def test_from_json_takes_flat_or_nested_rows(data: list[object]) -> None:
    decoded = from_json(data, [2, 2], "FP32", "x")  # type: ignore[arg-type]
    assert decoded.tolist() == [[1.0, 2.5], [3.0, 4.0]]
    assert decoded.dtype == np.float64  # JSON's doubles, rounded once by the data plane


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2, 3], "3 values"),
        ([[1, 2], [3]], "3 values"),
        ([1, True, 3, 4], "bool"),
        ([[1, 2], [3, "4"]], "str"),
        ([[1, 2], [3, None]], "NoneType"),
        (None, "NoneType"),
        ({"a": 1}, "dict"),
    ],
)
def test_from_json_refuses_wrong_counts_and_non_numbers(data: object, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        from_json(data, [2, 2], "FP32", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [[1, 2.5, 3, 4], [[1, 2.5], [3, 4]], [[[1], [2.5]], [3, [4]]]])
def test_rows_from_json_gives_a_few_values_as_float_rows(data: list[object]) -> None:
    rows = rows_from_json(data, [2, 2], "FP32", "x")  # type: ignore[arg-type]
    assert rows == [[1.0, 2.5], [3.0, 4.0]]
    assert all(type(v) is float for row in rows for v in row)  # type: ignore[union-attr]


def test_rows_from_json_gives_many_values_as_an_array() -> None:
    width = 8
    n = SMALL_INPUT_VALUES // width + 1
    values = [float(i) / 3 for i in range(n * width)]
    many = rows_from_json(values, [n, width], "FP32", "x")
    assert isinstance(many, np.ndarray)
    assert many.tobytes() == np.array(values).reshape(n, width).tobytes()


@pytest.mark.parametrize("data", [[1, 2, 3], [1, True, 3, 4], [[1, 2], [3, "4"]], None])
def test_rows_from_json_refuses_what_from_json_refuses(data: object) -> None:
    with pytest.raises(InvalidInput) as rows_error:
        rows_from_json(data, [2, 2], "FP32", "x")
    with pytest.raises(InvalidInput) as array_error:
        from_json(data, [2, 2], "FP32", "x")
    assert str(rows_error.value) == str(array_error.value)


def test_an_integer_past_float64_is_refused_either_way() -> None:
    for shape in ([2, 2], [SMALL_INPUT_VALUES, 2]):
        data = [1] * (shape[0] * shape[1] - 1) + [10**400]
        with pytest.raises(InvalidInput, match="beyond FP32 range"):
            rows_from_json(data, shape, "FP32", "x")


def test_to_json_is_flat_and_exact() -> None:
    t = torch.tensor([[0.1, 0.2]], dtype=torch.float32)
    assert to_json(t) == [float(np.float32(0.1)), float(np.float32(0.2))]


@pytest.mark.parametrize(
    "t",
    [
        torch.randn(5, dtype=torch.float64),
        torch.randn(3, 4),
        torch.randn(2, 3, 4),
        torch.rand(3, 2) > 0.5,
    ],
    ids=["vector", "rows", "samples", "flags"],
)
def test_to_json_is_row_major_with_exact_values_and_types(t: torch.Tensor) -> None:
    values = to_json(t)
    expected = t.numpy().reshape(-1).tolist()
    assert values == expected
    assert [type(v) for v in values] == [type(v) for v in expected]


def test_decodes_the_request_tritonclient_encodes() -> None:
    config = tiny_regression_config(input_dim=3)
    x = np.array([[1.5, -2.25, 3.0], [0.1, 1e-30, -7.0]], dtype=np.float32)
    for binary in (True, False):
        inp = triton.InferInput("input", [2, 3], "FP32").set_data_from_numpy(x, binary)
        body, json_size = triton.InferenceServerClient.generate_request_body(
            [inp], parameters={"seed": 7}
        )
        assert (json_size is not None) == binary
        header, tail = split_body(body, None if json_size is None else str(json_size))
        request = InferenceRequest.model_validate_json(header)
        decoded = input_tensor(config, request, tail)
        # Binary data comes as an array; a few JSON values as rows of Python floats.
        assert isinstance(decoded, np.ndarray) == binary
        assert np.asarray(decoded).astype(np.float32).tobytes() == x.tobytes()
        assert request.parameters is not None
        assert request.parameters.seed == 7


def test_tritonclient_decodes_what_the_codec_encodes() -> None:
    mean = torch.tensor([[1 / 3, 2 / 3]], dtype=torch.float64)
    output = torch.tensor([[0.1, 0.7]], dtype=torch.float32)
    chunk = to_bytes(mean)
    header = (
        '{"model_name":"m","outputs":['
        f'{{"name":"mean","shape":[1,2],"datatype":"FP64","parameters":{{"binary_data_size":{len(chunk)}}}}},'
        f'{{"name":"output","shape":[1,2],"datatype":"FP32","data":{to_json(output)}}}]}}'
    ).encode()
    result = triton.InferResult.from_response_body(header + chunk, header_length=len(header))
    assert result.as_numpy("mean").tobytes() == mean.numpy().tobytes()
    assert result.as_numpy("output").tobytes() == output.numpy().tobytes()
