"""Bring your own model: a trained torch module in, a model folder out.

``save_torch_model`` reads a chain of ``nn.Linear``, activation and ``nn.Dropout`` layers
(an ``nn.Sequential``, nested or not) and writes the folder the service loads: a config
that describes every layer, the weights as safetensors, and a card. Anything the engine
cannot serve exactly as torch computes it is refused with a ``ValueError`` naming the layer
and why. ``read_architecture`` rebuilds such a module from its ``repr`` (what
``dropout-service import`` reads from a file), without running any code from the file.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from service.core.model import (
    Activation,
    ModelConfig,
    Standardization,
    VanillaDropout,
    bias_name,
    weight_name,
)
from service.core.repository import save_model

Task = Literal["regression", "classification"]
Numbers = Sequence[float] | torch.Tensor

#: Activations f with f(c x) = c f(x) for c >= 0: dropout before them equals dropout after.
_HOMOGENEOUS = {"relu", "leaky_relu", "identity"}

#: Modules that are refused, with the reason a user can act on.
_REFUSED = {
    "BatchNorm": "its running statistics and train/eval switch are not served; fold it into "
    "the Linear layer next to it, or train without it",
    "LayerNorm": "layer normalisation is not served; train without it",
    "AlphaDropout": "alpha dropout keeps a self-normalising mean and variance with noise other "
    "than Bernoulli masks, which the engine does not draw",
    "FeatureAlphaDropout": "alpha dropout is not Bernoulli masking, which the engine draws",
    "Dropout1d": "channel dropout drops whole feature maps, not units",
    "Dropout2d": "channel dropout drops whole feature maps, not units",
    "Dropout3d": "channel dropout drops whole feature maps, not units",
}


def _activation(module: nn.Module) -> Activation | None:
    """The activation ``module`` computes, or None if it is not one the engine serves."""
    match module:
        case nn.ReLU():
            return Activation(name="relu")
        case nn.Tanh():
            return Activation(name="tanh")
        case nn.Sigmoid():
            return Activation(name="sigmoid")
        case nn.SiLU():
            return Activation(name="silu")
        case nn.GELU():
            return Activation(name="gelu", approximate=module.approximate)
        case nn.LeakyReLU():
            return Activation(name="leaky_relu", negative_slope=module.negative_slope)
        case nn.ELU():
            return Activation(name="elu", alpha=module.alpha)
    return None


def _leaves(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    """The layers of ``module`` in call order, nested ``nn.Sequential`` flattened, each with
    its path (``3.1``). Only exact ``nn.Sequential`` is walked: a subclass may override
    ``forward``."""
    if type(module) is nn.Sequential:
        for key, child in module.named_children():
            yield from _leaves(child, f"{path}.{key}" if path else key)
    else:
        yield path or "(the module)", module


@dataclass
class _Chain:
    """The layers read so far: Linear layers, and what stands before and after each."""

    linears: list[nn.Linear] = field(default_factory=list)
    dropout_before: list[float] = field(default_factory=list)  # p before each Linear
    activations: list[Activation] = field(default_factory=list)  # after each Linear but the last
    scaling: str | None = None
    pending_dropout: tuple[str, float] | None = None
    pending_activation: tuple[str, Activation] | None = None
    softmax: str | None = None

    def dropout(self, where: str, p: float, scaling: str) -> None:
        if self.pending_dropout is not None:
            raise _refuse(where, "two dropout layers in a row (their masks would multiply)")
        if self.scaling is not None and scaling != self.scaling:
            raise _refuse(where, "inverted and vanilla dropout in one model")
        self.scaling = scaling
        self.pending_dropout = (where, p)

    def activation(self, where: str, act: Activation) -> None:
        if not self.linears:
            raise _refuse(where, "an activation before the first Linear layer is not served")
        if self.pending_activation is not None:
            raise _refuse(where, "two activations in a row")
        if self.pending_dropout is not None and act.name not in _HOMOGENEOUS:
            raise _refuse(
                where,
                f"dropout before {act.name}: the engine applies dropout after the activation, "
                f"which differs for {act.name} (it does not for relu, leaky_relu, identity)",
            )
        self.pending_activation = (where, act)

    def linear(self, where: str, layer: nn.Linear) -> None:
        if self.linears and self.linears[-1].out_features != layer.in_features:
            raise _refuse(
                where,
                f"it takes {layer.in_features} inputs, but the layer before gives "
                f"{self.linears[-1].out_features}",
            )
        if self.linears:
            act = self.pending_activation
            self.activations.append(act[1] if act else Activation(name="identity"))
        self.dropout_before.append(self.pending_dropout[1] if self.pending_dropout else 0.0)
        self.linears.append(layer)
        self.pending_dropout = self.pending_activation = None


def _refuse(where: str, why: str) -> ValueError:
    return ValueError(f"layer {where}: {why}")


def read_chain(module: nn.Module, task: Task) -> _Chain:
    """Walk ``module``'s layers into a chain the engine serves, or refuse the first that is
    not."""
    chain = _Chain()
    leaves = list(_leaves(module, ""))
    for n, (where, layer) in enumerate(leaves):
        kind = type(layer).__name__
        last = n == len(leaves) - 1
        if type(layer) is nn.Linear:
            chain.linear(where, layer)
        elif type(layer) is nn.Dropout:
            chain.dropout(where, float(layer.p), "inverted")
        elif type(layer) is VanillaDropout:
            chain.dropout(where, float(layer.p), "vanilla")
        elif (act := _activation(layer)) is not None and type(layer).__module__.startswith(
            "torch.nn"
        ):
            chain.activation(where, act)
        elif type(layer) is nn.Identity:
            pass
        elif type(layer) is nn.Flatten:
            if (layer.start_dim, layer.end_dim) != (1, -1):
                raise _refuse(where, "only Flatten(start_dim=1, end_dim=-1) is served")
        elif type(layer) in (nn.Softmax, nn.LogSoftmax):
            if task != "classification" or not last or layer.dim not in (1, -1):
                raise _refuse(
                    where,
                    f"{kind} is served only as the last layer of a classifier, over classes",
                )
            chain.softmax = kind
        else:
            reason = next((why for name, why in _REFUSED.items() if kind.startswith(name)), None)
            raise _refuse(
                where,
                f"{kind}: "
                + (
                    reason
                    or "not a layer this service serves (a custom module's forward may do "
                    "anything; build the model as nn.Sequential of Linear, activation and "
                    "Dropout layers)"
                ),
            )
    if not chain.linears:
        raise ValueError("the module has no Linear layer")
    if chain.pending_dropout is not None:
        raise _refuse(chain.pending_dropout[0], "dropout after the last Linear layer is not served")
    return chain


def _floats(values: Numbers | float | None, n: int, what: str) -> list[float] | None:
    if values is None:
        return None
    flat = torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist()
    if len(flat) == 1 and n > 1:
        flat = flat * n
    if len(flat) != n:
        raise ValueError(f"{what} has {len(flat)} values; the model needs {n}")
    return flat


def _standardization(
    mean: Numbers | None, std: Numbers | None, n: int, what: str
) -> Standardization | None:
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError(f"{what}_mean and {what}_std go together")
    mean_, std_ = _floats(mean, n, f"{what}_mean"), _floats(std, n, f"{what}_std")
    return Standardization(mean=mean_ or [], std=std_ or [])


def save_torch_model(
    module: nn.Module,
    folder: Path | str,
    *,
    name: str,
    task: Task,
    version: str = "1",
    labels: Sequence[str] | None = None,
    input_mean: Numbers | None = None,
    input_std: Numbers | None = None,
    target_mean: Numbers | None = None,
    target_std: Numbers | None = None,
    noise_variance: Numbers | float | None = None,
    source: str = "save_torch_model",
) -> ModelConfig:
    """Write ``module`` as a model folder the service serves; return its config.

    The served eval answer is ``module.eval()(x)`` with ``x`` standardised by ``input_mean``
    and ``input_std`` and the output mapped back by ``target_mean`` and ``target_std``; a
    classifier's is the softmax of the module's logits (a final ``Softmax`` or
    ``LogSoftmax`` is left to the service). MC dropout draws from the module's own dropout
    probabilities. ``noise_variance`` (regression, target units) adds the aleatoric part to
    ``predictive_variance``; without it MC answers carry none.
    """
    folder = Path(folder)
    if folder.name != name:
        raise ValueError(f"the folder must be named after the model: {folder.name!r} != {name!r}")
    chain = read_chain(module, task)
    if chain.pending_activation is not None and task == "classification":
        raise _refuse(
            chain.pending_activation[0],
            "an activation after a classifier's last Linear layer: the service applies softmax "
            "to the logits itself",
        )
    first, last = chain.linears[0], chain.linears[-1]
    acts = chain.activations
    out_act = chain.pending_activation[1] if chain.pending_activation else None
    output_dim = last.out_features
    if task == "classification" and (labels is None or len(labels) != output_dim):
        labels = [str(i) for i in range(output_dim)] if labels is None else list(labels)
        if len(labels) != output_dim:
            raise ValueError(
                f"labels has {len(labels)} entries; the model has {output_dim} outputs"
            )
    config = ModelConfig(
        name=name,
        version=version,
        task=task,
        input_dim=first.in_features,
        hidden=[layer.out_features for layer in chain.linears[:-1]],
        output_dim=output_dim,
        activation=acts[0].spec
        if acts and all(a == acts[0] for a in acts)
        else [a.spec for a in acts],
        output_activation=out_act.spec if out_act else None,
        dropout=chain.dropout_before[1:],
        input_dropout=chain.dropout_before[0],
        dropout_scaling=chain.scaling or "inverted",
        input_standardization=_standardization(input_mean, input_std, first.in_features, "input"),
        target_standardization=_standardization(target_mean, target_std, output_dim, "target"),
        noise_variance=_floats(noise_variance, output_dim, "noise_variance"),
        labels=list(labels) if labels is not None else None,
        sha256="0" * 64,
        training={
            "source": source,
            "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "architecture": repr(module),
        },
    )
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(chain.linears):
        weight = layer.weight.detach().to("cpu", torch.float32).contiguous().clone()
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
        tensors[weight_name(i)] = weight
        tensors[bias_name(i)] = bias.detach().to("cpu", torch.float32).contiguous().clone()
    return save_model(folder, config, tensors, _card(config, chain.softmax))


def _card(config: ModelConfig, softmax: str | None) -> str:
    arch = config.training["architecture"]
    served = (
        "softmax of the module's logits"
        + (f" (its final {softmax} is the service's)" if softmax else "")
        if config.task == "classification"
        else "the module's output"
        + (" (target standardisation undone)" if config.target_standardization else "")
    )
    return f"""# {config.name} (version {config.version})

Imported from a trained torch module by {config.training["source"]} on
{config.training["imported_at"]} (torch {config.training["torch"]}).

## Model

{config.task}; {config.input_dim} inputs, {config.output_dim} outputs; served as {served}.
Dropout p before each Linear layer: {[config.input_dropout, *config.dropout]}
({config.dropout_scaling} scaling); MC dropout draws from these.

```
{arch}
```

## Data, training, metrics, intended use

Not known to the service: write them here.
"""


# -- rebuilding a module from its repr ---------------------------------------------------

#: Layers ``read_architecture`` builds, with the keyword arguments their repr shows.
_BUILDERS: dict[str, Any] = {
    "Sequential": nn.Sequential,
    "Linear": nn.Linear,
    "Dropout": nn.Dropout,
    "ReLU": nn.ReLU,
    "Tanh": nn.Tanh,
    "Sigmoid": nn.Sigmoid,
    "SiLU": nn.SiLU,
    "GELU": nn.GELU,
    "LeakyReLU": nn.LeakyReLU,
    "ELU": nn.ELU,
    "Identity": nn.Identity,
    "Flatten": nn.Flatten,
    "Softmax": nn.Softmax,
    "LogSoftmax": nn.LogSoftmax,
}
_LINE = re.compile(
    r"^(?P<indent> *)(?:\((?P<key>[^)]+)\): )?(?P<kind>\w+)\((?P<args>.*?)(?P<close>\)?)$"
)


def read_architecture(text: str) -> nn.Module:
    """A module rebuilt from ``repr(module)`` of an ``nn.Sequential`` (nested or not) of
    standard layers; its weights are fresh, for ``load_state_dict``. Only the layer names
    and literal arguments are read (``ast.literal_eval``): nothing in the text runs."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    module, rest = _parse(lines, 0)
    if rest != len(lines):
        raise ValueError(f"architecture: unexpected text at line {rest + 1}: {lines[rest][:80]!r}")
    return module


def _parse(lines: list[str], i: int) -> tuple[nn.Module, int]:
    match = _LINE.match(lines[i]) if i < len(lines) else None
    if match is None:
        shown = lines[i][:80] if i < len(lines) else "(end of text)"
        raise ValueError(f"architecture: line {i + 1} is not a layer: {shown!r}")
    kind, args, closed = match["kind"], match["args"], bool(match["close"])
    if kind == "Sequential" and not closed:
        seq = nn.Sequential()
        i += 1
        while i < len(lines) and lines[i].strip() != ")":
            key = _LINE.match(lines[i])
            if key is None or key["key"] is None:
                raise ValueError(
                    f"architecture: line {i + 1} is not a named layer: {lines[i][:80]!r}"
                )
            child, i = _parse(lines, i)
            seq.add_module(key["key"], child)
        if i >= len(lines):
            raise ValueError("architecture: a Sequential( is never closed")
        return seq, i + 1
    if not closed:
        raise ValueError(f"architecture: line {i + 1}: {kind}( is not closed on its line")
    builder = _BUILDERS.get(kind)
    if builder is None:
        reason = next((why for name, why in _REFUSED.items() if kind.startswith(name)), None)
        raise ValueError(
            f"architecture: line {i + 1}: {kind}: "
            + (reason or "not a layer this service serves (a custom module?)")
        )
    return builder(**_keywords(args, i)), i + 1


def _keywords(args: str, i: int) -> dict[str, Any]:
    if not args.strip():
        return {}
    bad = f"architecture: line {i + 1}: arguments {args[:80]!r} are not literal keywords"
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError(bad)
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
    except (SyntaxError, ValueError):
        raise ValueError(bad) from None


# -- files ---------------------------------------------------------------------------------

#: The metadata key (safetensors) or dict key (torch.save) holding ``repr(module)``.
ARCHITECTURE = "architecture"
_HOW = (
    "save it as: save_file(model.state_dict(), 'model.safetensors', "
    "metadata={'architecture': repr(model)})"
)


def read_model_file(path: Path) -> nn.Module:
    """The module saved in ``path`` with its architecture: a safetensors file whose metadata
    holds ``repr(model)``, or a ``torch.save`` of ``{"architecture": repr(model),
    "state_dict": model.state_dict()}``. Nothing in the file is run: safetensors holds only
    tensors, and ``torch.load`` reads with ``weights_only=True``."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        architecture, state = _read_safetensors(path)
    else:
        architecture, state = _read_torch(path)
    try:
        module = read_architecture(architecture)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise ValueError(
            f"{path}: the weights do not fit the architecture ({first[0].strip()})"
        ) from None
    return module


def _read_safetensors(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a safetensors file ({exc})") from None
    if ARCHITECTURE not in metadata:
        raise ValueError(f"{path}: no architecture in its metadata; {_HOW}")
    return metadata[ARCHITECTURE], state


def _read_torch(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    import pickle

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: holds more than tensors and plain containers (a whole pickled module?), "
            f"which is not loaded; {_HOW}"
        ) from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a file torch.save wrote ({exc})") from None
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get(ARCHITECTURE), str)
        or not isinstance(saved.get("state_dict"), dict)
    ):
        raise ValueError(
            f"{path}: expected a dict with 'architecture' (repr(model)) and 'state_dict'; {_HOW}"
        )
    return saved[ARCHITECTURE], saved["state_dict"]


def import_file(path: Path, out: Path, *, task: Task, **options: Any) -> ModelConfig:
    """``save_torch_model`` of the module saved in ``path`` (see ``read_model_file``)."""
    module = read_model_file(path)
    return save_torch_model(
        module,
        out,
        name=out.name,
        task=task,
        source=f"dropout-service import {path.name}",
        **options,
    )
