"""The packed mask mode: exact Bernoulli(1-p), reproducible per seed, and the engine's MC in it."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from service.core.engine import (
    PACKED_MIN_ELEMENTS,
    SFC64_MIN_WORDS,
    MLPEngine,
    PackedStreams,
    keep_mask,
    mask_source,
)
from service.settings import Settings
from tests.helpers import deep_regression_config, live_server, random_tensors


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bits(seed: int) -> PackedStreams:
    return mask_source(seed, "packed")  # type: ignore[return-value]


def test_packed_masks_replay_per_seed_and_differ_between_seeds() -> None:
    shape = (300, 170)
    a = keep_mask(shape, 0.3, bits(1))
    assert torch.equal(a, keep_mask(shape, 0.3, bits(1)))
    assert not torch.equal(a, keep_mask(shape, 0.3, bits(2)))
    assert not torch.equal(a, keep_mask(shape, 0.3, gen(1)))
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert a.dtype == torch.float32


def test_packed_mode_takes_masks_below_the_packed_size_from_torchs_kernel() -> None:
    big, small = (PACKED_MIN_ELEMENTS,), (PACKED_MIN_ELEMENTS - 1,)
    assert not torch.equal(keep_mask(big, 0.3, bits(7)), keep_mask(big, 0.3, gen(7)))
    assert torch.equal(keep_mask(small, 0.3, bits(7)), keep_mask(small, 0.3, gen(7)))
    # A request's masks follow one another in its streams: the same shapes replay.
    shapes = [small, (8 * SFC64_MIN_WORDS,), big, small]
    first, again = bits(7), bits(7)
    for shape in shapes:
        assert torch.equal(keep_mask(shape, 0.3, first), keep_mask(shape, 0.3, again))


# Words from torch's generator, then from SFC64.
@pytest.mark.parametrize("n", [PACKED_MIN_ELEMENTS + 5, 8 * SFC64_MIN_WORDS + 3])
def test_ties_are_settled_by_45_more_bits_against_the_threshold_below_the_top_byte(n: int) -> None:
    # Replay the packed draw by hand from the same stream: the byte decides unless it equals
    # the threshold's top byte; then the low 45 bits of one more word decide, in order.
    p = 0.1
    mask = keep_mask((n,), p, bits(11)).numpy()
    stream = bits(11)
    threshold = math.ceil((1 - p) * 2**53)
    high, low = threshold >> 45, threshold & ((1 << 45) - 1)
    draws = stream.words((n + 7) // 8).view(np.uint8)[:n]
    expected = (draws < high).astype(np.float32)
    ties = np.flatnonzero(draws == high)
    assert ties.size > 0  # about n / 256 of them
    for i, word in zip(ties, stream.words(ties.size), strict=True):
        expected[i] = float(int(word) & ((1 << 45) - 1) < low)
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_zero_fraction_near_p_and_inverted_mean_preserved(p: float) -> None:
    n = 1 << 21
    mask = keep_mask((n,), p, bits(0))
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(float(1 - mask.mean()) - p) < 5 * sd
    assert abs(float(mask.mean()) / (1 - p) - 1.0) < 5 * sd / (1 - p)


def test_bytes_that_tie_the_threshold_are_settled_by_more_bits() -> None:
    # 1-p = 200.5/256 puts the threshold halfway through byte value 200: keeping every tie
    # would give 201/256, dropping them 200/256; the extra bits must keep half of them.
    q = 200.5 / 256
    n = 1 << 22
    mask = keep_mask((n,), 1 - q, bits(3))
    sd = (q * (1 - q) / n) ** 0.5
    assert abs(float(mask.mean()) - q) < 4 * sd
    assert 4 * sd < 1 / 512 / 2


def test_every_byte_lane_of_a_random_word_is_unbiased() -> None:
    # Eight mask elements share one 64-bit word; each byte position must keep with 1-p.
    mask = keep_mask((1 << 20,), 0.25, bits(4)).view(-1, 8)
    sd = (0.25 * 0.75 / mask.shape[0]) ** 0.5
    assert bool(((mask.mean(0) - 0.75).abs() < 5 * sd).all())


def test_neighbouring_elements_are_uncorrelated() -> None:
    mask = keep_mask((1 << 20,), 0.5, bits(5))
    centred = mask - mask.mean()
    for lag in (1, 7, 8, 9):
        corr = float((centred[:-lag] * centred[lag:]).mean() / centred.square().mean())
        assert abs(corr) < 5 / (1 << 10)


@pytest.mark.parametrize("mode", ["packed", "torch"])
def test_p_zero_keeps_everything(mode: str) -> None:
    assert bool((keep_mask((1000,), 0.0, mask_source(0, mode)) == 1).all())  # type: ignore[arg-type]


def test_torch_mode_is_torchs_bernoulli() -> None:
    expected = torch.empty(50, 40).bernoulli_(0.8, generator=gen(9))
    assert torch.equal(keep_mask((50, 40), 0.2, mask_source(9, "torch")), expected)


def test_engine_modes_each_replay_and_agree_in_distribution() -> None:
    config = deep_regression_config()
    tensors = random_tensors(config, 1)
    x = torch.randn(3, config.input_dim, generator=gen(0))
    packed, torch_mode = (MLPEngine(config, tensors, mask_mode=m) for m in ("packed", "torch"))
    a = packed.predict_mc(x, 4000, seed=5)
    b = torch_mode.predict_mc(x, 4000, seed=5)
    assert torch.equal(a.mean, packed.predict_mc(x, 4000, seed=5).mean)
    assert torch.equal(b.mean, torch_mode.predict_mc(x, 4000, seed=5).mean)
    assert not torch.equal(a.mean, b.mean)
    # Two independent MC estimates of the same expectation: within a few standard errors.
    se = ((a.variance + b.variance) / 4000).sqrt()
    assert bool(((a.mean - b.mean).abs() < 5 * se).all())
    torch.testing.assert_close(a.variance, b.variance, rtol=0.15, atol=1e-6)


@pytest.mark.parametrize("mode", ["packed", "torch"])
def test_setting_picks_the_mode_the_service_answers_with(model_dir: Path, mode: str) -> None:
    settings = Settings(model_dir=model_dir, mc_mask=mode)  # type: ignore[arg-type]
    config = deep_regression_config()
    engine = MLPEngine(config, random_tensors(config, seed=1), mask_mode=mode)  # type: ignore[arg-type]
    rows = [[0.5, -1.0, 2.0, 0.0]]
    expected = engine.predict_mc(torch.tensor(rows), 30, seed=8)
    with live_server(settings) as server:
        body = {"inputs": rows, "n_samples": 30, "seed": 8}
        r = httpx.post(f"{server.url}/v1/models/deep/predict/mc", json=body)
    assert r.status_code == 200
    assert r.json()["mean"] == expected.mean.tolist()
