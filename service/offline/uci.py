"""Gal & Ghahramani's (2016) UCI regression protocol, split by split, through the serving engine.

For each published split: standardise with training statistics; train one MLP per
(dropout rate, tau) of the data set's grid on the first 80% of the training rows, with
``reg = lengthscale**2 * (1 - p) / (2 N tau)`` as the paper; on the last 20%, fit each
model's noise precision tau over a continuous range (``fit_precision``: the paper scores
the three grid values only) and keep the model with the best validation MC log-likelihood.
Its validation rows also give the calibration the served model carries: the conformal
scores ``|y - mean| / sqrt(variance + 1/tau)`` and the 99th percentile of the MC std.
Retrain the chosen pair on all training rows; score the test rows with the engine's own MC
path: RMSE, the log-likelihood of eq. 8 in original units with the fitted tau, and the
coverage and mean width of the 90% and 95% intervals, conformal and Gaussian.

The calibration comes from the model fitted on 80% of the rows and is applied to the one
retrained on all of them (which has seen the validation rows), so the conformal guarantee is
approximate; the test coverage measures how well it holds.

Every split's grid trains at once as one stacked model (``service.offline.stacked``), and so do the
final models of all splits.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from service.core.calibration import (
    Calibration,
    conformal_quantile,
    gaussian_z,
    ood_reference,
    regression_scores,
)
from service.core.engine import MLPEngine
from service.core.model import ModelConfig, Standardization
from service.offline.datasets import PUBLISHED, Split, UCIDataset
from service.offline.evaluation import (
    fit_precision,
    interval_coverage,
    interval_width,
    mc_log_likelihood,
    rmse,
)
from service.offline.options import ProtocolOptions
from service.offline.stacked import Stack, mc_samples_stack, train_stack
from service.offline.training import standardization

_UNSET_SHA = "0" * 64
#: The coverages every split is scored at.
LEVELS = (0.9, 0.95)


@dataclass(frozen=True)
class SplitResult:
    split: int
    dropout: float
    tau_grid: float  # the grid's tau: the L2 strength it trained with
    tau: float  # the noise precision fitted on the validation rows: served and scored
    validation_ll: float  # with tau
    validation_ll_grid_tau: float  # the paper's criterion, for comparison
    test_rmse_eval: float
    test_rmse_mc: float
    test_ll: float
    test_ll_grid_tau: float  # the same model scored with tau_grid, as the paper would
    test_coverage_90: float  # Gaussian: mean +- z sqrt(variance + 1/tau)
    test_coverage_95: float
    test_width_90: float
    test_width_95: float
    conformal_coverage_90: float
    conformal_coverage_95: float
    conformal_width_90: float
    conformal_width_95: float


#: Per-split metrics ``ProtocolResult.summary`` averages in its JSON.
SUMMARY_KEYS = tuple(
    name for name in SplitResult.__dataclass_fields__ if name.startswith(("test_", "conformal_"))
)


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
            "summary": {k: self.summary(k) for k in SUMMARY_KEYS},
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


@dataclass(frozen=True)
class _Choice:
    """One split's chosen grid pair, its fitted tau, and what its validation rows gave."""

    pair: tuple[float, float]  # (p, tau of the grid)
    tau: float
    validation_ll: float
    validation_ll_grid_tau: float
    calibration: Calibration


def _grid_search(
    dataset: UCIDataset,
    splits: list[Split],
    grid: list[tuple[float, float]],
    hidden: int,
    epochs: int,
    opts: ProtocolOptions,
    generator: torch.Generator,
) -> list[_Choice]:
    """Every split's best grid pair by validation MC log-likelihood, with tau fitted.

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
    y_mean = torch.tensor([sy.mean[0] for sy in fit.y_std]).repeat_interleave(g)
    y_sd = torch.tensor([sy.std[0] for sy in fit.y_std]).repeat_interleave(g)
    samples = mc_samples_stack(
        stack, val_x.repeat_interleave(g, 0), (y_mean, y_sd), opts.val_mc_samples, generator
    ).view(s, g, opts.val_mc_samples, -1)
    choices = []
    for k, sp in enumerate(splits):
        y = sp.y_train[n_fit:, 0]
        runs = []
        for j, (_, tau_grid) in enumerate(grid):
            draws = samples[k, j].double().numpy()
            tau = fit_precision(y, draws)
            runs.append((mc_log_likelihood(y, draws, tau), tau, tau_grid, draws))
        j = max(range(g), key=lambda i: runs[i][0])  # first best on ties
        ll, tau, tau_grid, draws = runs[j]
        mean, variance = draws.mean(0), draws.var(0)
        calibration = Calibration(
            scores=regression_scores(y[:, None], mean[:, None], variance[:, None] + 1.0 / tau),
            ood_reference=ood_reference(np.sqrt(variance)[:, None]),
            held_out_rows=len(y),
            fitted_on=f"{dataset.name} split {k}: the last 20% of its training rows",
        )
        choices.append(
            _Choice(grid[j], tau, ll, mc_log_likelihood(y, draws, tau_grid), calibration)
        )
    return choices


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

    choices = _grid_search(dataset, splits, grid, hidden, epochs, opts, generator)
    # Every split's best pair, retrained on all its training rows: one stack again.
    full = _prepare([(sp.x_train, sp.y_train) for sp in splits])
    pairs = [c.pair for c in choices]
    final = _fit_stack(
        full.x, full.y, pairs, hidden, epochs, opts, generator, f"{dataset.name}: final x{n_splits}"
    )
    result = ProtocolResult(dataset.name, opts, epochs, hidden)
    for k, (split, c) in enumerate(zip(splits, choices, strict=True)):
        config = protocol_config(dataset, hidden, (c.pair[0], c.tau), full.x_std[k], full.y_std[k])
        config = config.model_copy(update={"calibration": c.calibration})
        engine = MLPEngine(config, final.tensors(k))
        scores = score_split(engine, split, opts, seed=opts.seed + k, tau_grid=c.pair[1])
        result.splits.append(
            SplitResult(
                split=k,
                dropout=c.pair[0],
                tau_grid=c.pair[1],
                tau=c.tau,
                validation_ll=c.validation_ll,
                validation_ll_grid_tau=c.validation_ll_grid_tau,
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
    engine: MLPEngine, split: Split, opts: ProtocolOptions, *, seed: int, tau_grid: float
) -> dict[str, float]:
    """Test RMSE (eval and MC), the paper's MC log-likelihood (with the served tau and with
    the grid's), and the coverage and mean width of Gaussian and conformal intervals."""
    x = torch.as_tensor(split.x_test, dtype=torch.float32)
    y = split.y_test[:, 0]
    mc = engine.predict_mc(x, opts.mc_samples, seed, return_samples=True)
    assert mc.samples is not None
    config = engine.config
    assert config.noise_variance is not None
    assert config.calibration is not None
    noise = config.noise_variance[0]
    mean = mc.mean.numpy()[:, 0]
    predictive = mc.variance.numpy()[:, 0] + noise
    samples = mc.samples.double().numpy()[:, :, 0]
    scores = {
        "test_rmse_eval": rmse(y, engine.predict(x).double().numpy()[:, 0]),
        "test_rmse_mc": rmse(y, mean),
        "test_ll": mc_log_likelihood(y, samples, 1.0 / noise),
        "test_ll_grid_tau": mc_log_likelihood(y, samples, tau_grid),
    }
    for level in LEVELS:
        pct = round(100 * level)
        z = gaussian_z(level)
        scores[f"test_coverage_{pct}"] = interval_coverage(y, mean, predictive, q=z)
        scores[f"test_width_{pct}"] = interval_width(predictive, z)
        q = conformal_quantile(config.calibration.scores, level)
        q = math.inf if q is None else q  # too few validation rows: an unbounded interval
        scores[f"conformal_coverage_{pct}"] = interval_coverage(y, mean, predictive, q=q)
        scores[f"conformal_width_{pct}"] = interval_width(predictive, q)
    return scores


def results_table(results: list[ProtocolResult]) -> str:
    """Markdown: ours next to the published column, mean +- s.e. over the splits run; then
    the coverage and mean width of the 95% and 90% intervals, conformal and Gaussian."""
    lines = [
        "| data set | splits | epochs | RMSE (ours) | RMSE (published) | test LL (ours) "
        "| test LL (published) | test LL, grid tau | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rmse_pub, ll_pub = PUBLISHED.get(r.dataset, ("-", "-"))
        lines.append(
            f"| {r.dataset} | {len(r.splits)} | {r.epochs} | {_pm(r, 'test_rmse_mc', 2)} "
            f"| {rmse_pub} | {_pm(r, 'test_ll', 2)} | {ll_pub} "
            f"| {_pm(r, 'test_ll_grid_tau', 2)} | {r.seconds:.0f} |"
        )
    lines += [
        "",
        "| data set | conformal 95%: coverage | width | Gaussian 95%: coverage | width "
        "| conformal 90%: coverage | width | Gaussian 90%: coverage | width |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [
            f"{_pm(r, f'{kind}_coverage_{pct}', 3)} | {_pm(r, f'{kind}_width_{pct}', 2)}"
            for pct in (95, 90)
            for kind in ("conformal", "test")
        ]
        lines.append(f"| {r.dataset} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(result: ProtocolResult, key: str, digits: int) -> str:
    mean, se = result.summary(key)
    return f"{mean:.{digits}f} +- {se:.{digits}f}"
