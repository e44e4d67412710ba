"""The torch engine and modules against the numpy reference, with the very masks torch drew."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.core.engine import MLPEngine, dropout_noise
from service.core.model import (
    ModelConfig,
    bias_name,
    build_sequential,
    load_into_sequential,
    weight_name,
)
from tests.helpers import random_tensors, tiny_regression_config
from tests.numpy_dropout import Layer, forward_test, forward_train

P = 0.4
SCALINGS = ["inverted", "vanilla"]
HIDDEN = [[8], [8, 6]]  # the classic two-layer net, and one more hidden layer


def config(hidden: list[int], scaling: str) -> ModelConfig:
    return tiny_regression_config(
        input_dim=3, hidden=hidden, dropout=[P] * len(hidden), dropout_scaling=scaling
    )


def layers(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> list[Layer]:
    return [
        (tensors[weight_name(i)].double().numpy(), tensors[bias_name(i)].double().numpy())
        for i in range(cfg.n_linear)
    ]


def replay_masks(cfg: ModelConfig, lead: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """The 0/1 masks a generator seeded ``seed`` yields, hidden layer by hidden layer."""
    g = torch.Generator().manual_seed(seed)
    return [dropout_noise((*lead, w), P, g, "vanilla").double().numpy() for w in cfg.hidden]


def x_rows(rows: int = 7) -> torch.Tensor:
    return torch.randn(rows, 3, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_engine_eval_equals_numpy_test_mode(hidden: list[int], scaling: str) -> None:
    cfg = config(hidden, scaling)
    tensors = random_tensors(cfg, seed=3)
    x = x_rows()
    got = MLPEngine(cfg, tensors).predict(x).double().numpy()
    np.testing.assert_allclose(
        got,
        forward_test(x.double().numpy(), layers(cfg, tensors), P, scaling),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_engine_mc_samples_equal_numpy_train_mode_with_the_same_masks(
    hidden: list[int], scaling: str
) -> None:
    cfg = config(hidden, scaling)
    tensors = random_tensors(cfg, seed=4)
    x, t = x_rows(), 50
    samples = MLPEngine(cfg, tensors).predict_mc(x, t, seed=9, return_samples=True).samples
    assert samples is not None
    masks = replay_masks(cfg, (t, len(x)), seed=9)
    expected = forward_train(x.double().numpy(), layers(cfg, tensors), P, masks, scaling)
    np.testing.assert_allclose(samples.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.unique(expected.round(6)).size > t  # the masks really vary across samples


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_torch_module_in_train_mode_equals_numpy_with_its_masks(
    hidden: list[int], scaling: str
) -> None:
    cfg = config(hidden, scaling)
    tensors = random_tensors(cfg, seed=6)
    seq = build_sequential(cfg)
    load_into_sequential(seq, tensors)
    x = x_rows()
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(21)
        got = seq.train()(x).double().numpy()
    masks = replay_masks(cfg, (len(x),), seed=21)
    expected = forward_train(x.double().numpy(), layers(cfg, tensors), P, masks, scaling)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        evaluated = seq.eval()(x).double().numpy()
    np.testing.assert_allclose(
        evaluated,
        forward_test(x.double().numpy(), layers(cfg, tensors), P, scaling),
        rtol=1e-5,
        atol=1e-6,
    )


def test_vanilla_equals_inverted_with_the_next_layer_scaled_by_1_minus_p() -> None:
    # The two schemes are one network up to where 1/(1-p) sits: in the mask or in the weights.
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(8, 3)), rng.normal(size=8)
    w2, b2 = rng.normal(size=(1, 8)), rng.normal(size=1)
    x = rng.normal(size=(5, 3))
    masks = [(rng.random((5, 8)) >= P).astype(float)]
    inverted = [(w1, b1), (w2, b2)]
    vanilla = [(w1, b1), (w2 / (1 - P), b2)]
    np.testing.assert_allclose(
        forward_train(x, inverted, P, masks, "inverted"),
        forward_train(x, vanilla, P, masks, "vanilla"),
    )
    np.testing.assert_allclose(
        forward_test(x, inverted, P, "inverted"), forward_test(x, vanilla, P, "vanilla")
    )
    assert not np.allclose(
        forward_test(x, vanilla, P, "inverted"), forward_test(x, vanilla, P, "vanilla")
    )
