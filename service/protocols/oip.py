"""The Open Inference Protocol's rules, whatever carries them (REST v2 here, gRPC beside it):
the one input tensor, the outputs a model answers with, the request parameters that select
Monte-Carlo dropout, and the outputs a request picks.

Eval answers output ``output`` (FP32, as the engine computes it). Naming any of the
parameters ``n_samples``, ``seed`` or ``return_samples`` selects MC dropout, answered as
FP64 tensors ``mean``, ``variance``, ``std`` and the task's extras: the engine's float64
summaries, so every door carries the same bits as v1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.core.errors import InvalidInput
from service.core.model import ModelConfig
from service.serving.dataplane import MCParams
from service.serving.outputs import OUTPUT, mc_output_names

INPUT = "input"
INPUT_DATATYPE = "FP32"
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "pytorch"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # -1: any number (rows, samples)


def input_specs(config: ModelConfig) -> list[TensorSpec]:
    return [TensorSpec(INPUT, INPUT_DATATYPE, [-1, config.input_dim])]


def output_specs(config: ModelConfig) -> list[TensorSpec]:
    """``output`` for eval; the others for MC requests."""
    rows, out = -1, config.output_dim
    specs = [TensorSpec(OUTPUT, "FP32", [rows, out])]
    for name in mc_output_names(config):
        per_row = name in ("entropy", "mutual_information")
        specs.append(TensorSpec(name, "FP64", [rows] if per_row else [rows, out]))
    specs.append(TensorSpec("samples", "FP32", [-1, rows, out]))
    return specs


def mc_params(
    n_samples: int | None, seed: int | None, return_samples: bool | None
) -> MCParams | None:
    """MC when any of the three is named; None (eval) when none is."""
    if n_samples is None and seed is None and return_samples is None:
        return None
    return MCParams(n_samples, seed, bool(return_samples))


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
        hint = "; MC outputs need parameter n_samples, seed or return_samples"
    return f"output {name[:64]!r} is not in this answer: {available}{hint}"
