"""Bring your own model: ``save_torch_model`` on modules a user trains, what it refuses, the
architecture read back from a file, and MC drawn from the module's own dropout."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from service import save_torch_model
from service.cli import main
from service.core.importer import read_architecture
from service.core.repository import load_model

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "40"))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

ACTIVATIONS = [
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SiLU,
    nn.Identity,
    lambda: nn.GELU(approximate="tanh"),
    nn.GELU,
    lambda: nn.LeakyReLU(0.2),
    lambda: nn.ELU(0.7),
]


@st.composite
def modules(draw: st.DrawFn) -> tuple[nn.Module, str]:
    """A random chain of Linear, activation and Dropout layers, grouped in nested
    Sequentials at random, and the task it serves."""
    task = draw(st.sampled_from(["regression", "classification"]))
    widths = draw(st.lists(st.integers(1, 24), min_size=2, max_size=5))
    p = st.sampled_from([0.0, 0.1, 0.5, 0.9])
    layers: list[nn.Module] = []
    if draw(st.booleans()):
        layers.append(nn.Flatten())
    for i in range(len(widths) - 1):
        if draw(st.booleans()):
            layers.append(nn.Dropout(draw(p)))
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=draw(st.booleans())))
        if i < len(widths) - 2:
            layers.append(draw(st.sampled_from(ACTIVATIONS))())
    if task == "regression" and draw(st.booleans()):
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
    if task == "classification" and draw(st.booleans()):
        layers.append(nn.Softmax(dim=-1))
    # Group some runs of layers into nested Sequentials, as users build blocks.
    cut = draw(st.integers(0, len(layers)))
    if draw(st.booleans()) and 0 < cut < len(layers):
        layers = [nn.Sequential(*layers[:cut]), *layers[cut:]]
    seed = draw(st.integers(0, 2**31))
    torch.manual_seed(seed)
    module = nn.Sequential(*layers)
    for param in module.parameters():  # weights of a trained net's size, not init's
        nn.init.normal_(param, std=0.5)
    return module, task


def served_as(module: nn.Module, task: str, x: torch.Tensor, mean: float, std: float) -> Any:
    """What the service must answer: the module in eval mode on standardised inputs."""
    with torch.no_grad():
        y = module.eval()((x - mean) / std)
    ends_in_softmax = isinstance(list(module.modules())[-1], nn.Softmax)
    return y if task == "regression" or ends_in_softmax else torch.softmax(y, dim=-1)


@PROPERTY
@given(modules(), st.integers(1, 70))
def test_the_engine_answers_the_modules_bits(
    tmp_path_factory: pytest.TempPathFactory, drawn: tuple[nn.Module, str], rows: int
) -> None:
    module, task = drawn
    folder = tmp_path_factory.mktemp("import") / "mine"
    in_dim = next(m for m in module.modules() if isinstance(m, nn.Linear)).in_features
    save_torch_model(module, folder, name="mine", task=task, input_mean=0.5, input_std=2.0)  # type: ignore[arg-type]
    engine = load_model(folder).engine
    x = torch.randn(rows, in_dim, generator=torch.Generator().manual_seed(rows)) * 3
    assert torch.equal(engine.predict(x), served_as(module, task, x, 0.5, 2.0))


def test_different_widths_activations_and_p_per_layer(tmp_path: Path) -> None:
    module = nn.Sequential(
        nn.Dropout(0.05),
        nn.Linear(6, 32),
        nn.LeakyReLU(0.3),
        nn.Dropout(0.2),
        nn.Sequential(nn.Linear(32, 8), nn.ELU(0.5), nn.Dropout(0.0)),
        nn.Linear(8, 3),
        nn.Tanh(),
    )
    config = save_torch_model(
        module, tmp_path / "mine", name="mine", task="regression", noise_variance=[0.1, 0.2, 0.3]
    )
    assert config.hidden == [32, 8]
    assert (config.input_dropout, config.dropout) == (0.05, [0.2, 0.0])
    assert [a.name for a in config.activations] == ["leaky_relu", "elu"]
    assert config.activations[0].negative_slope == 0.3
    assert config.output_activation == "tanh"
    assert config.noise_variance == [0.1, 0.2, 0.3]
    assert "LeakyReLU(negative_slope=0.3)" in (tmp_path / "mine" / "README.md").read_text()


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class HiddenDropout(nn.Module):
    """Dropout in a custom forward: no module the importer could see."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.dropout(x, 0.5, self.training))


class NoisySequential(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * 2


@pytest.mark.parametrize(
    ("module", "says"),
    [
        (
            nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)),
            "layer 1: BatchNorm1d",
        ),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1)), "layer 1: LayerNorm"),
        (nn.Sequential(nn.Linear(4, 4), nn.AlphaDropout(0.1), nn.Linear(4, 1)), "AlphaDropout"),
        (nn.Sequential(nn.Dropout2d(0.1), nn.Linear(4, 1)), "layer 0: Dropout2d"),
        (nn.Sequential(Residual(), nn.Linear(4, 1)), "layer 0: Residual: not a layer"),
        (HiddenDropout(), "HiddenDropout: not a layer"),
        (NoisySequential(nn.Linear(4, 1)), "NoisySequential: not a layer"),
        (nn.Sequential(nn.Dropout(0.1), nn.Dropout(0.2), nn.Linear(4, 1)), "layer 1: two dropout"),
        (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)), "layer 1: dropout after the last"),
        (
            nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Tanh(), nn.Linear(4, 1)),
            "before tanh",
        ),
        (nn.Sequential(nn.ReLU(), nn.Linear(4, 1)), "layer 0: an activation before the first"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Tanh(), nn.Linear(4, 1)), "two activations"),
        (nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 1)), "takes 4 inputs, but the layer before"),
        (nn.Sequential(nn.Linear(4, 1), nn.Softmax(dim=-1)), "Softmax is served only as the last"),
        (nn.Sequential(nn.Flatten(0), nn.Linear(4, 1)), "only Flatten(start_dim=1"),
        (nn.Sequential(nn.Dropout(0.5)), "no Linear layer"),
    ],
)
def test_what_cannot_be_served_faithfully_is_refused_by_name(
    tmp_path: Path, module: nn.Module, says: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        save_torch_model(module, tmp_path / "mine", name="mine", task="regression")
    assert not (tmp_path / "mine").exists()


def test_a_classifier_ends_in_logits_or_softmax_never_another_activation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="applies softmax to the logits itself"):
        save_torch_model(
            nn.Sequential(nn.Linear(4, 3), nn.Sigmoid()),
            tmp_path / "c",
            name="c",
            task="classification",
        )
    with pytest.raises(ValueError, match="labels has 2 entries; the model has 3 outputs"):
        save_torch_model(
            nn.Sequential(nn.Linear(4, 3)),
            tmp_path / "c",
            name="c",
            task="classification",
            labels=["a", "b"],
        )
    config = save_torch_model(
        nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)),
        tmp_path / "c",
        name="c",
        task="classification",
    )
    assert config.labels == ["0", "1", "2"]


def test_the_architecture_is_read_back_from_its_repr_without_running_anything(
    tmp_path: Path,
) -> None:
    module = nn.Sequential(
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Sequential(nn.Linear(3, 5), nn.GELU(approximate="tanh")),
        nn.Dropout(0.2),
        nn.Linear(5, 2, bias=False),
        nn.LogSoftmax(dim=-1),
    )
    rebuilt = read_architecture(repr(module))
    assert repr(rebuilt) == repr(module)
    rebuilt.load_state_dict(module.state_dict())  # the same keys and shapes
    tripwire = tmp_path / "RAN"
    for text, says in [
        (f"Linear(in_features=__import__('pathlib').Path('{tripwire}').touch())", "not literal"),
        ("Sequential(\n  (0): MyBlock(width=3)\n)", "MyBlock: not a layer"),
        ("Sequential(\n  (0): BatchNorm1d(4, eps=1e-05)\n)", "BatchNorm1d: its running"),
        ("Sequential(\n  (0): Linear(in_features=3, out_features=5, bias=True)\n", "never closed"),
        ("import os", "not a layer"),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)):
            read_architecture(text)
    assert not tripwire.exists()


def test_mc_draws_from_the_modules_own_dropout(tmp_path: Path) -> None:
    """The served MC mean and variance against those of the module's own train-mode passes,
    two independent samples of one distribution: within a few standard errors."""
    torch.manual_seed(3)
    module = nn.Sequential(
        nn.Dropout(0.2), nn.Linear(3, 24), nn.ReLU(), nn.Dropout(0.5), nn.Linear(24, 1)
    )
    save_torch_model(module, tmp_path / "mine", name="mine", task="regression")
    engine = load_model(tmp_path / "mine").engine
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    t = 20_000
    served = engine.predict_mc(x, t, seed=11)
    module.train()
    with torch.no_grad():
        passes = module(x.repeat(t, 1, 1)).double()  # (t, rows, 1), torch's own masks
    own_mean, own_var = passes.mean(0), passes.var(0, unbiased=False)
    se = torch.sqrt(own_var / t)
    assert (served.mean - own_mean).abs().le(5 * se * np.sqrt(2)).all()
    ratio = served.variance / own_var
    assert ratio.sub(1).abs().lt(0.06).all(), ratio  # relative s.e. of each about 1.4%
    with torch.no_grad():  # and the dropout really is on: the passes spread
        assert (own_var > 1e-3).all()


# -- dropout-service import ------------------------------------------------------------------


def trained_module() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def import_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["import", *argv])
    out = capsys.readouterr()
    return code, (out.out + out.err).strip()


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_import_reads_what_a_user_saves_without_this_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    module = trained_module()
    path = tmp_path / f"model.{kind}"
    if kind == "safetensors":  # the README's lines: safetensors and torch only
        save_file(module.state_dict(), str(path), metadata={"architecture": repr(module)})
    else:
        torch.save({"architecture": repr(module), "state_dict": module.state_dict()}, path)
    out = tmp_path / "models" / "mine"
    code, said = import_cli(
        capsys, str(path), "--out", str(out), "--task", "regression", "--input-mean", "1,2,3",
        "--input-std", "2", "--noise-variance", "0.25",
    )  # fmt: skip
    assert (code, said) == (0, f"wrote {out}: regression, 3 inputs, 1 outputs")
    served = load_model(out)
    assert served.config.noise_variance == [0.25]
    x = torch.randn(5, 3)
    want = module.eval()((x - torch.tensor([1.0, 2.0, 3.0])) / 2)
    assert torch.equal(served.engine.predict(x), want.detach())


class Tripwire:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.path),))  # type: ignore[return-value]


def test_import_refuses_files_it_cannot_read_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = trained_module()
    bare = tmp_path / "bare.safetensors"
    save_file(module.state_dict(), str(bare))
    pickled = tmp_path / "pickled.pt"
    torch.save({"architecture": repr(module), "state_dict": module.state_dict(),
                "x": Tripwire(tmp_path / "RAN")}, pickled)  # fmt: skip
    whole = tmp_path / "whole.pt"
    torch.save(module, whole)
    wrong = tmp_path / "wrong.safetensors"
    other = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    save_file(other.state_dict(), str(wrong), metadata={"architecture": repr(module)})
    custom = tmp_path / "custom.safetensors"
    save_file(module.state_dict(), str(custom), metadata={"architecture": "MyNet()"})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    cases = {
        tmp_path / "absent.pt": "no such file",
        bare: "no architecture in its metadata; save it as: save_file(",
        pickled: "holds more than tensors and plain containers",
        whole: "holds more than tensors and plain containers",
        wrong: "the weights do not fit the architecture",
        custom: "MyNet: not a layer this service serves",
        junk: "not a safetensors file",
    }
    for path, says in cases.items():
        target = str(tmp_path / "m")
        code, said = import_cli(capsys, str(path), "--out", target, "--task", "regression")
        assert code == 2, path
        assert said.startswith("error: ")
        assert says in said
        assert "\n" not in said
        assert "Traceback" not in said
    assert not (tmp_path / "RAN").exists()
    assert not (tmp_path / "m").exists()
