"""The named output tensors of an answer, shared by every front door.

v1 sends them as JSON lists, v2 as tensors; both take them from here, so the two APIs serve
the same bits for the same model, inputs, ``n_samples`` and seed.
"""

from __future__ import annotations

import torch

from service.core.engine import MCResult
from service.core.model import ModelConfig

#: The eval answer's one output (float32, ``(rows, output_dim)``).
OUTPUT = "output"


def mc_outputs(config: ModelConfig, result: MCResult) -> dict[str, torch.Tensor]:
    """``mean``, ``variance``, ``std`` and the task's extras, float64 (``samples`` float32)."""
    variance = result.variance
    outputs = {"mean": result.mean, "variance": variance, "std": variance.sqrt()}
    if config.noise_variance is not None:
        noise = torch.tensor(config.noise_variance, dtype=torch.float64)
        outputs["predictive_variance"] = variance + noise
    if result.entropy is not None and result.mutual_information is not None:
        outputs["entropy"] = result.entropy
        outputs["mutual_information"] = result.mutual_information
    if result.samples is not None:
        outputs["samples"] = result.samples
    return outputs


def mc_output_names(config: ModelConfig) -> list[str]:
    """The outputs an MC answer of this model holds (``samples`` only when asked for)."""
    names = ["mean", "variance", "std"]
    if config.noise_variance is not None:
        names.append("predictive_variance")
    if config.task == "classification":
        names += ["entropy", "mutual_information"]
    return names
