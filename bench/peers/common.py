"""The shipped concrete model as a plain ``nn.Sequential``, loaded the way a user of a peer
server would (torch and safetensors only, no dropout-service import), and MC dropout as a
user would write it: ``train()``, ``x.repeat(T, 1)``, mean and variance."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "concrete"


class Standardised(nn.Module):
    """The network on standardised inputs and targets, as the model folder describes."""

    def __init__(self, net: nn.Sequential, config: dict) -> None:  # type: ignore[type-arg]
        super().__init__()
        self.net = net
        sx, sy = config["input_standardization"], config["target_standardization"]
        self.register_buffer("x_mean", torch.tensor(sx["mean"], dtype=torch.float32))
        self.register_buffer("x_std", torch.tensor(sx["std"], dtype=torch.float32))
        self.register_buffer("y_mean", torch.tensor(sy["mean"], dtype=torch.float32))
        self.register_buffer("y_std", torch.tensor(sy["std"], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.x_mean) / self.x_std) * self.y_std + self.y_mean


def load(folder: Path = MODEL_DIR) -> nn.Module:
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / config["weights_file"])
    widths = [config["input_dim"], *config["hidden"], config["output_dim"]]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        p = config["input_dropout"] if i == 0 else config["dropout"][i - 1]
        if p:
            layers.append(nn.Dropout(p))
        linear = nn.Linear(widths[i], widths[i + 1])
        linear.weight.data = tensors[f"linear{i}.weight"]
        linear.bias.data = tensors[f"linear{i}.bias"]
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = Standardised(nn.Sequential(*layers), config)
    model.eval()
    return model


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def predict_mc(model: nn.Module, x: torch.Tensor, n_samples: int) -> tuple[torch.Tensor, ...]:
    """Mean and variance of ``n_samples`` passes with dropout on."""
    model.train()
    try:
        with torch.no_grad():
            samples = model(x.repeat(n_samples, 1)).reshape(n_samples, len(x), -1)
    finally:
        model.eval()
    return samples.mean(0), samples.var(0)
