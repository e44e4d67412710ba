"""Gal & Ghahramani's UCI protocol end to end on a few hundred rows, and the stacked trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from service.cli import main
from service.offline.datasets import UCIDataset
from service.offline.options import ProtocolOptions
from service.offline.stacked import mc_samples_stack, train_stack
from service.offline.uci import results_table, run_protocol
from tests.helpers import write_uci_folder

QUICK = ProtocolOptions(epochs=60, batch_size=32, val_mc_samples=50, mc_samples=200, progress=False)


@pytest.fixture
def uci_folder(tmp_path: Path) -> Path:
    """240 rows of y = x0 - 2 x1 + noise (std 0.3), 3 splits and a 2 x 2 protocol grid."""
    folder = write_uci_folder(
        tmp_path / "toy", rows=240, train_rows=200, splits=3, noise=0.3, seed=1
    )
    for name, values in {
        "n_hidden": [16],
        "n_epochs": [3],
        "dropout_rates": [0.01, 0.2],
        "tau_values": [1.0, 10.0],
    }.items():
        np.savetxt(folder / f"{name}.txt", values)
    return folder


def test_protocol_end_to_end(uci_folder: Path) -> None:
    result = run_protocol(UCIDataset.load(uci_folder), QUICK)
    assert [s.split for s in result.splits] == [0, 1, 2]
    assert result.hidden == 16
    assert result.epochs == 60
    for s in result.splits:
        assert s.dropout in (0.01, 0.2)
        assert s.tau_grid in (1.0, 10.0)
        # tau is fitted on the validation rows: never worse there than the grid's value
        assert s.validation_ll >= s.validation_ll_grid_tau
        assert np.isfinite([s.validation_ll, s.test_ll, s.test_rmse_mc, s.tau]).all()
        assert s.test_rmse_mc < 1.5  # y's std is about 2.3: the models learnt something
        for pct in (90, 95):
            assert 0.5 <= getattr(s, f"conformal_coverage_{pct}") <= 1.0
            assert 0 < getattr(s, f"conformal_width_{pct}") < math.inf
        assert s.conformal_width_90 < s.conformal_width_95
    mean, se = result.summary("test_ll")
    assert se > 0
    assert mean == pytest.approx(np.mean([s.test_ll for s in result.splits]))
    table = results_table([result])
    assert "| toy | 3 | 60 |" in table
    assert "conformal 95%: coverage" in table


def test_protocol_is_reproducible_and_takes_the_multiplier(uci_folder: Path) -> None:
    data = UCIDataset.load(uci_folder)
    opts = ProtocolOptions(
        splits=1, epochs=None, epoch_multiplier=4, val_mc_samples=20, mc_samples=50
    )
    opts = ProtocolOptions(**{**opts.__dict__, "progress": False})
    a, b = run_protocol(data, opts), run_protocol(data, opts)
    assert a.epochs == 12  # n_epochs.txt (3) x 4
    assert len(a.splits) == 1
    assert a.splits == b.splits


def test_cli_benchmark_writes_json(uci_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    argv = ["benchmark", str(uci_folder), "--splits", "2", "--epochs", "5"]
    argv += ["--val-mc-samples", "10", "--mc-samples", "20", "--quiet", "--json", str(out)]
    assert main(argv) == 0
    (result,) = json.loads(out.read_text())
    assert result["dataset"] == "toy"
    assert len(result["splits"]) == 2
    assert set(result["summary"]) >= {
        "test_rmse_mc",
        "test_ll",
        "test_coverage_95",
        "conformal_coverage_95",
        "conformal_width_90",
    }


def test_stacked_models_learn_independently() -> None:
    """Model 0 fits y = x, model 1 fits y = -x, stacked: each learns its own sign."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 1, generator=g).expand(2, -1, -1).contiguous()
    y = torch.cat([x[:1], -x[1:]])
    p, reg = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0])
    stack = train_stack(x, y, (16,), p, reg, epochs=150, batch_size=32, generator=g, progress=False)
    probe = torch.tensor([[[1.0]], [[1.0]]])
    out = stack.forward(probe, g)[:, 0, 0]
    assert out[0] == pytest.approx(1.0, abs=0.15)
    assert out[1] == pytest.approx(-1.0, abs=0.15)


def test_stacked_weight_decay_shrinks_only_its_model() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, 2, generator=g).expand(2, -1, -1).contiguous()
    y = x.sum(-1, keepdim=True)
    p, reg = torch.tensor([0.1, 0.1]), torch.tensor([0.0, 1.0])
    stack = train_stack(x, y, (8,), p, reg, epochs=200, batch_size=32, generator=g, progress=False)
    norms = torch.stack([w.square().sum(dim=(1, 2)) for w in stack.weights]).sum(0)
    assert norms[1] < 0.5 * norms[0]


def test_stacked_samples_without_dropout_are_the_forward_pass_in_target_units() -> None:
    """With p = 0 every pass is the same: each sample is the model's output, unstandardised."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 2, generator=g)
    y = torch.randn(2, 50, 1, generator=g)
    stack = train_stack(
        x,
        y,
        (4,),
        torch.tensor([0.0, 0.0]),
        torch.tensor([0.0, 0.0]),
        epochs=1,
        batch_size=50,
        generator=g,
        progress=False,
    )
    out = stack.forward(x, g)[..., 0]  # (2, 50)
    target = (torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.5]))
    samples = mc_samples_stack(stack, x, target, 7, g, chunk_elements=64)  # several chunks
    assert samples.shape == (2, 7, 50)
    want = out * target[1].view(2, 1) + target[0].view(2, 1)
    torch.testing.assert_close(samples, want.unsqueeze(1).expand(2, 7, 50))
