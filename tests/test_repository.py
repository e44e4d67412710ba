"""Model repository: valid folders load; damaged ones are refused with a reason, others serve."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from service.core.repository import ModelLoadError, ModelRepository, load_model, sha256_of
from tests.helpers import random_tensors, tiny_regression_config, tiny_tensors, write_model


@pytest.fixture
def repo_root(tmp_path: Path) -> Path:
    write_model(tmp_path, tiny_regression_config(), tiny_tensors())
    return tmp_path


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_loads_a_valid_folder(repo_root: Path) -> None:
    model = load_model(repo_root / "tiny")
    assert model.config.name == "tiny"
    assert model.config.sha256 == sha256_of(repo_root / "tiny" / "weights.safetensors")
    assert (repo_root / "tiny" / "README.md").read_text().startswith("# tiny")


def test_wrong_sha256_is_refused(repo_root: Path) -> None:
    edit_config(repo_root / "tiny", sha256="a" * 64)
    with pytest.raises(ModelLoadError, match=r"weights.safetensors: sha256 .* does not match"):
        load_model(repo_root / "tiny")


def test_wrong_shapes_are_refused(repo_root: Path) -> None:
    folder = repo_root / "tiny"
    wrong = tiny_regression_config(hidden=[4])
    write_model(repo_root, wrong, random_tensors(wrong))  # same folder, 4 hidden units
    edit_config(folder, hidden=[3])
    with pytest.raises(ModelLoadError, match=r"tensor linear0.weight has shape \(4, 2\)"):
        load_model(folder)


def test_truncated_weights_are_refused(repo_root: Path) -> None:
    weights = repo_root / "tiny" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    edit_config(repo_root / "tiny", sha256=sha256_of(weights))
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        load_model(repo_root / "tiny")


def test_pickle_in_place_of_safetensors_is_never_unpickled(repo_root: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (exec, ("raise SystemExit('pickle executed')",))

    weights = repo_root / "tiny" / "weights.safetensors"
    weights.write_bytes(pickle.dumps(Boom()))
    edit_config(repo_root / "tiny", sha256=sha256_of(weights))
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        load_model(repo_root / "tiny")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "ranking"}, "task"),
        ({"dropout": [0.5, 0.5]}, "dropout has 2 entries"),
        ({"dropout": [1.0]}, "dropout.0"),
        ({"noise_variance": [0.1, 0.2]}, "noise_variance needs output_dim entries"),
        ({"activation": ["relu", "tanh"]}, "activation has 2 entries, hidden has 1"),
        ({"activation": {"name": "elu", "negative_slope": 0.1}}, "negative_slope is a parameter"),
        ({"activation": "swish"}, "activation"),
        ({"name": "other"}, "differs from folder name"),
        ({"weights_file": "../x.safetensors"}, "weights_file"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_config_is_refused_naming_the_field(
    repo_root: Path, changes: dict[str, object], message: str
) -> None:
    edit_config(repo_root / "tiny", **changes)
    with pytest.raises(ModelLoadError, match=message):
        load_model(repo_root / "tiny")


def test_one_bad_model_leaves_the_others_served(repo_root: Path) -> None:
    other = tiny_regression_config(name="other")
    write_model(repo_root, other, tiny_tensors())
    edit_config(repo_root / "tiny", sha256="b" * 64)
    repo = ModelRepository.load(repo_root)
    assert list(repo.models) == ["other"]
    assert "sha256" in repo.failures["tiny"]
    assert torch.equal(
        repo.get("other").engine.predict(torch.tensor([[1.0, 2.0]])), torch.tensor([[6.5]])
    )


def test_missing_root_is_an_empty_repository(tmp_path: Path) -> None:
    repo = ModelRepository.load(tmp_path / "absent")
    assert not repo.models
    assert not repo.failures
