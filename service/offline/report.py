"""``dropout-service report``: five measured figures that show why production serves eval mode.

Offline, like training: it loads the model folder exactly as the server does and calls the
serving engine directly. The page it writes (``report.md``, the PNGs beside it and the
numbers in ``report.json``) is what docs/why-dropout-is-off.md quotes.

1. the same input N times: eval (one value) against single train-mode passes (a spread);
2. the MC mean and its 95% band as n_samples grows, against the eval output;
3. latency of eval against MC as n_samples grows;
4. a 1-D model: data, eval curve, MC mean and band, wider off the data;
5. the same network trained with inverted and with vanilla dropout, and what each needs at
   inference for the expected activations to match.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.core.engine import MLPEngine, Scaling, train_pass_seeds
from service.core.model import ModelConfig, build_sequential, load_into_sequential
from service.core.repository import LoadedModel, ModelLoadError, load_model
from service.offline.options import ReportOptions, TrainOptions
from service.offline.training import fit

#: The 1-D model issue 3 ships; figure 4 trains a small one when it is absent.
GAP_MODEL = "sine-gap"
#: Inputs of the 1-D toy problem of figures 4 and 5: two intervals with a gap between.
TOY_INTERVALS = ((-4.0, -1.5), (1.5, 4.0))
TOY_NOISE = 0.1
TOY_ROWS = 160
#: A large p makes the factor that vanilla needs at inference (1 - p = 0.5) impossible to miss.
VANILLA_P = 0.5


@dataclass
class Figure:
    file: str
    title: str
    caption: str


@dataclass
class Report:
    model: str
    version: str
    command: str
    machine: str
    seconds: float = 0.0
    figures: list[Figure] = field(default_factory=list)
    numbers: dict[str, dict[str, Any]] = field(default_factory=dict)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name)
    _plt().close(fig)
    return name


def reference_input(config: ModelConfig) -> torch.Tensor:
    """One row ``(1, in)``: the training mean when the model stores it, else zeros."""
    s = config.input_standardization
    values = s.mean if s is not None else [0.0] * config.input_dim
    return torch.tensor([values], dtype=torch.float32)


def _output_label(config: ModelConfig) -> str:
    if config.task == "classification":
        assert config.labels is not None
        return f"P({config.labels[0]})"
    return "output, target units" if config.output_dim == 1 else "output 0, target units"


# -- figure 1 ----------------------------------------------------------------------------------


def fig_train_mode_spread(
    engine: MLPEngine, x: torch.Tensor, opts: ReportOptions, out: Path
) -> tuple[Figure, dict[str, Any]]:
    plt = _plt()
    evals = torch.stack([engine.predict(x)[0, 0] for _ in range(opts.repeats)]).double()
    seeds = train_pass_seeds(opts.seed, opts.repeats)
    passes = torch.stack([engine.train_pass(x, s)[0, 0] for s in seeds]).double().numpy()
    eval_y = float(evals[0])
    n = {
        "calls": opts.repeats,
        "eval": eval_y,
        "eval_distinct_values": int(torch.unique(evals).numel()),
        "train_distinct_values": int(np.unique(passes).size),
        "train_mean": float(passes.mean()),
        "train_std": float(passes.std()),
        "train_min": float(passes.min()),
        "train_max": float(passes.max()),
        "train_p2_5": float(np.percentile(passes, 2.5)),
        "train_p97_5": float(np.percentile(passes, 97.5)),
    }
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.hist(passes, bins=50, color="tab:orange", alpha=0.8, label="train mode: one pass per call")
    ax.axvline(eval_y, color="tab:blue", lw=2, label=f"eval mode: every call = {eval_y:.3f}")
    ax.set_xlabel(_output_label(engine.config))
    ax.set_ylabel("calls")
    ax.set_title(f"The same input sent {opts.repeats} times")
    ax.legend(loc="upper left", fontsize=8)
    caption = (
        f"The same input sent {opts.repeats} times: eval mode answered one value "
        f"({eval_y:.4g}) {opts.repeats} times out of {opts.repeats}, while a model left in "
        f"train mode gave {n['train_distinct_values']} distinct answers with std "
        f"{n['train_std']:.3g}, from {n['train_min']:.4g} to {n['train_max']:.4g} (95% of "
        f"them in [{n['train_p2_5']:.4g}, {n['train_p97_5']:.4g}])."
    )
    name = _save(fig, out, "fig1_train_mode_spread.png")
    return Figure(name, "Eval answers one value, train mode a spread", caption), n


# -- figure 2 ----------------------------------------------------------------------------------


def _sample_grid(max_samples: int) -> list[int]:
    grid = np.unique(np.geomspace(2, max_samples, 25).round().astype(int))
    return [int(t) for t in grid]


def fig_mc_convergence(
    engine: MLPEngine, x: torch.Tensor, opts: ReportOptions, out: Path
) -> tuple[Figure, dict[str, Any]]:
    plt = _plt()
    grid = _sample_grid(opts.max_samples)
    means, stds = [], []
    for t in grid:  # each point is exactly what predict/mc answers for (t, seed)
        r = engine.predict_mc(x, t, opts.seed)
        means.append(float(r.mean[0, 0]))
        stds.append(float(r.variance[0, 0].sqrt()))
    m, s, ts = np.array(means), np.array(stds), np.array(grid)
    half = 1.96 * s / np.sqrt(ts)
    eval_y = float(engine.predict(x)[0, 0])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.fill_between(
        ts,
        m - 1.96 * s,
        m + 1.96 * s,
        color="tab:orange",
        alpha=0.15,
        label="mean ± 1.96 std: where single passes land",
    )
    ax.fill_between(
        ts,
        m - half,
        m + half,
        color="tab:orange",
        alpha=0.45,
        label="mean ± 1.96 std/√T: 95% band of the MC mean",
    )
    ax.plot(ts, m, color="tab:orange", marker=".", label="MC mean (predict/mc)")
    ax.axhline(eval_y, color="tab:blue", lw=1.5, label=f"eval = {eval_y:.4g}")
    ax.set_xscale("log")
    ax.set_xlabel("n_samples T")
    ax.set_ylabel(_output_label(engine.config))
    ax.set_title("MC dropout mean as T grows, against the eval output")
    ax.legend(fontsize=7, loc="upper right")
    last = len(grid) - 1
    nearest = {int(np.abs(ts - t).argmin()) for t in (10, 100, 1000, 10_000)}
    at = {grid[i]: i for i in sorted(nearest)}
    n = {
        "seed": opts.seed,
        "eval": eval_y,
        "n_samples": grid,
        "mean": means,
        "std": stds,
        "mc_mean_at_max": means[last],
        "mc_std_at_max": stds[last],
        "gap_at_max": means[last] - eval_y,
        "band_half_width": {str(t): float(half[i]) for t, i in at.items()},
    }
    widths = ", ".join(f"±{half[i]:.3g} at T={t}" for t, i in at.items())
    caption = (
        f"MC dropout mean as T grows from 2 to {grid[last]} (seed {opts.seed}): the 95% band of "
        f"the mean narrows as 1/√T ({widths}); at T={grid[last]} the mean is "
        f"{means[last]:.4g} against eval {eval_y:.4g}, a gap of {means[last] - eval_y:+.3g}, "
        f"while single passes keep a std of {stds[last]:.3g}."
    )
    name = _save(fig, out, "fig2_mc_convergence.png")
    return Figure(name, "MC mean converges, with a gap to eval", caption), n


# -- figure 3 ----------------------------------------------------------------------------------


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations are not what a serving process pays
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def fig_latency(
    engine: MLPEngine, x: torch.Tensor, opts: ReportOptions, out: Path
) -> tuple[Figure, dict[str, Any]]:
    plt = _plt()
    grid = [t for t in (2, 10, 100, 1000, 10_000, 100_000) if t <= opts.max_samples]
    eval_ms = _median_ms(lambda: engine.predict(x), opts.latency_repeats)
    mc_ms = [
        # Fewer repeats for the slow points keep the report fast; the median is robust.
        _median_ms(
            partial(engine.predict_mc, x, t, opts.seed),
            max(3, opts.latency_repeats // (1 + t // 1000)),
        )
        for t in grid
    ]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(grid, mc_ms, marker="o", color="tab:orange", label="MC dropout (predict_mc)")
    ax.axhline(eval_ms, color="tab:blue", lw=1.5, label=f"eval (predict): {eval_ms:.3f} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n_samples T")
    ax.set_ylabel("median latency, ms (one row, engine only)")
    ax.set_title("Latency of eval against MC dropout")
    ax.legend(fontsize=8)
    ratios = {str(t): ms / eval_ms for t, ms in zip(grid, mc_ms, strict=True)}
    n = {
        "rows": int(x.shape[0]),
        "torch_threads": torch.get_num_threads(),
        "eval_ms": eval_ms,
        "n_samples": grid,
        "mc_ms": mc_ms,
        "mc_over_eval": ratios,
    }
    pts = ", ".join(
        f"T={t}: {ms:.3g} ms ({ratios[str(t)]:.0f}x)" for t, ms in zip(grid, mc_ms, strict=True)
    )
    caption = (
        f"Median engine latency for one row on this machine ({torch.get_num_threads()} torch "
        f"threads): eval {eval_ms:.3g} ms; MC {pts}. MC costs grow with T once the batched "
        "passes outweigh the fixed per-call overhead."
    )
    name = _save(fig, out, "fig3_latency.png")
    return Figure(name, "Eval costs one pass, MC costs T", caption), n


# -- the 1-D toy problem (figures 4 and 5) ----------------------------------------------------


def toy_data(seed: int, n: int = TOY_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """A noisy sine observed on two intervals with a gap between: ``(n, 1)`` each."""
    rng = np.random.default_rng(seed)
    (a0, a1), (b0, b1) = TOY_INTERVALS
    x = np.concatenate([rng.uniform(a0, a1, n // 2), rng.uniform(b0, b1, n - n // 2)])
    y = np.sin(x) + TOY_NOISE * rng.normal(size=x.shape)
    return x[:, None].astype(np.float32), y[:, None].astype(np.float32)


def toy_config(name: str, p: float, scaling: Scaling) -> ModelConfig:
    return ModelConfig(
        name=name,
        version="report",
        task="regression",
        input_dim=1,
        hidden=[64, 64],
        output_dim=1,
        dropout=[p, p],
        dropout_scaling=scaling,
        noise_variance=[TOY_NOISE**2],
        sha256="0" * 64,
    )


def toy_options(opts: ReportOptions) -> TrainOptions:
    # Full batch: a few hundred Adam steps fit the sine in about a second of CPU.
    return TrainOptions(
        epochs=opts.toy_epochs,
        batch_size=TOY_ROWS,
        lr=1e-2,
        weight_decay=1e-4,
        seed=opts.seed,
        progress=False,
    )


# -- figure 4 ----------------------------------------------------------------------------------


@dataclass
class GapModel:
    engine: MLPEngine
    where: str
    intervals: tuple[tuple[float, float], ...] | None  # where the training inputs lie
    data: tuple[np.ndarray, np.ndarray] | None = None


def gap_model(model_dir: Path, opts: ReportOptions) -> GapModel:
    """The shipped 1-D model when it loads, else a small one trained here (seconds)."""
    try:
        shipped = load_model(model_dir / GAP_MODEL)
    except ModelLoadError:
        shipped = None
    if shipped is not None and shipped.config.input_dim == shipped.config.output_dim == 1:
        stored = shipped.config.training.get("intervals")
        intervals = tuple((float(a), float(b)) for a, b in stored) if stored else None
        where = f"models/{GAP_MODEL} (version {shipped.config.version})"
        return GapModel(shipped.engine, where, intervals)
    x, y = toy_data(opts.seed)
    config = toy_config("toy-gap", 0.1, "inverted")
    tensors = fit(config, x, y, toy_options(opts), "toy")
    where = f"a 1 -> 64 -> 64 -> 1 ReLU MLP, p = 0.1, trained here ({opts.toy_epochs} epochs)"
    return GapModel(MLPEngine(config, tensors), where, TOY_INTERVALS, (x, y))


def _std_profile(xs: np.ndarray, std: np.ndarray, m: GapModel) -> tuple[dict[str, Any], str]:
    """Mean MC std on the data, in the gap and beyond it; or its range when data is unknown."""
    if m.intervals is None or len(m.intervals) != 2:
        n = {"std_min": float(std.min()), "std_max": float(std.max())}
        lo, hi = float(xs[std.argmin()]), float(xs[std.argmax()])
        text = (
            f"the MC std ranges from {n['std_min']:.3g} (at x = {lo:.2g}) to "
            f"{n['std_max']:.3g} (at x = {hi:.2g})"
        )
        return n, text
    (a0, a1), (b0, b1) = m.intervals
    on = ((xs >= a0) & (xs <= a1)) | ((xs >= b0) & (xs <= b1))
    gap = (xs > a1) & (xs < b0)
    beyond = (xs < a0) | (xs > b1)
    n = {
        "std_on_data": float(std[on].mean()),
        "std_in_gap": float(std[gap].mean()),
        "std_beyond_data": float(std[beyond].mean()),
    }
    n["gap_over_on"] = n["std_in_gap"] / n["std_on_data"]
    n["beyond_over_on"] = n["std_beyond_data"] / n["std_on_data"]
    text = (
        f"with data on [{a0:g}, {a1:g}] and [{b0:g}, {b1:g}] (grey), the MC std averages "
        f"{n['std_on_data']:.3g} on the data, {n['std_in_gap']:.3g} in the gap "
        f"({n['gap_over_on']:.1f}x) and {n['std_beyond_data']:.3g} beyond it "
        f"({n['beyond_over_on']:.1f}x)"
    )
    return n, text


def fig_uncertainty_1d(
    model_dir: Path, opts: ReportOptions, out: Path
) -> tuple[Figure, dict[str, Any]]:
    plt = _plt()
    m = gap_model(model_dir, opts)
    t = min(1000, opts.max_samples)
    xs = np.linspace(-7.0, 7.0, 281, dtype=np.float32)
    grid = torch.from_numpy(xs[:, None])
    eval_y = m.engine.predict(grid)[:, 0].numpy()
    mc = m.engine.predict_mc(grid, t, opts.seed)
    mean, std = mc.mean[:, 0].numpy(), mc.variance[:, 0].sqrt().numpy()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for lo, hi in m.intervals or ():
        ax.axvspan(lo, hi, color="0.9", zorder=0)
    band = (mean - 1.96 * std, mean + 1.96 * std)
    ax.fill_between(xs, *band, color="tab:orange", alpha=0.3, label="MC mean ± 1.96 std")
    ax.plot(xs, mean, color="tab:orange", label=f"MC mean (T={t})")
    ax.plot(xs, eval_y, color="tab:blue", lw=1, ls="--", label="eval")
    if m.data is not None:
        ax.scatter(m.data[0][:, 0], m.data[1][:, 0], s=6, color="k", label="training data")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_ylim(-3.5, 3.5)
    ax.set_title("1-D regression: uncertainty off the data")
    ax.legend(fontsize=7, loc="lower left")
    profile, text = _std_profile(xs, std, m)
    n = {"model": m.where, "n_samples": t, **profile}
    caption = (
        f"{m.where[0].upper() + m.where[1:]}: the eval curve carries no uncertainty, while "
        f"{text} (T = {t}, epistemic only)."
    )
    name = _save(fig, out, "fig4_uncertainty_1d.png")
    return Figure(name, "Only MC dropout sees that it is off the data", caption), n


# -- figure 5 ----------------------------------------------------------------------------------


def _dropout_io(
    module: nn.Sequential, x: torch.Tensor, masks: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output of the first hidden dropout layer: mean over ``masks`` train-mode draws, and eval."""
    head = module[:4]  # Dropout(0), Linear0, act, Dropout(p): the layer whose input is fixed
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        head.train()
        train_mean = torch.stack([head(x) for _ in range(masks)]).mean(0)
        head.eval()
        return train_mean, head(x)


WRONG = "vanilla, identity at eval"  # vanilla-trained weights served with torch's rule


def _train_both(opts: ReportOptions, x: np.ndarray, y: np.ndarray) -> dict[str, nn.Sequential]:
    """The toy network trained with each scaling, plus vanilla's weights under identity."""
    nets: dict[str, nn.Sequential] = {}
    for scaling in ("inverted", "vanilla"):
        # Same seed: the same initial weights, batches and masks; only where 1/(1-p) sits differs.
        config = toy_config(f"toy-{scaling}", VANILLA_P, scaling)
        nets[scaling] = build_sequential(config)
        load_into_sequential(nets[scaling], fit(config, x, y, toy_options(opts), scaling))
    nets[WRONG] = build_sequential(toy_config("toy-wrong", VANILLA_P, "inverted"))
    nets[WRONG].load_state_dict(nets["vanilla"].state_dict())
    return nets


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).sum() / np.abs(b).sum())


def fig_inverted_vs_vanilla(opts: ReportOptions, out: Path) -> tuple[Figure, dict[str, Any]]:
    plt = _plt()
    x, y = toy_data(opts.seed)
    p = VANILLA_P
    nets = _train_both(opts, x, y)
    xt = torch.from_numpy(x)
    act = {}  # label: (eval-mode output, train-mode mean) of the first hidden dropout layer
    for label, net in nets.items():
        train_mean, eval_out = _dropout_io(net, xt, 2000, opts.seed)
        act[label] = (eval_out.flatten().numpy(), train_mean.flatten().numpy())
    # WRONG shares vanilla's weights but not its training: compare with vanilla's train mean.
    act[WRONG] = (act[WRONG][0], act["vanilla"][1])
    xs = np.linspace(-5.0, 5.0, 201, dtype=np.float32)
    with torch.no_grad():
        curves = {
            k: net.eval()(torch.from_numpy(xs[:, None]))[:, 0].numpy() for k, net in nets.items()
        }
        rmse = {
            k: float((net.eval()(xt) - torch.from_numpy(y)).square().mean().sqrt())
            for k, net in nets.items()
        }
    mismatch = {k: _relative_error(*act[k]) for k in nets}

    colors = {"inverted": "tab:blue", "vanilla": "tab:green", WRONG: "tab:red"}
    rules = {
        "inverted": "inverted: identity at eval",
        "vanilla": f"vanilla: × (1-p) = × {1 - p} at eval",
        WRONG: "vanilla with identity (wrong)",
    }
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    lim = float(max(v.max() for pair in act.values() for v in pair)) * 1.05
    a.plot([0, lim], [0, lim], color="0.5", lw=1, ls=":")
    for k, (at_eval, in_training) in act.items():
        a.scatter(at_eval, in_training, s=3, color=colors[k], label=rules[k])
    a.set_xlabel("eval-mode output of the dropout layer")
    a.set_ylabel("train-mode output, mean of 2000 masks")
    a.set_title(f"Expected activation, p = {p}")
    a.legend(fontsize=7, markerscale=3)
    b.scatter(x[:, 0], y[:, 0], s=5, color="k", label="training data")
    for k, curve in curves.items():
        style = "--" if k == "vanilla" else "-"
        b.plot(xs, curve, color=colors[k], ls=style, label=f"{k} (RMSE {rmse[k]:.3f})")
    b.set_ylim(-3, 3)
    b.set_xlabel("x")
    b.set_title("Eval-mode predictions")
    b.legend(fontsize=7, loc="lower left")
    n = {"p": p, "epochs": opts.toy_epochs, "activation_mismatch": mismatch, "rmse": rmse}
    caption = (
        f"The same 1 -> 64 -> 64 -> 1 network, p = {p}, trained from the same seed with "
        f"inverted and with vanilla dropout. Left: the eval-mode output of the first hidden "
        f"dropout layer matches its train-mode mean when each scheme uses its own rule "
        f"(mean relative error {mismatch['inverted']:.3f} inverted, "
        f"{mismatch['vanilla']:.3f} vanilla: MC noise), and is off by 1/(1-p) = "
        f"{1 / (1 - p):.0f}x ({mismatch[WRONG]:.2f}) when vanilla weights meet torch's "
        f"identity. Right: training-data RMSE {rmse['inverted']:.3f} (inverted), "
        f"{rmse['vanilla']:.3f} (vanilla with × (1-p)), {rmse[WRONG]:.3f} (vanilla with the "
        "identity)."
    )
    name = _save(fig, out, "fig5_inverted_vs_vanilla.png")
    return Figure(name, "Inverted and vanilla dropout need different inference", caption), n


# -- the page ----------------------------------------------------------------------------------


def machine(threads: int) -> str:
    return (
        f"{os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__} with "
        f"{threads} intra-op thread{'s' if threads > 1 else ''}, Python "
        f"{platform.python_version()}"
    )


def build_report(
    model: LoadedModel, model_dir: Path, out: Path, opts: ReportOptions, command: str
) -> Report:
    """Measure, draw and write every figure, ``report.md`` and ``report.json`` into ``out``."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    engine = model.engine
    x = reference_input(config)
    report = Report(
        model=config.name, version=config.version, command=command, machine=machine(opts.threads)
    )
    steps: list[tuple[str, Callable[[], tuple[Figure, dict[str, Any]]]]] = [
        ("train_mode_spread", lambda: fig_train_mode_spread(engine, x, opts, out)),
        ("mc_convergence", lambda: fig_mc_convergence(engine, x, opts, out)),
        ("latency", lambda: fig_latency(engine, x, opts, out)),
        ("uncertainty_1d", lambda: fig_uncertainty_1d(model_dir, opts, out)),
        ("inverted_vs_vanilla", lambda: fig_inverted_vs_vanilla(opts, out)),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        for key, step in steps:
            figure, numbers = step()
            report.figures.append(figure)
            report.numbers[key] = numbers
    finally:
        torch.set_num_threads(threads)
    report.seconds = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    (out / "report.md").write_text(page(report, config, x))
    return report


def page(report: Report, config: ModelConfig, x: torch.Tensor) -> str:
    row = ", ".join(f"{v:.4g}" for v in x[0].tolist())
    p = ", ".join(str(v) for v in [config.input_dropout, *config.dropout])
    parts = [
        f"# Why production inference turns dropout off: {report.model} (version "
        f"{report.version})\n",
        f"Measured by `{report.command}` in {report.seconds:.0f} s on {report.machine}. "
        f"Model: {config.input_dim} -> {' -> '.join(map(str, config.hidden))} -> "
        f"{config.output_dim}, {config.activation}, dropout p = [{p}] (input, then each hidden "
        f"layer), {config.dropout_scaling} scaling. Figures 1 to 3 use the input row [{row}] "
        "(the training mean when the model stores it); the numbers behind every figure are in "
        "[report.json](report.json).\n",
    ]
    for i, f in enumerate(report.figures, 1):
        parts.append(f"## {i}. {f.title}\n\n![{f.title}]({f.file})\n\n{f.caption}\n")
    return "\n".join(parts)
