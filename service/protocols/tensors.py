"""Open Inference Protocol tensors to and from torch: JSON ``data`` and binary tensor data.

The binary tensor data extension (Triton's ``binary_tensor_data``): a body is a JSON header
followed by raw tensor bytes, and the ``Inference-Header-Content-Length`` HTTP header gives
the header's length. Each binary tensor states its byte count in
``parameters.binary_data_size``; the chunks follow the header in tensor order, row-major and
little-endian. Responses use the same layout. No HTTP framework here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from service.core.errors import InvalidInput
from service.serving.dataplane import SMALL_INPUT_VALUES

HEADER_LENGTH = "Inference-Header-Content-Length"

#: Datatypes this service reads and writes, with their little-endian numpy layout.
DATATYPES: dict[str, tuple[torch.dtype, str]] = {
    "FP32": (torch.float32, "<f4"),
    "FP64": (torch.float64, "<f8"),
    "BOOL": (torch.bool, "|b1"),  # answers only (flags, prediction sets): one byte each
}
_NAMES = {dtype: name for name, (dtype, _) in DATATYPES.items()}
#: Exact types: JSON true/false arrive as bool, which is not a number.
_NUMBERS = frozenset((int, float))


def _bad(where: str, msg: str) -> InvalidInput:
    return InvalidInput([where], f"{where}: {msg}")


def datatype_of(t: torch.Tensor) -> str:
    return _NAMES[t.dtype]


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """``(json header, binary tail)``; without the HTTP header the whole body is JSON."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise _bad(
            HEADER_LENGTH,
            f"{header_length[:32]!r} is not a byte count within the {len(body)}-byte body",
        )
    n = int(header_length)
    return body[:n], body[n:]


def binary_chunks(sizes: Sequence[int | None], tail: bytes) -> list[bytes | None]:
    """Cut ``tail`` into the chunks of the tensors that carry ``binary_data_size`` (else None)."""
    chunks: list[bytes | None] = []
    offset = 0
    for size in sizes:
        if size is None:
            chunks.append(None)
            continue
        if offset + size > len(tail):
            raise _bad("binary_data_size", f"tensors claim more than the {len(tail)} binary bytes")
        chunks.append(tail[offset : offset + size])
        offset += size
    if offset != len(tail):
        raise _bad(
            "binary_data_size",
            f"tensors claim {offset} binary bytes but the body holds {len(tail)} after the header",
        )
    return chunks


def from_bytes(raw: bytes, shape: Sequence[int], datatype: str, where: str) -> np.ndarray:
    """An array of ``shape`` from little-endian row-major bytes, in native byte order."""
    dtype, layout = DATATYPES[datatype]
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != count * itemsize:
        raise _bad(
            where,
            f"{len(raw)} bytes of binary data; shape {list(shape)} of {datatype} "
            f"needs {count * itemsize}",
        )
    # A native-order copy, writable (the request bytes are read-only).
    array = np.frombuffer(raw, dtype=layout).astype(dtype=layout[1:], copy=True)
    return array.reshape(tuple(shape))


def from_json(data: Any, shape: Sequence[int], datatype: str, where: str) -> np.ndarray:
    """An array of ``shape`` from JSON numbers, nested or flat, in row-major order.

    JSON numbers are doubles: they stay float64 here, whatever ``datatype`` says, and are
    rounded to it once, where the data plane takes every input (as v1's JSON rows are), so
    the same numbers in v1 and v2 JSON compute on the same bits.
    """
    flat = _flat_numbers(data, shape, where)
    try:
        values = np.array(flat, dtype=np.float64)  # several times faster than torch.tensor
    except OverflowError:  # an integer past float64's range (JSON allows any length)
        raise _bad(where, f"holds a number beyond {datatype} range") from None
    return values.reshape(tuple(shape))


def rows_from_json(
    data: Any, shape: Sequence[int], datatype: str, where: str
) -> list[list[float]] | np.ndarray:
    """A ``(rows, width)`` input from JSON numbers: a few values as rows of Python floats,
    which the data plane checks and converts in one torch call as it does v1's rows (a
    numpy array costs a small request several calls more), more as ``from_json``'s array.
    The rounding to float32 is the same either way."""
    rows, width = shape
    if rows * width > SMALL_INPUT_VALUES:
        return from_json(data, shape, datatype, where)
    try:
        flat = [float(v) for v in _flat_numbers(data, shape, where)]
    except OverflowError:  # an integer past float64's range
        raise _bad(where, f"holds a number beyond {datatype} range") from None
    return [flat[i : i + width] for i in range(0, rows * width, width)]


def _flat_numbers(data: Any, shape: Sequence[int], where: str) -> list[int | float]:
    """The JSON numbers of ``data``, nested or flat, as one row-major list of ``shape``'s
    size."""
    flat = data if isinstance(data, list) else [data]
    # One scan of the types per nesting level, in C (map and set): flat data (what clients
    # send) costs a single pass; nested rows are flattened a level at a time.
    while not (kinds := set(map(type, flat))) <= _NUMBERS:
        odd = sorted(k.__name__ for k in kinds - _NUMBERS - {list})
        if odd:
            raise _bad(where, f"holds {odd[0]} where a number belongs")
        flat = [w for v in flat for w in (v if type(v) is list else (v,))]
    count = math.prod(shape)
    if len(flat) != count:
        raise _bad(where, f"{len(flat)} values; shape {list(shape)} needs {count}")
    return flat


def to_bytes(t: torch.Tensor) -> bytes:
    """Little-endian row-major bytes of ``t``."""
    layout = DATATYPES[datatype_of(t)][1]
    return np.ascontiguousarray(t.numpy(), dtype=layout).tobytes()


def to_json(t: torch.Tensor) -> list[float] | list[bool]:
    """Row-major flat values; ``tolist`` gives each float's exact double, as v1 sends it
    (and BOOL's true and false). Rows and vectors are flattened in Python: a numpy view
    and its reshape cost a one-row answer more than that, their code cold on a served
    request."""
    if t.dim() == 2:
        return [v for row in t.tolist() for v in row]
    values: list[float] | list[bool] = (
        t.tolist() if t.dim() == 1 else t.numpy().reshape(-1).tolist()
    )
    return values
