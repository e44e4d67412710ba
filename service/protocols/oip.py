"""The Open Inference Protocol's rules, whatever carries them (REST v2 here, gRPC beside it):
the one input tensor, the outputs a model answers with, the request parameters that select
Monte-Carlo dropout, and the outputs a request picks.

Eval answers output ``output`` (FP32, as the engine computes it). Naming any of the
parameters ``n_samples``, ``seed``, ``return_samples``, ``coverage`` or ``target_se`` selects
MC dropout, answered as FP64 tensors ``mean``, ``variance``, ``std``,
``mc_standard_error`` and the task's and the calibration's extras (flags BOOL): the data
plane's tensors, so every door carries the same bits as v1.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import SecretStr

from service.core.errors import InvalidInput
from service.core.model import ModelConfig
from service.serving.dataplane import InferAnswer, MCParams
from service.serving.outputs import OUTPUT, mc_output_names

INPUT = "input"
INPUT_DATATYPE = "FP32"
EXTENSIONS = ["binary_tensor_data"]
#: The repository extension (model control): ``/v2/repository`` and the gRPC calls.
REPOSITORY = "model_repository"
PLATFORM = "pytorch"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # -1: any number (rows, samples)


def input_specs(config: ModelConfig) -> list[TensorSpec]:
    return [TensorSpec(INPUT, INPUT_DATATYPE, [-1, config.input_dim])]


#: MC outputs with one value per row.
_PER_ROW = frozenset(("entropy", "mutual_information", "ood_score", "out_of_distribution"))


def output_specs(config: ModelConfig) -> list[TensorSpec]:
    """``output`` for eval; the others for MC requests (those of ``coverage`` and
    ``return_samples`` when asked for)."""
    rows, out = -1, config.output_dim
    specs = [TensorSpec(OUTPUT, "FP32", [rows, out])]
    names = mc_output_names(config)
    if config.task == "regression":
        names += ["interval_lower", "interval_upper"]
    else:
        names.append("prediction_sets")
    for name in names:
        datatype = "BOOL" if name in ("out_of_distribution", "prediction_sets") else "FP64"
        specs.append(TensorSpec(name, datatype, [rows] if name in _PER_ROW else [rows, out]))
    specs.append(TensorSpec("samples", "FP32", [-1, rows, out]))
    return specs


def mc_params(
    n_samples: int | None,
    seed: int | None,
    return_samples: bool | None,
    coverage: float | None = None,
    target_se: float | None = None,
) -> MCParams | None:
    """MC when any of them is named; None (eval) when none is."""
    named = (n_samples, seed, return_samples, coverage, target_se)
    if all(v is None for v in named):
        return None
    return MCParams(n_samples, seed, bool(return_samples), coverage, target_se)


def answer_parameters(answer: InferAnswer) -> dict[str, int | float | str]:
    """An MC answer's response parameters: the passes drawn and the seed (send it back to
    replay), and how a coverage was met."""
    assert answer.n_samples is not None
    assert answer.seed is not None
    params: dict[str, int | float | str] = {"n_samples": answer.n_samples, "seed": answer.seed}
    if answer.coverage is not None and answer.coverage_method is not None:
        params["coverage"] = answer.coverage
        params["coverage_method"] = answer.coverage_method
    return params


def check_input(config: ModelConfig, names: Sequence[str], datatype: str, shape: list[int]) -> str:
    """Refuse anything but one ``input`` of FP32 ``[rows >= 1, input_dim]``; return how to
    name it in an error about its data."""
    if len(names) != 1 or names[0] != INPUT:
        shown = [n[:64] for n in names]
        raise InvalidInput(
            ["inputs"], f"inputs {shown}: model {config.name!r} takes one input, {INPUT!r}"
        )
    where = f"input {INPUT!r}"
    if datatype != INPUT_DATATYPE:
        raise InvalidInput(
            ["inputs", 0, "datatype"],
            f"{where} has datatype {datatype[:16]!r}; model {config.name!r} takes {INPUT_DATATYPE}",
        )
    if len(shape) != 2 or shape[0] < 1 or shape[1] != config.input_dim:
        raise InvalidInput(
            ["inputs", 0, "shape"],
            f"{where} has shape {shape[:8]}; model {config.name!r} takes "
            f"[rows >= 1, {config.input_dim}]",
        )
    return where


def pick_outputs(
    outputs: dict[str, torch.Tensor], requested: Sequence[str] | None
) -> list[tuple[str, torch.Tensor]]:
    """The outputs a request names, in its order; all of them when it names none."""
    if not requested:
        return list(outputs.items())
    picked = []
    for name in requested:
        t = outputs.get(name)
        if t is None:
            raise InvalidInput(["outputs"], unknown_output(name, list(outputs)))
        picked.append((name, t))
    return picked


def unknown_output(name: str, available: list[str]) -> str:
    hint = ""
    if name == "samples":
        hint = "; set parameter return_samples to true"
    elif name != OUTPUT and OUTPUT in available:
        hint = "; MC outputs need parameter n_samples, seed, return_samples, coverage or target_se"
    return f"output {name[:64]!r} is not in this answer: {available}{hint}"


def admin_refusal(token: SecretStr | None, authorization: str) -> tuple[int, str] | None:
    """Why a model-control call is refused, as an HTTP status and a message, or None when
    ``authorization`` (``Bearer <token>``) carries the admin token. Compared in constant time;
    403 when no token is configured, 401 for a missing or wrong one."""
    if token is None:
        return 403, "model control is off: set DROPOUT_ADMIN_TOKEN to turn it on"
    scheme, _, given = authorization.partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        return 401, "model control needs Authorization: Bearer <token>"
    return None


def describe(errors: Sequence[Any], prefix: str = "") -> str:
    """Schema errors as one line per bad field, ``a.0.b: message``, never echoing the
    offending value (it may be huge, or a NaN)."""
    head = [prefix] if prefix else []
    return "; ".join(
        f"{'.'.join(str(p) for p in [*head, *e['loc']]) or 'body'}: {e['msg']}" for e in errors
    )
