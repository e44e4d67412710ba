"""Property tests of the engine's public behaviour: for any valid model, input and seed.

Hypothesis draws small architectures (depth, widths, activation, dropout, scaling, task,
standardisation), weights, input rows and seeds. ``PROPERTY_EXAMPLES`` sets the examples per
property (``make fuzz`` raises it).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.core.engine import MLPEngine
from service.core.model import ModelConfig, Standardization
from tests.helpers import SHA_PLACEHOLDER, random_tensors, reference_eval

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "40"))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
MAX_SEED = 2**63 - 1
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def configs(draw: st.DrawFn, scaling: str | None = None) -> ModelConfig:
    input_dim = draw(st.integers(1, 6))
    hidden = draw(st.lists(st.integers(1, 24), min_size=1, max_size=3))
    output_dim = draw(st.integers(1, 4))
    task = draw(st.sampled_from(["regression", "classification"]))
    p = st.sampled_from([0.0, 0.05, 0.1, 0.5, 0.9])
    fields: dict[str, Any] = {
        "name": "prop",
        "version": "1",
        "task": task,
        "input_dim": input_dim,
        "hidden": hidden,
        "output_dim": output_dim,
        "activation": draw(st.sampled_from(["relu", "tanh", "gelu", "sigmoid"])),
        "dropout": draw(st.lists(p, min_size=len(hidden), max_size=len(hidden))),
        "input_dropout": draw(p),
        "dropout_scaling": scaling or draw(st.sampled_from(["inverted", "vanilla"])),
        "sha256": SHA_PLACEHOLDER,
    }
    if draw(st.booleans()):
        fields["input_standardization"] = Standardization(
            mean=draw(st.lists(finite, min_size=input_dim, max_size=input_dim)),
            std=draw(st.lists(st.floats(0.01, 100), min_size=input_dim, max_size=input_dim)),
        )
    if task == "regression":
        fields["noise_variance"] = [0.5] * output_dim
        if draw(st.booleans()):
            fields["target_standardization"] = Standardization(
                mean=[1.0] * output_dim, std=[2.0] * output_dim
            )
    else:
        fields["labels"] = [f"c{i}" for i in range(output_dim)]
    return ModelConfig(**fields)


@st.composite
def engines_and_inputs(
    draw: st.DrawFn, scaling: str | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], torch.Tensor]:
    config = draw(configs(scaling))
    tensors = random_tensors(config, seed=draw(st.integers(0, 2**31)))
    rows = draw(st.integers(1, 8))
    values = draw(
        st.lists(finite, min_size=rows * config.input_dim, max_size=rows * config.input_dim)
    )
    return config, tensors, torch.tensor(values).reshape(rows, config.input_dim)


@PROPERTY
@given(case=engines_and_inputs(), n_samples=st.integers(2, 200), seed=st.integers(0, MAX_SEED))
def test_mc_moments_are_finite_nonnegative_and_reproducible(
    case: tuple[ModelConfig, dict[str, torch.Tensor], torch.Tensor], n_samples: int, seed: int
) -> None:
    config, tensors, x = case
    engine = MLPEngine(config, tensors)
    r = engine.predict_mc(x, n_samples, seed)
    shape = (x.shape[0], config.output_dim)
    assert r.mean.shape == shape
    assert r.variance.shape == shape
    assert bool(torch.isfinite(r.mean).all())
    assert bool(torch.isfinite(r.variance).all())
    assert bool((r.variance >= 0).all())
    again = MLPEngine(config, tensors).predict_mc(x, n_samples, seed)  # a fresh engine, too
    assert torch.equal(r.mean, again.mean)
    assert torch.equal(r.variance, again.variance)
    if config.task == "classification":
        assert r.entropy is not None
        assert r.mutual_information is not None
        assert bool(torch.isfinite(r.entropy).all())
        assert bool((r.mutual_information >= 0).all())
        assert bool((r.mutual_information <= r.entropy + 1e-9).all())
        torch.testing.assert_close(
            r.mean.sum(-1), torch.ones(shape[0], dtype=r.mean.dtype), rtol=0, atol=1e-5
        )


@PROPERTY
@given(case=engines_and_inputs(), n_samples=st.integers(2, 50), seed=st.integers(0, MAX_SEED))
def test_returned_samples_replay_and_summarise_to_the_moments(
    case: tuple[ModelConfig, dict[str, torch.Tensor], torch.Tensor], n_samples: int, seed: int
) -> None:
    config, tensors, x = case
    engine = MLPEngine(config, tensors)
    r = engine.predict_mc(x, n_samples, seed, return_samples=True)
    assert r.samples is not None
    assert r.samples.shape == (n_samples, x.shape[0], config.output_dim)
    s = r.samples.double()
    torch.testing.assert_close(r.mean, s.mean(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r.variance, s.var(0, correction=0), rtol=1e-6, atol=1e-9)
    replay = engine.predict_mc(x, n_samples, seed, return_samples=True)
    assert replay.samples is not None
    assert torch.equal(r.samples, replay.samples)


@PROPERTY
@given(case=engines_and_inputs(scaling="inverted"))
def test_eval_equals_the_plain_torch_model_in_eval_mode(
    case: tuple[ModelConfig, dict[str, torch.Tensor], torch.Tensor],
) -> None:
    config, tensors, x = case
    engine = MLPEngine(config, tensors)
    state = torch.random.get_rng_state()
    y = engine.predict(x)
    assert torch.equal(torch.random.get_rng_state(), state)  # eval draws no random number
    torch.testing.assert_close(y, reference_eval(config, tensors, x))
    assert torch.equal(engine.predict(x), y)
