"""The engine's dropout op against torch's own (DESIGN.md contract 3) and torch's properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.core.engine import dropout, dropout_noise

SHAPES = [(1,), (3, 5), (64, 50), (7, 3, 11), (2, 1000)]
PS = [0.01, 0.1, 0.3, 0.5, 0.9]
SEEDS = [0, 1, 12345, 2**63 - 1]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("seed", SEEDS)
def test_mask_equals_torch_dropout_bit_for_bit(shape: tuple[int, ...], p: float, seed: int) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(99)) + 3.0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        expected = F.dropout(x, p, training=True)
    ours = dropout(x, p, torch.Generator().manual_seed(seed))
    assert torch.equal(ours, expected)


def test_generator_state_is_per_call_not_global() -> None:
    x = torch.ones(100, 100)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = dropout(x, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = dropout(x, 0.5, torch.Generator().manual_seed(3))
    c = dropout(x, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.7])
def test_mean_preserved_and_zero_fraction_near_p(p: float) -> None:
    # As torch/test/nn/test_dropout.py checks: E[dropout(x)] = x and about p of entries zeroed.
    x = torch.ones(1000, 1000)
    y = dropout(x, p, torch.Generator().manual_seed(0))
    assert abs(float(y.mean()) - 1.0) < 0.01
    assert abs(float((y == 0).float().mean()) - p) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))


def test_p_zero_is_identity() -> None:
    x = torch.randn(50, 20)
    assert torch.equal(dropout(x, 0.0, torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_p_rejected(p: float) -> None:
    with pytest.raises(ValueError, match="dropout probability"):
        dropout_noise((3, 3), p, torch.Generator())


def test_vanilla_noise_is_an_unscaled_mask() -> None:
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    vanilla = dropout_noise((100, 10), 0.25, g1, "vanilla")
    inverted = dropout_noise((100, 10), 0.25, g2, "inverted")
    assert set(vanilla.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(vanilla / 0.75, inverted)
