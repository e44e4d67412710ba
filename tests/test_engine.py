"""Engine without HTTP: eval against plain torch, MC reproducibility and summaries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.core.engine import MLPEngine, entropy
from service.core.model import ModelConfig, Standardization
from service.core.repository import load_model, read_weights
from tests.helpers import (
    ROOT,
    cases,
    deep_regression_config,
    inputs,
    random_tensors,
    reference_eval,
    tiny_regression_config,
    tiny_tensors,
)


def test_tiny_model_known_answer() -> None:
    engine = MLPEngine(tiny_regression_config(), tiny_tensors())
    assert engine.predict(torch.tensor([[1.0, 2.0]])).tolist() == [[6.5]]


@pytest.mark.parametrize(("config", "tensors"), cases())
def test_eval_equals_plain_sequential_in_eval_mode(
    config: ModelConfig, tensors: dict[str, torch.Tensor]
) -> None:
    x = inputs(config)
    assert torch.equal(MLPEngine(config, tensors).predict(x), reference_eval(config, tensors, x))


@pytest.mark.parametrize(("config", "tensors"), cases())
def test_eval_is_deterministic_and_draws_no_random_number(
    config: ModelConfig, tensors: dict[str, torch.Tensor]
) -> None:
    engine, x = MLPEngine(config, tensors), inputs(config)
    state = torch.random.get_rng_state()
    first = engine.predict(x)
    for _ in range(5):
        assert torch.equal(engine.predict(x), first)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(("config", "tensors"), cases())
def test_mc_reproducible_per_seed_and_seeds_differ(
    config: ModelConfig, tensors: dict[str, torch.Tensor]
) -> None:
    engine, x = MLPEngine(config, tensors), inputs(config)
    a = engine.predict_mc(x, 50, seed=11, return_samples=True)
    b = engine.predict_mc(x, 50, seed=11, return_samples=True)
    c = engine.predict_mc(x, 50, seed=12)
    assert torch.equal(a.mean, b.mean)
    assert torch.equal(a.variance, b.variance)
    assert a.samples is not None
    assert b.samples is not None
    assert torch.equal(a.samples, b.samples)
    assert not torch.equal(a.mean, c.mean)


@pytest.mark.parametrize(("config", "tensors"), cases())
@pytest.mark.parametrize("chunk_elements", [1, 64, 1 << 21])
def test_summaries_equal_those_recomputed_from_samples(
    config: ModelConfig, tensors: dict[str, torch.Tensor], chunk_elements: int
) -> None:
    engine = MLPEngine(config, tensors, chunk_elements=chunk_elements)
    x = inputs(config, rows=5)
    r = engine.predict_mc(x, 97, seed=3, return_samples=True)
    assert r.samples is not None
    assert r.samples.shape == (97, 5, config.output_dim)
    s = r.samples.double()
    torch.testing.assert_close(r.mean, s.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.variance, s.var(0, correction=0), rtol=1e-9, atol=1e-12)
    if config.task == "classification":
        assert r.entropy is not None
        assert r.mutual_information is not None
        expected_h = entropy(s.mean(0))
        expected_mi = expected_h - entropy(s).mean(0)
        torch.testing.assert_close(r.entropy, expected_h, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r.mutual_information, expected_mi, rtol=1e-6, atol=1e-9)
        assert bool((r.mutual_information >= 0).all())
        assert bool((r.mutual_information <= r.entropy + 1e-12).all())
        torch.testing.assert_close(r.mean.sum(-1), torch.ones(5, dtype=torch.float64))
    else:
        assert r.entropy is None
        assert r.mutual_information is None


def test_zero_dropout_gives_zero_variance_and_the_eval_answer() -> None:
    config = deep_regression_config(dropout=[0.0, 0.0], input_dropout=0.0)
    tensors = random_tensors(config, 1)
    engine, x = MLPEngine(config, tensors), inputs(config)
    r = engine.predict_mc(x, 20, seed=1)
    assert torch.equal(r.variance, torch.zeros_like(r.variance))
    torch.testing.assert_close(r.mean.float(), engine.predict(x))


@pytest.mark.parametrize("scaling", ["inverted", "vanilla"])
def test_eval_equals_mc_expectation_in_the_linear_case(scaling: str) -> None:
    # Positive inputs and weights keep every ReLU in its linear part, so E[MC] = eval exactly.
    config = tiny_regression_config(dropout=[0.3], dropout_scaling=scaling)
    engine = MLPEngine(config, tiny_tensors())
    x = torch.tensor([[1.0, 2.0]])
    eval_y = float(engine.predict(x))
    expected = 6.5 if scaling == "inverted" else 0.7 * 6.0 + 0.5
    assert eval_y == pytest.approx(expected, abs=1e-6)
    r = engine.predict_mc(x, 20000, seed=0)
    se = float(r.variance.sqrt()) / 20000**0.5
    assert abs(float(r.mean) - eval_y) < 4 * se


def test_first_layers_before_dropout_run_once_and_samples_are_batched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = deep_regression_config(input_dropout=0.0)
    engine = MLPEngine(config, random_tensors(config, 1), chunk_elements=16 * 10 * 40)
    calls: list[tuple[int, tuple[int, ...]]] = []
    linear = engine._linear

    def spy(i: int, h: torch.Tensor, **kwargs: bool) -> torch.Tensor:
        calls.append((i, tuple(h.shape)))
        return linear(i, h, **kwargs)

    monkeypatch.setattr(engine, "_linear", spy)
    engine.predict_mc(inputs(config, rows=10), 200, seed=0)
    chunk = engine.chunk_size(10, 200)
    assert chunk == 40
    assert calls.count((0, (10, 4))) == 1  # the deterministic first layer, once
    assert [c for c in calls if c[0] == 1] == [(1, (chunk, 10, 16))] * (200 // chunk)


def test_chunk_size_bounds_memory_and_depends_only_on_shape() -> None:
    config = deep_regression_config()
    engine = MLPEngine(config, random_tensors(config, 1))
    assert engine.chunk_size(1024, 10_000) * 1024 * 16 <= engine.chunk_elements
    assert engine.chunk_size(1, 100) == 100
    assert engine.chunk_size(10**7, 100) == 1


def test_subnormal_weights_change_no_answer() -> None:
    """Weight decay leaves weights below float32's normal range; the engine drops them (on
    Intel CPUs one slows a matrix product some 40 times) and answers the same bits."""
    config = deep_regression_config()
    tensors = random_tensors(config, 3)
    g = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        picked = torch.rand(t.shape, generator=g) < 0.1
        tensors[name] = torch.where(picked, torch.full_like(t, 3e-41), t)
    assert any(bool(((t != 0) & (t.abs() < 1.2e-38)).any()) for t in tensors.values())
    x = inputs(config, rows=64)
    assert torch.equal(MLPEngine(config, tensors).predict(x), reference_eval(config, tensors, x))


@pytest.mark.parametrize("name", ["concrete", "digits", "sine-gap"])
def test_shipped_models_answer_as_the_plain_module(name: str) -> None:
    """The shipped weights, subnormals included, in a plain nn.Sequential in eval mode."""
    model = load_model(ROOT / "models" / name)
    tensors = read_weights(model.path, model.config)
    x = inputs(model.config, rows=64, seed=1) * 3 + 1
    assert torch.equal(model.engine.predict(x), reference_eval(model.config, tensors, x))


def few_row_cases() -> list[tuple[str, ModelConfig, dict[str, torch.Tensor]]]:
    """Engines whose few-row eval standardises in Python, and two that must not."""
    one = deep_regression_config(
        input_dim=1,
        input_standardization=Standardization(mean=[3.0], std=[0.1]),
        target_standardization=Standardization(mean=[1e3, -2.0], std=[1e-3, 7.0]),
    )
    extreme = deep_regression_config(  # sums that overflow, quotients below float32's normals
        input_standardization=Standardization(
            mean=[-3e38, 0.0, 1e-30, 5.0], std=[1.0, 1e30, 3.0, 7e-3]
        ),
        target_standardization=Standardization(mean=[3e38, 0.0], std=[1e30, 1e-30]),
    )
    zeroed = deep_regression_config(  # float32 makes this std 0: division stays in torch
        input_standardization=Standardization(mean=[0.0] * 4, std=[1.0, 1e-50, 1.0, 1.0]),
    )
    named = [("tiny", *cases()[0]), ("deep", *cases()[1]), ("clf", *cases()[2])]
    named += [("vanilla", *cases()[3]), ("one input", one, random_tensors(one, 4))]
    named += [("extreme", extreme, random_tensors(extreme, 5))]
    named += [("zeroed std", zeroed, random_tensors(zeroed, 6))]
    concrete = load_model(ROOT / "models" / "concrete")
    return [
        *named,
        ("concrete", concrete.config, read_weights(ROOT / "models" / "concrete", concrete.config)),
    ]


def awkward_rows(rows: int, width: int, seed: int) -> torch.Tensor:
    """Rows over float32's whole range: subnormals, signed zeros, the largest values."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** (torch.rand(rows, width, generator=g, dtype=torch.float64) * 86 - 45)
    x = (torch.randn(rows, width, generator=g, dtype=torch.float64) * magnitude).float()
    x[0, 0], x[-1, -1] = -0.0, 3.4e38
    return x


@pytest.mark.parametrize(
    ("name", "config", "tensors"), few_row_cases(), ids=lambda c: c if isinstance(c, str) else ""
)
def test_a_few_rows_in_python_give_the_bits_of_the_padded_torch_pass(
    name: str, config: ModelConfig, tensors: dict[str, torch.Tensor]
) -> None:
    """``predict_block`` standardises a few rows in Python (each float32 operation rounded
    once, as torch's kernels round it): the same bits as ``predict`` over the zero-padded
    block, at every row count up to the block, over the whole float32 range."""
    engine = MLPEngine(config, tensors)
    assert engine._few_in_python == (name != "zeroed std")
    block = 16
    for rows in range(1, block + 1):
        for seed, x in enumerate(
            (inputs(config, rows, seed=rows), awkward_rows(rows, config.input_dim, rows))
        ):
            padded = engine.predict(F.pad(x, (0, 0, 0, block - rows)))[:rows]
            few = engine.predict_block(x, block)
            assert few.dtype == padded.dtype
            assert few.shape == padded.shape
            assert few.numpy().tobytes() == padded.numpy().tobytes(), (name, rows, seed)
