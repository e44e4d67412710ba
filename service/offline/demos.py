"""The two demonstration models of the repository, each with evidence that its uncertainty works.

* ``digits``: a softmax MLP on scikit-learn's bundled 8x8 digits (no download). Its card
  puts eval and MC side by side (accuracy, NLL, 15-bin ECE) and measures how well the MC
  mutual information tells test digits from out-of-distribution images (AUROC).
* ``sine-gap``: a 1-D regression on a noisy sine observed on two separated intervals. Its
  card measures how much the MC standard deviation grows in the gap and outside the data.

Both train with ``service.training.fit``, seeded, and score through the serving engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.core.calibration import ood_scores
from service.core.engine import MLPEngine
from service.core.model import ModelConfig, Standardization
from service.offline.evaluation import (
    accuracy,
    auroc,
    expected_calibration_error,
    negative_log_likelihood,
)
from service.offline.options import DIGITS_OPTIONS, SINE_GAP_OPTIONS, TrainOptions
from service.offline.training import (
    TrainReport,
    classification_uncertainty_metrics,
    fit_classifier,
    fit_regression,
    interval_rows,
    publish,
    regression_config,
    score_regression,
)

_UNSET_SHA = "0" * 64

#: Where the sine is observed, where the gap is, and how far "outside" reaches.
SINE_INTERVALS = ((-5.0, -2.0), (2.0, 5.0))
SINE_OUTSIDE = ((-8.0, -6.0), (6.0, 8.0))
SINE_GAP = (-1.5, 1.5)
SINE_NOISE_STD = 0.1
DIGIT_PIXEL_MAX = 16.0
#: The first image of scikit-learn's digits, a 0: the example row of the digits model.
DIGIT_EXAMPLE = [
    0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0,
    0, 4, 12, 0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0,
    0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0,
]  # fmt: skip
#: Pixel names, row by row of the 8 x 8 image.
DIGIT_FEATURES = [f"pixel {r},{c}" for r in range(8) for c in range(8)]


# -- digits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledData:
    x_train: np.ndarray  # (N, D)
    y_train: np.ndarray  # (N,) int
    x_test: np.ndarray
    y_test: np.ndarray


def digits_data(seed: int, test_fraction: float = 0.2) -> LabelledData:
    """scikit-learn's 1797 digits (pixels 0..16), a seeded random train/test split."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]  # ``demo`` extra

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(test_fraction * len(x))
    test, train = order[:n_test], order[n_test:]
    return LabelledData(x[train].astype(float), y[train], x[test].astype(float), y[test])


def ood_images(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Out-of-distribution inputs shaped like ``x``: its pixels shuffled, and uniform noise."""
    rng = np.random.default_rng(seed)
    return {
        "shuffled_pixels": rng.permuted(x, axis=1),
        "uniform_noise": rng.uniform(0.0, DIGIT_PIXEL_MAX, size=x.shape),
    }


def train_digits(out: Path, opts: TrainOptions, *, version: str = "1") -> TrainReport:
    """Fit, score and write the digits classifier to ``out``."""
    start = time.perf_counter()
    data = digits_data(opts.seed)
    dim = data.x_train.shape[1]
    config = ModelConfig(
        name=out.name,
        version=version,
        task="classification",
        input_dim=dim,
        hidden=list(opts.hidden),
        output_dim=10,
        activation=opts.activation,
        dropout=[opts.dropout] * len(opts.hidden),
        input_dropout=opts.dropout if opts.input_dropout else 0.0,
        dropout_scaling=opts.scaling,
        # Raw pixel intensities in, scaled to [0, 1] inside the model.
        input_standardization=Standardization(mean=[0.0] * dim, std=[DIGIT_PIXEL_MAX] * dim),
        labels=[str(d) for d in range(10)],
        feature_names=DIGIT_FEATURES,
        example=[float(v) for v in DIGIT_EXAMPLE],
        sha256=_UNSET_SHA,
    )
    config, tensors = fit_classifier(
        config, data.x_train, data.x_train / DIGIT_PIXEL_MAX, data.y_train, opts
    )
    metrics = score_classification(MLPEngine(config, tensors), data, opts)
    return publish(
        out,
        config,
        tensors,
        metrics,
        opts,
        start,
        digits_card,
        dataset="sklearn.datasets.load_digits",
        n_train=len(data.x_train),
        n_test=len(data.x_test),
    )


def score_classification(
    engine: MLPEngine, data: LabelledData, opts: TrainOptions
) -> dict[str, float]:
    """Eval against MC on the test digits, and the AUROC of MC mutual information for OOD."""
    x = torch.as_tensor(data.x_test, dtype=torch.float32)
    y = data.y_test
    eval_probs = engine.predict(x).double().numpy()
    mc = engine.predict_mc(x, opts.mc_samples, opts.seed)
    assert mc.mutual_information is not None
    assert mc.entropy is not None
    mc_probs = mc.mean.numpy()
    mi_in = mc.mutual_information.numpy()
    metrics: dict[str, float] = {
        **classification_uncertainty_metrics(engine.config, mc, y),
        "test_accuracy_eval": accuracy(eval_probs, y),
        "test_accuracy_mc": accuracy(mc_probs, y),
        "test_nll_eval": negative_log_likelihood(eval_probs, y),
        "test_nll_mc": negative_log_likelihood(mc_probs, y),
        "test_ece15_eval": expected_calibration_error(eval_probs, y, 15),
        "test_ece15_mc": expected_calibration_error(mc_probs, y, 15),
        "test_mean_mutual_information": float(mi_in.mean()),
    }
    for kind, images in ood_images(data.x_test, opts.seed).items():
        ood = engine.predict_mc(torch.as_tensor(images, dtype=torch.float32), opts.mc_samples, 1)
        assert ood.mutual_information is not None
        assert ood.entropy is not None
        mi_ood = ood.mutual_information.numpy()
        metrics[f"ood_{kind}_mean_mutual_information"] = float(mi_ood.mean())
        metrics[f"ood_{kind}_auroc_mutual_information"] = auroc(mi_ood, mi_in)
        metrics[f"ood_{kind}_auroc_entropy"] = auroc(ood.entropy.numpy(), mc.entropy.numpy())
        reference = engine.config.calibration.ood_reference if engine.config.calibration else None
        if reference is not None:
            metrics[f"ood_{kind}_flagged"] = float((ood_scores(mi_ood, reference) > 1.0).mean())
    rounded = {k: round(v, 4) for k, v in metrics.items()}
    return {**rounded, "mc_samples": opts.mc_samples}


def _flags(opts: TrainOptions, defaults: TrainOptions) -> str:
    """The CLI flags that reproduce ``opts``: those that differ from the command's defaults."""
    mine, base = _flags_of(opts), _flags_of(defaults)
    return "".join(f" {k} {v}" for k, v in mine.items() if v != base[k])


def _flags_of(opts: TrainOptions) -> dict[str, str]:
    return {
        "--hidden": " ".join(str(h) for h in opts.hidden),
        "--activation": opts.activation,
        "--dropout": str(opts.dropout),
        "--epochs": str(opts.epochs),
        "--batch-size": str(opts.batch_size),
        "--lr": str(opts.lr),
        "--weight-decay": str(opts.weight_decay),
        "--seed": str(opts.seed),
        "--mc-samples": str(opts.mc_samples),
        "--scaling": opts.scaling,
    }


def digits_card(config: ModelConfig, opts: TrainOptions) -> str:
    t, m = config.training, config.metrics
    extra = _flags(opts, DIGITS_OPTIONS)
    kinds = {
        "shuffled_pixels": "test digits with their 64 pixels shuffled",
        "uniform_noise": "uniform noise on 0..16",
    }
    set_rows = "\n".join(
        f"| {pct}% | {m[f'set_coverage_{pct}']} | {m[f'set_size_{pct}']} |"
        for pct in (90, 95, 99)
        if f"set_coverage_{pct}" in m
    )
    ood_rows = "\n".join(
        f"| {text} | {m[f'ood_{k}_mean_mutual_information']} "
        f"| {m[f'ood_{k}_auroc_mutual_information']} | {m[f'ood_{k}_auroc_entropy']} |"
        for k, text in kinds.items()
    )
    return f"""# {config.name} (version {config.version})

Handwritten-digit classifier (softmax MLP with dropout), served by dropout-service.

## Data

scikit-learn's bundled digits (`sklearn.datasets.load_digits`, a copy of the UCI optical
recognition of handwritten digits test set): 1797 images of 8x8 pixels with intensities
0..16. Seeded random split: {t["n_train"]} training rows, {t["n_test"]} test rows.

Input: the 64 raw pixel intensities (0..16), row by row; the model scales them to [0, 1].
Output: probabilities of the labels "0" .. "9".

## Model and training

- 64 -> {" -> ".join(str(h) for h in config.hidden)} -> 10, {config.activation}, softmax;
  dropout p = {config.dropout[0]} after each hidden layer, none on the input
  ({config.dropout_scaling} scaling).
- Cross-entropy, Adam lr {opts.lr}, weight decay {opts.weight_decay}, batch
  {opts.batch_size}, {opts.epochs} epochs, seed {opts.seed}; {t["seconds"]} s on a shared
  2-core CPU.

Reproduce (bit for bit on the same torch build, CPU kind and thread count):

```sh
pip install -e '.[demo]'   # scikit-learn, for the data set
dropout-service train-digits --out models/{config.name}{extra}
```

## Test metrics: eval against MC dropout (T = {m["mc_samples"]})

| metric | eval | MC mean |
|---|---|---|
| accuracy | {m["test_accuracy_eval"]} | {m["test_accuracy_mc"]} |
| negative log-likelihood (nats) | {m["test_nll_eval"]} | {m["test_nll_mc"]} |
| expected calibration error (15 bins) | {m["test_ece15_eval"]} | {m["test_ece15_mc"]} |

## Calibration (fitted on a held-out 20% of the training rows)

Temperature {m["temperature"]} on the MC mean probabilities (served as
`calibrated_probabilities`): NLL {m["test_nll_mc"]} -> {m["test_nll_mc_calibrated"]}, ECE
{m["test_ece15_mc"]} -> {m["test_ece15_mc_calibrated"]} on the test digits. Conformal
prediction sets (`coverage` in `predict/mc`) on the test digits:

| coverage asked | share of sets holding the true digit | mean set size |
|---|---|---|
{set_rows}

Out-of-distribution flags (`out_of_distribution`: mutual information above its held-out
99th percentile): {m["test_ood_flagged"]} of the test digits flagged (false positives);
{m["ood_shuffled_pixels_flagged"]} of the shuffled-pixel images and
{m["ood_uniform_noise_flagged"]} of the noise images flagged.

## Out-of-distribution inputs

How well the MC mutual information (BALD, epistemic) and the predictive entropy separate
the {t["n_test"]} test digits from as many out-of-distribution images, as AUROC (0.5 is
chance, 1 is perfect). Mean mutual information on the test digits:
{m["test_mean_mutual_information"]} nats.

| out-of-distribution input | mean mutual information | AUROC, mutual information | AUROC, entropy |
|---|---|---|---|
{ood_rows}

## Intended use

A demonstration of classification uncertainty (mean probabilities, their variance,
predictive entropy and mutual information per row) and a model to test clients against.
Not a production digit recogniser: 8x8 images of one writer population only.
"""


# -- sine with a gap -------------------------------------------------------------------------


def sine_gap_data(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy samples of sin(x), x uniform on the two intervals: ``(n, 1)``, ``(n, 1)``."""
    rng = np.random.default_rng(seed)
    side = rng.integers(0, 2, size=n)
    lo = np.array([a for a, _ in SINE_INTERVALS])[side]
    hi = np.array([b for _, b in SINE_INTERVALS])[side]
    x = rng.uniform(lo, hi)
    y = np.sin(x) + SINE_NOISE_STD * rng.normal(size=n)
    return x[:, None], y[:, None]


def _grid(intervals: tuple[tuple[float, float], ...], per: int = 200) -> np.ndarray:
    return np.concatenate([np.linspace(a, b, per) for a, b in intervals])[:, None]


def train_sine_gap(out: Path, opts: TrainOptions, *, version: str = "1") -> TrainReport:
    """Fit, score and write the sine-gap regression model to ``out``."""
    start = time.perf_counter()
    x, y = sine_gap_data(opts.seed)
    n_test = len(x) // 5
    config = regression_config(out.name, version, 1, opts)
    # x = 0 lies in the gap between the two stretches of data: an example worth asking about.
    config = config.model_copy(update={"feature_names": ["x"], "example": [0.0]})
    config, tensors = fit_regression(config, x[n_test:], y[n_test:], opts)
    metrics = score_regression(config, tensors, x[:n_test], y[:n_test], opts)
    engine = MLPEngine(config, tensors)
    regions = {"on_data": SINE_INTERVALS, "gap": (SINE_GAP,), "outside": SINE_OUTSIDE}
    stds = {
        name: float(
            engine.predict_mc(torch.as_tensor(_grid(r), dtype=torch.float32), opts.mc_samples, 1)
            .variance.sqrt()
            .mean()
        )
        for name, r in regions.items()
    }
    metrics.update({f"mean_mc_std_{k}": round(v, 4) for k, v in stds.items()})
    metrics["std_ratio_gap"] = round(stds["gap"] / stds["on_data"], 2)
    metrics["std_ratio_outside"] = round(stds["outside"] / stds["on_data"], 2)
    off = (stds["gap"] + stds["outside"] * 2) / 3  # the off-data grid: 1 gap + 2 outside parts
    metrics["std_ratio_off_data"] = round(off / stds["on_data"], 2)
    return publish(
        out,
        config,
        tensors,
        metrics,
        opts,
        start,
        sine_gap_card,
        dataset="sine-gap",
        n_train=len(x) - n_test,
        n_test=n_test,
        intervals=SINE_INTERVALS,
        noise_std=SINE_NOISE_STD,
    )


def sine_gap_card(config: ModelConfig, opts: TrainOptions) -> str:
    t, m = config.training, config.metrics
    (a, b), (c, d) = SINE_INTERVALS
    (oa, ob), (oc, od) = SINE_OUTSIDE
    extra = _flags(opts, SINE_GAP_OPTIONS)
    return f"""# {config.name} (version {config.version})

1-D regression with a gap in its data, served by dropout-service: a picture of epistemic
uncertainty.

## Data

y = sin(x) + noise (std {SINE_NOISE_STD}), x uniform on [{a}, {b}] and [{c}, {d}], nothing
in between; {t["n_train"]} training rows and {t["n_test"]} held-out rows from the same two
intervals, drawn with seed {opts.seed}.

## Model and training

- 1 -> {" -> ".join(str(h) for h in config.hidden)} -> 1, {config.activation}, dropout
  p = {config.dropout[0]} after each hidden layer, none on the single input. GELU rather than
  ReLU: with ReLU the MC std in the gap is only about 1.4x that on the data (measured over
  4 seeds; `docs/uncertainty.md` says why).
- Input and target standardised; Adam lr {opts.lr}, weight decay {opts.weight_decay},
  batch {opts.batch_size}, {opts.epochs} epochs, seed {opts.seed}; {t["seconds"]} s on a
  shared 2-core CPU. `noise_variance` from a held-out 20%, as `dropout-service train`.

Reproduce (bit for bit on the same torch build, CPU kind and thread count):

```sh
dropout-service train-sine-gap --out models/{config.name}{extra}
```

## Uncertainty off the data (MC, T = {m["mc_samples"]})

Mean MC standard deviation (epistemic) over 200 evenly spaced points per region:

| region | x | mean MC std | ratio to on-data |
|---|---|---|---|
| on the data | [{a}, {b}] and [{c}, {d}] | {m["mean_mc_std_on_data"]} | 1 |
| in the gap | [{SINE_GAP[0]}, {SINE_GAP[1]}] | {m["mean_mc_std_gap"]} | {m["std_ratio_gap"]} |
| outside | [{oa}, {ob}] and [{oc}, {od}] | {m["mean_mc_std_outside"]} | {m["std_ratio_outside"]} |

Off-data (gap and outside together) to on-data ratio: **{m["std_ratio_off_data"]}**.

## Held-out metrics (same intervals)

| metric | value |
|---|---|
| RMSE, eval mode | {m["test_rmse_eval"]} |
| RMSE, MC mean | {m["test_rmse_mc"]} |
| log-likelihood, MC (Gal & Ghahramani eq. 8) | {m["test_log_likelihood_mc"]} |
{interval_rows(m)}
| noise std, 1 / tau fitted on held-out log-likelihood (true {SINE_NOISE_STD}) | {m["noise_std"]} |

## Intended use

A demonstration that MC-dropout uncertainty grows away from the training data (try
`predict/mc` at x = 0 and x = 7 against x = 3), and a model to test clients against.
"""
