"""Model definition: the config stored beside the weights, and the plain torch MLP it describes.

An MLP is ``n`` Linear layers; Linear ``i`` reads a dropout of its input with probability
``dropout_before(i)`` (the input dropout for ``i == 0``, else the dropout after hidden layer
``i - 1``) and, except for the last, is followed by its activation (one for every hidden
layer, or one each); a regression model may end in an output activation::

    x -> [Dropout p0] -> Linear0 -> act0 -> Dropout p1 -> Linear1 -> act1 -> ... -> Linear(n-1)
      -> [output activation]
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from torch import nn

from service.core.calibration import Calibration

Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

ActivationName = Literal["relu", "tanh", "gelu", "sigmoid", "silu", "leaky_relu", "elu", "identity"]


class Activation(BaseModel):
    """An activation with its parameters: ``leaky_relu``'s ``negative_slope``, ``elu``'s
    ``alpha``, ``gelu``'s ``approximate``; torch's defaults where absent."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: ActivationName
    negative_slope: FiniteFloat | None = None
    alpha: FiniteFloat | None = None
    approximate: Literal["none", "tanh"] | None = None

    @model_validator(mode="after")
    def _parameters_of_this_activation(self) -> Activation:
        for field, owner in (("negative_slope", "leaky_relu"), ("alpha", "elu")):
            if getattr(self, field) is not None and self.name != owner:
                raise ValueError(f"{field} is a parameter of {owner}, not of {self.name}")
        if self.approximate is not None and self.name != "gelu":
            raise ValueError(f"approximate is a parameter of gelu, not of {self.name}")
        return self

    @model_serializer(mode="wrap")
    def _without_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Only the parameters given: ``{"name": "elu", "alpha": 0.5}``."""
        return {k: v for k, v in handler(self).items() if v is not None}

    @property
    def spec(self) -> ActivationSpec:
        """The name alone when no parameter is given, else the activation."""
        has = self.negative_slope is not None or self.alpha is not None or self.approximate
        return self if has else self.name

    def module(self) -> nn.Module:
        """The torch module computing this activation."""
        match self.name:
            case "leaky_relu":
                return nn.LeakyReLU(0.01 if self.negative_slope is None else self.negative_slope)
            case "elu":
                return nn.ELU(1.0 if self.alpha is None else self.alpha)
            case "gelu":
                return nn.GELU(approximate=self.approximate or "none")
        return _PLAIN[self.name]()


_PLAIN: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}

#: An activation by name (torch's defaults), or with its parameters.
ActivationSpec = ActivationName | Activation


def as_activation(spec: ActivationSpec) -> Activation:
    return spec if isinstance(spec, Activation) else Activation(name=spec)


class Standardization(BaseModel):
    """Per-feature affine transform: ``z = (v - mean) / std``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mean: list[FiniteFloat]
    std: list[PositiveFloat]

    @model_validator(mode="after")
    def _same_length(self) -> Standardization:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        return self


class ModelConfig(BaseModel):
    """``config.json`` of a model folder: architecture, dropout, data transforms, provenance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    version: str = Field(min_length=1, max_length=64)
    task: Literal["regression", "classification"]
    input_dim: PositiveInt
    hidden: list[PositiveInt] = Field(description="Widths of the hidden layers (none: one Linear).")
    output_dim: PositiveInt
    activation: ActivationSpec | list[ActivationSpec] = Field(
        "relu", description="The activation of every hidden layer, or a list of one per layer."
    )
    output_activation: ActivationSpec | None = Field(
        None, description="Regression only: an activation after the last Linear layer."
    )
    dropout: list[Probability] = Field(description="Dropout p after each hidden layer.")
    input_dropout: Probability = 0.0
    dropout_scaling: Literal["inverted", "vanilla"] = "inverted"
    input_standardization: Standardization | None = None
    target_standardization: Standardization | None = None
    noise_variance: list[PositiveFloat] | None = Field(
        None,
        description="Regression only: aleatoric variance per output (tau^-1), target units; "
        "without it, MC answers carry no predictive_variance.",
    )
    labels: list[str] | None = Field(None, description="Classification only: one per output.")
    feature_names: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, description="One name per input, in order (the playground labels its fields)."
    )
    example: list[FiniteFloat] | None = Field(
        None, description="One input row to start from (the playground prefills it)."
    )
    weights_file: str = Field("weights.safetensors", pattern=r"^[A-Za-z0-9_.-]+\.safetensors$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    calibration: Calibration | None = Field(
        None, description="Held-out conformal scores, temperature and OOD reference."
    )
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if len(self.dropout) != len(self.hidden):
            raise ValueError(
                f"dropout has {len(self.dropout)} entries, hidden has {len(self.hidden)}"
            )
        if self.input_standardization and len(self.input_standardization.mean) != self.input_dim:
            raise ValueError("input_standardization must have input_dim entries")
        if self.target_standardization and len(self.target_standardization.mean) != self.output_dim:
            raise ValueError("target_standardization must have output_dim entries")
        if isinstance(self.activation, list) and len(self.activation) != len(self.hidden):
            raise ValueError(
                f"activation has {len(self.activation)} entries, hidden has {len(self.hidden)}"
            )
        if self.task == "regression":
            if self.noise_variance is not None and len(self.noise_variance) != self.output_dim:
                raise ValueError("noise_variance needs output_dim entries")
            if self.labels is not None:
                raise ValueError("labels are for classification models")
        else:
            if self.labels is None or len(self.labels) != self.output_dim:
                raise ValueError("classification needs labels with output_dim entries")
            if self.target_standardization is not None or self.noise_variance is not None:
                raise ValueError("classification takes no target_standardization or noise_variance")
            if self.output_activation is not None:
                raise ValueError("classification takes no output_activation: softmax ends it")
        for field in ("feature_names", "example"):
            given = getattr(self, field)
            if given is not None and len(given) != self.input_dim:
                raise ValueError(f"{field} needs input_dim ({self.input_dim}) entries")
        cal = self.calibration
        if cal is not None and cal.ood_reference is not None:
            want = self.output_dim if self.task == "regression" else 1
            if len(cal.ood_reference) != want:
                raise ValueError(f"calibration.ood_reference needs {want} entries")
        return self

    @property
    def activations(self) -> list[Activation]:
        """The activation after each hidden layer."""
        if isinstance(self.activation, list):
            return [as_activation(a) for a in self.activation]
        return [as_activation(self.activation)] * len(self.hidden)

    @property
    def widths(self) -> list[int]:
        """Input width of every Linear layer, then the output width."""
        return [self.input_dim, *self.hidden, self.output_dim]

    @property
    def n_linear(self) -> int:
        return len(self.hidden) + 1

    def dropout_before(self, i: int) -> float:
        """Dropout probability applied to the input of Linear ``i``."""
        return self.input_dropout if i == 0 else self.dropout[i - 1]

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected tensor names and shapes in the safetensors file."""
        w = self.widths
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(self.n_linear):
            shapes[weight_name(i)] = (w[i + 1], w[i])
            shapes[bias_name(i)] = (w[i + 1],)
        return shapes


def weight_name(i: int) -> str:
    return f"linear{i}.weight"


def bias_name(i: int) -> str:
    return f"linear{i}.bias"


class VanillaDropout(nn.Module):
    """Dropout as first published (Srivastava et al., 2014): in training, multiply by an
    unscaled Bernoulli(1-p) mask; in eval, multiply by ``1 - p`` so that each unit's expected
    input matches training. ``nn.Dropout`` (inverted) moves that factor into training instead.

    The training mask is drawn as ``F.dropout`` draws its own, ``bernoulli_(1 - p)`` from the
    global generator, so a seed gives this layer the same mask as ``nn.Dropout`` (unscaled).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x * (1.0 - self.p)
        if self.p == 0.0:
            return x  # as F.dropout: p = 0 draws no random number, so later masks keep the seed's
        return x * torch.empty_like(x).bernoulli_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def build_sequential(config: ModelConfig) -> nn.Sequential:
    """The model as a plain ``nn.Sequential``, with the config's dropout scaling."""
    dropout = VanillaDropout if config.dropout_scaling == "vanilla" else nn.Dropout
    w = config.widths
    acts = config.activations
    layers: list[nn.Module] = []
    for i in range(config.n_linear):
        layers.append(dropout(config.dropout_before(i)))
        layers.append(nn.Linear(w[i], w[i + 1]))
        if i < config.n_linear - 1:
            layers.append(acts[i].module())
    if config.output_activation is not None:
        layers.append(as_activation(config.output_activation).module())
    return nn.Sequential(*layers)


def linears(module: nn.Sequential) -> list[nn.Linear]:
    return [m for m in module if isinstance(m, nn.Linear)]


def sequential_to_tensors(module: nn.Sequential) -> dict[str, torch.Tensor]:
    """Weights of a ``build_sequential`` module under the repository's tensor names."""
    tensors: dict[str, torch.Tensor] = {}
    for i, lin in enumerate(linears(module)):
        tensors[weight_name(i)] = lin.weight.detach().contiguous().clone()
        tensors[bias_name(i)] = lin.bias.detach().contiguous().clone()
    return tensors


def load_into_sequential(module: nn.Sequential, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, lin in enumerate(linears(module)):
            lin.weight.copy_(tensors[weight_name(i)])
            lin.bias.copy_(tensors[bias_name(i)])
