"""Command line: ``dropout-service serve``, ``train``, ``report``, ``benchmark`` and the demo
trainers.

Each command imports what it needs when it runs: ``serve --help`` or a typo costs no torch
import. The parser shows the training defaults from ``offline.options``, which is only
dataclasses.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from service.offline.options import (
    ACTIVATIONS,
    DIGITS_OPTIONS,
    SINE_GAP_OPTIONS,
    ProtocolOptions,
    ReportOptions,
    TrainOptions,
)

if TYPE_CHECKING:
    from service.offline.training import TrainReport

WORKER_HEALTHCHECK_TIMEOUT_S = 60


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.protocols.http.server import metrics_dir, uvicorn_options
    from service.settings import Settings

    # Flags become settings through the environment, so every worker process sees them.
    flags = {
        "host": args.host,
        "port": args.port,
        "grpc_port": args.grpc_port,
        "model_dir": args.models,
        "workers": args.workers,
    }
    for key, value in flags.items():
        if value is not None:
            os.environ[f"DROPOUT_{key.upper()}"] = str(value)
    try:  # validate once here, with a clear error, before forking workers
        settings = Settings()
        settings.torch_device()
    except (ValueError, ValidationError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the
    # handler it found; a no-op one makes that graceful shutdown exit 0, as platforms expect.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    with metrics_dir(settings.workers):
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            workers=settings.workers,
            # With --workers > 1 the supervisor kills a worker that does not answer its ping
            # in time; uvicorn's 5 s is shorter than importing torch on a busy or CPU-limited
            # box, which left every worker in a kill-and-respawn loop (test_container.py).
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_TIMEOUT_S,
            **uvicorn_options(settings),
        )
    return 0


def _one_line(exc: Exception) -> str:
    """A settings error as one line per problem, naming the variable."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(
            f"DROPOUT_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
    return str(exc)


def _options(args: argparse.Namespace, input_dropout: bool) -> TrainOptions:
    return TrainOptions(
        hidden=tuple(args.hidden),
        dropout=args.dropout,
        input_dropout=input_dropout,
        activation=args.activation,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        mc_samples=args.mc_samples,
        progress=not args.quiet,
        scaling=args.scaling,
    )


def _print_trained(out: Path, report: TrainReport) -> int:
    print(f"wrote {out} in {report.seconds:.1f} s")
    for key, value in report.metrics.items():
        print(f"  {key}: {value}")
    return 0


def _train(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    opts = _options(args, input_dropout=not args.no_input_dropout)
    if args.dataset.endswith(".csv"):
        return _train_csv(args, opts)
    if args.target is not None or args.features is not None or args.task != "regression":
        return _fail("--target, --features and --task are for a CSV file (data.csv)")
    from service.offline.datasets import UCIDataset
    from service.offline.training import train_uci_regression

    dataset = UCIDataset.load(args.dataset)
    out = args.out or Path("models") / dataset.name
    return _print_trained(
        out, train_uci_regression(dataset, args.split, out, opts, version=args.version)
    )


def _train_csv(args: argparse.Namespace, opts: TrainOptions) -> int:
    from service.offline.tabular import DataError, train_csv

    if args.target is None:
        return _fail("a CSV file needs --target COLUMN, the column to predict")
    path = Path(args.dataset)
    out = args.out or Path("models") / path.stem
    features = args.features.split(",") if args.features else None
    try:
        report = train_csv(
            path, out, opts, target=args.target, task=args.task, features=features,
            version=args.version,
        )  # fmt: skip
    except DataError as exc:
        return _fail(str(exc))
    return _print_trained(out, report)


def _predict(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    import numpy as np

    from service.client import Client, ServiceError

    try:
        inputs = json.loads(args.input)
    except json.JSONDecodeError as exc:
        return _fail(f"--input is not JSON: {exc}")
    with Client(args.url, timeout=args.timeout) as client:
        try:
            if not args.mc:
                answer: dict[str, object] = {"outputs": client.predict(args.model, inputs)}
            else:
                mc = client.predict_mc(
                    args.model, inputs, n_samples=args.n_samples, seed=args.seed,
                    coverage=args.coverage, target_se=args.target_se,
                )  # fmt: skip
                fields = {**asdict(mc), **mc.extra}
                fields.pop("extra")
                answer = {k: v for k, v in fields.items() if v is not None}
        except ServiceError as exc:
            return _fail(str(exc))
        except httpx_errors() as exc:
            return _fail(f"{args.url}: {exc}")
    plain = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in answer.items()}
    print(json.dumps(plain))
    return 0


def httpx_errors() -> type[Exception]:
    import httpx

    return httpx.HTTPError


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _import(args: argparse.Namespace) -> int:
    from service.core.importer import import_file

    def floats(text: str | None) -> list[float] | None:
        return None if text is None else [float(v) for v in text.split(",")]

    try:
        config = import_file(
            args.file,
            args.out,
            task=args.task,
            version=args.version,
            labels=args.labels.split(",") if args.labels else None,
            input_mean=floats(args.input_mean),
            input_std=floats(args.input_std),
            target_mean=floats(args.target_mean),
            target_std=floats(args.target_std),
            noise_variance=floats(args.noise_variance),
        )
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print(
        f"wrote {args.out}: {config.task}, {config.input_dim} inputs, {config.output_dim} outputs"
    )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from service.core.calibration import conformal_quantile
    from service.core.repository import ModelLoadError, read_config
    from service.offline.calibrating import calibrate_folder
    from service.offline.tabular import DataError, read_csv

    _set_threads(args.threads)
    try:
        config = read_config(args.model)
    except ModelLoadError as exc:
        return _fail(f"{args.model}: {exc}")
    if args.data.endswith(".csv"):
        if args.target is None:
            return _fail("a CSV file needs --target COLUMN, the column the model predicts")
        features = args.features.split(",") if args.features else None
        try:
            table = read_csv(Path(args.data), args.target, config.task, features, min_classes=1)
        except DataError as exc:
            return _fail(str(exc))
        x, y = table.x, table.y
        if table.labels is not None:  # CSV classes by name, onto the model's class indices
            names = config.labels or [str(i) for i in range(config.output_dim)]
            unknown = sorted(set(table.labels) - set(names))
            if unknown:
                return _fail(f"{args.data}: class {unknown[0]!r} is not one of {names}")
            index = np.array([names.index(label) for label in table.labels])
            y = index[table.y]
        fitted_on = f"{args.data}: {len(x)} rows"
    else:
        if args.target is not None or args.features is not None:
            return _fail("--target and --features are for a CSV file (data.csv)")
        if config.task != "regression":
            return _fail("the UCI data sets are regression; give a CSV file for a classifier")
        from service.offline.datasets import UCIDataset

        dataset = UCIDataset.load(args.data)
        split = dataset.split(args.split)
        x, y = split.x_test, split.y_test
        fitted_on = f"{dataset.name} split {args.split}: its {len(x)} test rows"
    try:
        cal = calibrate_folder(args.model, x, y, args.mc_samples, args.seed, fitted_on)
    except (ValueError, ModelLoadError) as exc:
        return _fail(f"{args.model}: {exc}")
    print(f"wrote the calibration of {args.model} ({fitted_on})")
    if cal.temperature is not None:
        print(f"  temperature: {cal.temperature:.4g}")
    for level in (0.9, 0.95, 0.99):
        q = conformal_quantile(cal.scores, level)
        shown = "needs more rows" if q is None else f"{q:.4g}"
        print(f"  conformal quantile at {level:g}: {shown}")
    print(f"  out-of-distribution reference (99th percentile): {cal.ood_reference}")
    print("  load the model again (or restart the service) to serve it")
    return 0


def _train_digits(args: argparse.Namespace) -> int:
    from service.offline.demos import train_digits

    _set_threads(args.threads)
    opts = _options(args, input_dropout=False)
    return _print_trained(args.out, train_digits(args.out, opts, version=args.version))


def _train_sine_gap(args: argparse.Namespace) -> int:
    from service.offline.demos import train_sine_gap

    _set_threads(args.threads)
    opts = _options(args, input_dropout=False)
    return _print_trained(args.out, train_sine_gap(args.out, opts, version=args.version))


def _set_threads(n: int) -> None:
    import torch

    # Small models run a handful of tiny kernels per step: extra threads only add
    # contention (and spin-waiting on a busy machine), never speed.
    torch.set_num_threads(n)


def _add_fit_options(parser: argparse.ArgumentParser, d: TrainOptions) -> None:
    """Flags shared by the training commands, with that command's defaults."""
    parser.add_argument("--version", default="1", help="model version (default 1)")
    parser.add_argument("--hidden", type=int, nargs="+", default=list(d.hidden))
    parser.add_argument(
        "--activation", choices=ACTIVATIONS, default=d.activation, help="of the hidden layers"
    )
    parser.add_argument("--dropout", type=float, default=d.dropout)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--mc-samples", type=int, default=d.mc_samples, help="T for scoring")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--scaling",
        choices=["inverted", "vanilla"],
        default=d.scaling,
        help="dropout scaling: inverted (torch's, identity at eval) or vanilla (x (1-p) at eval)",
    )


def _benchmark(args: argparse.Namespace) -> int:
    import json

    from service.offline.datasets import UCIDataset
    from service.offline.uci import results_table, run_protocol

    _set_threads(args.threads)
    opts = ProtocolOptions(
        splits=args.splits,
        epochs=args.epochs,
        epoch_multiplier=args.epoch_multiplier,
        hidden=args.hidden,
        val_mc_samples=args.val_mc_samples,
        mc_samples=args.mc_samples,
        seed=args.seed,
        progress=not args.quiet,
    )
    results = []
    for name in args.datasets:
        result = run_protocol(UCIDataset.load(name), opts)
        results.append(result)
        print(results_table([result]) + "\n", flush=True)
    if len(results) > 1:
        print(results_table(results))
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    return 0


def _report(args: argparse.Namespace) -> int:
    from service.core.repository import ModelLoadError, load_model
    from service.offline.report import build_report

    opts = ReportOptions(
        repeats=args.repeats,
        max_samples=args.max_samples,
        latency_repeats=args.latency_repeats,
        toy_epochs=args.toy_epochs,
        seed=args.seed,
        threads=args.threads,
    )
    if find_spec("matplotlib") is None:
        print("error: report draws with matplotlib: pip install -e '.[report]'", file=sys.stderr)
        return 2
    try:
        model = load_model(args.models / args.model)
    except ModelLoadError as exc:
        print(f"error: model {args.model!r} under {args.models}: {exc}", file=sys.stderr)
        return 2
    command = f"dropout-service report --model {args.model} --out {args.out}"
    if opts != ReportOptions():
        command += "".join(f" --{k.replace('_', '-')} {v}" for k, v in asdict(opts).items())
    report = build_report(model, args.models, args.out, opts, command)
    print(f"wrote {args.out / 'report.md'}, {len(report.figures)} figures, {report.seconds:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dropout-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the model repository over HTTP and gRPC")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument(
        "--grpc-port", type=int, help="Open Inference Protocol over gRPC (default 8001; 0: off)"
    )
    serve.add_argument("--models", type=Path, help="model repository folder (default models)")
    serve.add_argument("--workers", type=int, help="server processes (default 1)")
    serve.set_defaults(func=_serve)

    train = sub.add_parser(
        "train", help="train an MLP on a CSV file or a UCI-format data set (regression)"
    )
    train.add_argument(
        "dataset", help="a CSV file (data.csv), a shipped data set (concrete, ...) or a folder"
    )
    train.add_argument("--target", help="CSV: the column to predict")
    train.add_argument("--features", help="CSV: the input columns, a,b,c (default: the rest)")
    train.add_argument(
        "--task", choices=["regression", "classification"], default="regression", help="CSV"
    )
    train.add_argument("--split", type=int, default=0, help="UCI: published split (default 0)")
    train.add_argument("--out", type=Path, help="model folder (default models/<dataset>)")
    train.add_argument("--no-input-dropout", action="store_true", help="no dropout on inputs")
    train.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    _add_fit_options(train, TrainOptions())
    train.set_defaults(func=_train)

    imp = sub.add_parser(
        "import", help="a model folder from a trained torch module saved with its architecture"
    )
    imp.add_argument(
        "file", type=Path, help="model.safetensors (architecture in its metadata) or model.pt"
    )
    imp.add_argument("--out", type=Path, required=True, help="the model folder, models/NAME")
    imp.add_argument("--task", choices=["regression", "classification"], required=True)
    imp.add_argument("--version", default="1", help="model version (default 1)")
    imp.add_argument("--labels", help="classification: the class names, a,b,c")
    for what in ("input-mean", "input-std", "target-mean", "target-std"):
        imp.add_argument(f"--{what}", help=f"standardisation {what.replace('-', ' ')}: a,b,c")
    imp.add_argument("--noise-variance", help="regression: aleatoric variance per output")
    imp.set_defaults(func=_import)

    cal = sub.add_parser(
        "calibrate",
        help="fit a model folder's calibration (conformal intervals or sets, OOD) on held-out rows",
    )
    cal.add_argument("model", type=Path, help="the model folder, models/NAME")
    cal.add_argument(
        "data", help="held-out rows: a CSV file, or a UCI data set (its --split's test rows)"
    )
    cal.add_argument("--target", help="CSV: the column the model predicts")
    cal.add_argument("--features", help="CSV: the input columns, a,b,c (default: the rest)")
    cal.add_argument("--split", type=int, default=0, help="UCI: published split (default 0)")
    cal.add_argument("--mc-samples", type=int, default=1000, help="MC passes (default 1000)")
    cal.add_argument("--seed", type=int, default=0, help="MC seed (default 0)")
    cal.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    cal.set_defaults(func=_calibrate)

    pred = sub.add_parser("predict", help="ask a running service, print its answer as JSON")
    pred.add_argument("model", help="the model's name")
    pred.add_argument("--input", required=True, help="rows as JSON: '[[1.0, 2.0], ...]'")
    pred.add_argument("--url", default="http://127.0.0.1:8000", help="the service")
    pred.add_argument("--mc", action="store_true", help="Monte-Carlo dropout instead of eval")
    pred.add_argument("--n-samples", type=int, help="MC passes T")
    pred.add_argument("--seed", type=int, help="MC seed (drawn by the service if absent)")
    pred.add_argument("--coverage", type=float, help="MC intervals at this coverage")
    pred.add_argument("--target-se", type=float, help="MC passes until this standard error")
    pred.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    pred.set_defaults(func=_predict)

    r = ReportOptions()
    report = sub.add_parser("report", help="figures and numbers: why production serves eval")
    report.add_argument("--model", required=True, help="model name (a folder of --models)")
    report.add_argument("--out", type=Path, required=True, help="folder for report.md and PNGs")
    report.add_argument("--models", type=Path, default=Path("models"), help="model repository")
    report.add_argument("--repeats", type=int, default=r.repeats, help="figure 1: identical calls")
    report.add_argument("--max-samples", type=int, default=r.max_samples, help="largest T")
    report.add_argument("--latency-repeats", type=int, default=r.latency_repeats)
    report.add_argument("--toy-epochs", type=int, default=r.toy_epochs, help="1-D toy models")
    report.add_argument("--seed", type=int, default=r.seed)
    report.add_argument("--threads", type=int, default=r.threads, help="torch intra-op threads")
    report.set_defaults(func=_report)

    digits = sub.add_parser(
        "train-digits", help="train the digits classifier (needs the demo extra: scikit-learn)"
    )
    digits.add_argument("--out", type=Path, default=Path("models/digits"))
    _add_fit_options(digits, DIGITS_OPTIONS)
    digits.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    digits.set_defaults(func=_train_digits)

    sine = sub.add_parser("train-sine-gap", help="train the 1-D sine-with-a-gap regression")
    sine.add_argument("--out", type=Path, default=Path("models/sine-gap"))
    _add_fit_options(sine, SINE_GAP_OPTIONS)
    sine.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    sine.set_defaults(func=_train_sine_gap)

    p = ProtocolOptions()
    bench = sub.add_parser(
        "benchmark", help="Gal & Ghahramani's UCI protocol: grid search, refit, MC test scores"
    )
    bench.add_argument("datasets", nargs="+", help="shipped data set names or folders")
    bench.add_argument("--splits", type=int, help="run the first K splits (default all)")
    bench.add_argument("--epochs", type=int, help="epochs (default n_epochs.txt x multiplier)")
    bench.add_argument("--epoch-multiplier", type=int, default=p.epoch_multiplier)
    bench.add_argument("--hidden", type=int, help="hidden units (default n_hidden.txt)")
    bench.add_argument("--val-mc-samples", type=int, default=p.val_mc_samples)
    bench.add_argument("--mc-samples", type=int, default=p.mc_samples, help="T on the test rows")
    bench.add_argument("--seed", type=int, default=p.seed)
    bench.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    bench.add_argument("--json", type=Path, help="write per-split results here")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=_benchmark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
