"""Gal & Ghahramani's (2016) UCI regression protocol, split by split, through the serving engine.

For each published split: standardise with training statistics; train one MLP per
(dropout rate, tau) of the data set's grid on the first 80% of the training rows and keep
the pair with the best MC log-likelihood on the last 20%; retrain on all training rows with
``reg = lengthscale**2 * (1 - p) / (2 N tau)``; score the test rows with the engine's own MC
path (test RMSE and the log-likelihood of eq. 8 in original units, with that tau).

Every split's grid trains at once as one stacked model (``service.offline.stacked``), and so do the
final models of all splits.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from service.core.engine import MLPEngine
from service.core.model import ModelConfig, Standardization
from service.offline.datasets import PUBLISHED, Split, UCIDataset
from service.offline.evaluation import interval_coverage, mc_log_likelihood, rmse
from service.offline.options import ProtocolOptions
from service.offline.stacked import Stack, mc_log_likelihood_stack, train_stack
from service.offline.training import standardization

_UNSET_SHA = "0" * 64


@dataclass(frozen=True)
class SplitResult:
    split: int
    dropout: float
    tau: float
    validation_ll: float
    test_rmse_eval: float
    test_rmse_mc: float
    test_ll: float
    test_coverage_95: float


@dataclass
class ProtocolResult:
    dataset: str
    options: ProtocolOptions
    epochs: int
    hidden: int
    splits: list[SplitResult] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, key: str) -> tuple[float, float]:
        """Mean and standard error (sample std / sqrt(n)) of a per-split metric."""
        v = np.array([getattr(s, key) for s in self.splits])
        se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
        return float(v.mean()), se

    def to_dict(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "options": asdict(self.options),
            "epochs": self.epochs,
            "hidden": self.hidden,
            "seconds": round(self.seconds, 1),
            "summary": {
                k: self.summary(k)
                for k in ("test_rmse_mc", "test_rmse_eval", "test_ll", "test_coverage_95")
            },
            "splits": [asdict(s) for s in self.splits],
        }


@dataclass(frozen=True)
class _Prepared:
    """A split cut the protocol's way, inputs standardised, as ``(S, N, .)`` tensors."""

    x: torch.Tensor  # (S, N, D) standardised
    y: torch.Tensor  # (S, N, 1) standardised
    x_std: list[Standardization]
    y_std: list[Standardization]


def _prepare(pairs: list[tuple[np.ndarray, np.ndarray]]) -> _Prepared:
    xs, ys, sx_all, sy_all = [], [], [], []
    for x, y in pairs:
        sx, sy = standardization(x), standardization(y)
        xs.append((x - np.asarray(sx.mean)) / np.asarray(sx.std))
        ys.append((y - np.asarray(sy.mean)) / np.asarray(sy.std))
        sx_all.append(sx)
        sy_all.append(sy)

    def t(v: list[np.ndarray]) -> torch.Tensor:
        return torch.as_tensor(np.stack(v), dtype=torch.float32)

    return _Prepared(t(xs), t(ys), sx_all, sy_all)


def _fit_stack(
    x: torch.Tensor,
    y: torch.Tensor,
    pairs: list[tuple[float, float]],
    hidden: int,
    epochs: int,
    opts: ProtocolOptions,
    generator: torch.Generator,
    desc: str,
) -> Stack:
    """Train model ``m`` on ``x[m] (N, D)``, ``y[m] (N, 1)`` with the pair ``pairs[m]``."""
    p = torch.tensor([pt[0] for pt in pairs], dtype=torch.float32)
    tau = torch.tensor([pt[1] for pt in pairs], dtype=torch.float32)
    n = x.shape[1]
    reg = opts.lengthscale**2 * (1 - p) / (2.0 * n * tau)
    return train_stack(
        x,
        y,
        (hidden,),
        p,
        reg,
        epochs=epochs,
        batch_size=opts.batch_size,
        generator=generator,
        desc=desc,
        progress=opts.progress,
    )


def _grid_search(
    dataset: UCIDataset,
    splits: list[Split],
    grid: list[tuple[float, float]],
    hidden: int,
    epochs: int,
    opts: ProtocolOptions,
    generator: torch.Generator,
) -> torch.Tensor:
    """Validation MC log-likelihood ``(S, G)`` of every grid pair on every split.

    S x G models in one stack, each fitted on its split's first 80% of training rows (in
    file order, as the paper's code) and scored on the last 20%.
    """
    s, g = len(splits), len(grid)
    n_fit = int((1 - opts.validation_fraction) * len(splits[0].x_train))
    fit = _prepare([(sp.x_train[:n_fit], sp.y_train[:n_fit]) for sp in splits])
    stack = _fit_stack(
        fit.x.repeat_interleave(g, 0),
        fit.y.repeat_interleave(g, 0),
        grid * s,
        hidden,
        epochs,
        opts,
        generator,
        f"{dataset.name}: grid of {s}x{g}",
    )
    val_x = torch.stack(
        [
            torch.as_tensor((sp.x_train[n_fit:] - np.asarray(sx.mean)) / np.asarray(sx.std))
            for sp, sx in zip(splits, fit.x_std, strict=True)
        ]
    ).float()
    val_y = torch.as_tensor(np.stack([sp.y_train[n_fit:, 0] for sp in splits]))
    y_mean = torch.tensor([sy.mean[0] for sy in fit.y_std]).repeat_interleave(g)
    y_sd = torch.tensor([sy.std[0] for sy in fit.y_std]).repeat_interleave(g)
    tau = torch.tensor([pt[1] for pt in grid], dtype=torch.float32).repeat(s).double()
    return mc_log_likelihood_stack(
        stack,
        val_x.repeat_interleave(g, 0),
        val_y.repeat_interleave(g, 0),
        (y_mean, y_sd),
        tau,
        opts.val_mc_samples,
        generator,
    ).view(s, g)


def run_protocol(dataset: UCIDataset, opts: ProtocolOptions) -> ProtocolResult:
    """The whole protocol on ``dataset``'s first ``opts.splits`` splits."""
    start = time.perf_counter()
    hidden = opts.hidden or int(dataset.protocol("n_hidden")[0])
    epochs = opts.epochs or int(dataset.protocol("n_epochs")[0] * opts.epoch_multiplier)
    rates, taus = dataset.protocol("dropout_rates"), dataset.protocol("tau_values")
    grid = [(p, tau) for p in rates for tau in taus]
    n_splits = min(opts.splits or dataset.n_splits(), dataset.n_splits())
    splits = [dataset.split(k) for k in range(n_splits)]
    generator = torch.Generator().manual_seed(opts.seed)

    val_ll = _grid_search(dataset, splits, grid, hidden, epochs, opts, generator)
    best = val_ll.argmax(dim=1).tolist()  # first best on ties, as the paper's strict ">"
    # Every split's best pair, retrained on all its training rows: one stack again.
    full = _prepare([(sp.x_train, sp.y_train) for sp in splits])
    pairs = [grid[b] for b in best]
    final = _fit_stack(
        full.x, full.y, pairs, hidden, epochs, opts, generator, f"{dataset.name}: final x{n_splits}"
    )
    result = ProtocolResult(dataset.name, opts, epochs, hidden)
    for k, split in enumerate(splits):
        config = protocol_config(dataset, hidden, pairs[k], full.x_std[k], full.y_std[k])
        scores = score_split(MLPEngine(config, final.tensors(k)), split, opts, seed=opts.seed + k)
        result.splits.append(
            SplitResult(
                split=k,
                dropout=pairs[k][0],
                tau=pairs[k][1],
                validation_ll=float(val_ll[k, best[k]]),
                **scores,
            )
        )
    result.seconds = time.perf_counter() - start
    return result


def protocol_config(
    dataset: UCIDataset,
    hidden: int,
    pair: tuple[float, float],
    sx: Standardization,
    sy: Standardization,
) -> ModelConfig:
    """The served form of one protocol model: p before both layers, noise 1/tau."""
    p, tau = pair
    return ModelConfig(
        name=dataset.name.lower()[:64],
        version="protocol",
        task="regression",
        input_dim=len(sx.mean),
        hidden=[hidden],
        output_dim=1,
        dropout=[p],
        input_dropout=p,
        input_standardization=sx,
        target_standardization=sy,
        noise_variance=[1.0 / tau],
        sha256=_UNSET_SHA,
    )


def score_split(
    engine: MLPEngine, split: Split, opts: ProtocolOptions, *, seed: int
) -> dict[str, float]:
    """Test RMSE (eval and MC), the paper's MC log-likelihood and 95% coverage of one split."""
    x = torch.as_tensor(split.x_test, dtype=torch.float32)
    y = split.y_test[:, 0]
    mc = engine.predict_mc(x, opts.mc_samples, seed, return_samples=True)
    assert mc.samples is not None
    assert engine.config.noise_variance is not None
    noise = engine.config.noise_variance[0]
    mean = mc.mean.numpy()[:, 0]
    return {
        "test_rmse_eval": rmse(y, engine.predict(x).double().numpy()[:, 0]),
        "test_rmse_mc": rmse(y, mean),
        "test_ll": mc_log_likelihood(y, mc.samples.double().numpy()[:, :, 0], 1.0 / noise),
        "test_coverage_95": interval_coverage(y, mean, mc.variance.numpy()[:, 0] + noise),
    }


def results_table(results: list[ProtocolResult]) -> str:
    """Markdown: ours next to the published column, mean +- s.e. over the splits run."""
    lines = [
        "| data set | splits | epochs | RMSE (ours) | RMSE (published) | test LL (ours) "
        "| test LL (published) | 95% coverage | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rmse_pub, ll_pub = PUBLISHED.get(r.dataset, ("-", "-"))
        lines.append(
            f"| {r.dataset} | {len(r.splits)} | {r.epochs} | {_pm(r, 'test_rmse_mc', 2)} "
            f"| {rmse_pub} | {_pm(r, 'test_ll', 2)} | {ll_pub} "
            f"| {_pm(r, 'test_coverage_95', 3)} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def _pm(result: ProtocolResult, key: str, digits: int) -> str:
    mean, se = result.summary(key)
    return f"{mean:.{digits}f} +- {se:.{digits}f}"
