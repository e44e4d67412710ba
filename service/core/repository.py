"""The model repository: one folder per model, validated and loaded at start-up.

A folder holds ``config.json`` (``ModelConfig``), the safetensors weights it names and a
``README.md`` model card. Weights are never unpickled. A model whose config, checksum or
tensors are wrong is refused with a message naming the file and the reason; the others
still load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from service.core.engine import DEFAULT_MASK_MODE, MaskMode, MLPEngine
from service.core.errors import ModelNotFound
from service.core.model import ModelConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


class ModelLoadError(Exception):
    """A model folder that cannot be served; the message names the file and the reason."""


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    engine: MLPEngine
    path: Path


@dataclass
class ModelRepository:
    """Models that loaded, and the reason for each that did not."""

    models: dict[str, LoadedModel] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> LoadedModel:
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFound(name, list(self.models)) from None

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(self.models[name] for name in sorted(self.models))

    @classmethod
    def load(
        cls, root: Path, device: torch.device | str = "cpu", mask_mode: MaskMode = DEFAULT_MASK_MODE
    ) -> ModelRepository:
        """Load every folder under ``root``; a missing root is an empty repository.

        A folder without ``config.json`` is refused like any other damaged model, not skipped:
        a rollout that lost a config must not look healthy. Names starting with . or _ are
        not model folders.
        """
        repo = cls()
        folders = sorted(p for p in root.iterdir() if _is_model_folder(p)) if root.is_dir() else []
        if not folders:
            log.warning("no models found under %s", root)
        for folder in folders:
            try:
                model = load_model(folder, device, mask_mode)
            except ModelLoadError as exc:
                log.error("refused model %s: %s", folder.name, exc)
                repo.failures[folder.name] = str(exc)
                continue
            except Exception as exc:  # whatever else goes wrong, the other folders still load
                reason = describe_failure(exc)
                log.error("refused model %s: %s", folder.name, reason, exc_info=exc)
                repo.failures[folder.name] = reason
                continue
            repo.models[model.config.name] = model
            log.info(
                "loaded model %s version %s sha256 %s",
                model.config.name,
                model.config.version,
                model.config.sha256[:12],
            )
        return repo


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith((".", "_"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors of ``config``'s weights file, checked against its sha256.

    The file is read once into memory, and both the checksum and the tensors come from those
    bytes: the tensors are the process's own, so nothing done to the file afterwards (a new
    version copied over it, a truncation) can change an answer, and what was checked is what
    is served. (``safetensors.torch.load_file`` maps the file instead: its tensors would
    follow later writes, and a truncated file would end the process with SIGBUS.)
    """
    weights = folder / config.weights_file
    if not weights.is_file():
        raise ModelLoadError(f"{config.weights_file}: file missing")
    try:
        data = weights.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{config.weights_file}: {_reason(exc)}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != config.sha256:
        raise ModelLoadError(
            f"{config.weights_file}: sha256 {actual[:12]}... does not match config "
            f"{config.sha256[:12]}..."
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise ModelLoadError(
            f"{config.weights_file}: not a valid safetensors file ({exc})"
        ) from None
    check_tensors(config, tensors)
    return tensors


def read_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG_FILE
    try:
        config = ModelConfig.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise ModelLoadError(f"{CONFIG_FILE}: {_reason(exc)}") from None
    if config.name != folder.name:
        raise ModelLoadError(f"{CONFIG_FILE}: name {config.name!r} differs from folder name")
    return config


def load_model(
    folder: Path, device: torch.device | str = "cpu", mask_mode: MaskMode = DEFAULT_MASK_MODE
) -> LoadedModel:
    """Validate one folder and build its engine, or raise ``ModelLoadError``."""
    config = read_config(folder)
    tensors = read_weights(folder, config)
    engine = MLPEngine(config, tensors, device=device, mask_mode=mask_mode)
    return LoadedModel(config=config, engine=engine, path=folder)


def check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    expected = config.weight_shapes()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelLoadError(
            f"{config.weights_file}: missing tensors {missing}, unexpected {extra}"
        )
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ModelLoadError(
                f"{config.weights_file}: tensor {name} has shape {tuple(t.shape)}, "
                f"config implies {shape}"
            )
        if t.dtype != torch.float32:
            raise ModelLoadError(f"{config.weights_file}: tensor {name} is {t.dtype}, not float32")
        if not torch.isfinite(t).all():
            raise ModelLoadError(f"{config.weights_file}: tensor {name} holds NaN or infinity")


def save_model(
    folder: Path, config: ModelConfig, tensors: dict[str, torch.Tensor], card: str
) -> ModelConfig:
    """Write a model folder; the stored config gets the weights' real sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / config.weights_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, weights)
    config = config.model_copy(update={"sha256": sha256_of(weights)})
    check_tensors(config, tensors)
    write_config(folder, config)
    (folder / "README.md").write_text(card)
    return config


def write_config(folder: Path, config: ModelConfig) -> None:
    """Replace ``config.json`` at once: a server loading the folder meanwhile reads the old
    file or the new one, never half of one."""
    staged = folder / f".{CONFIG_FILE}.tmp"
    staged.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    os.replace(staged, folder / CONFIG_FILE)


def describe_failure(exc: Exception) -> str:
    """The reason for an unforeseen failure to load, without a file path."""
    return f"could not be loaded ({type(exc).__name__}: {_reason(exc)})"


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
