"""Command line: ``dropout-service serve``, ``train`` and ``report``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from importlib.util import find_spec
from pathlib import Path

from service.report import ReportOptions
from service.settings import Settings
from service.training import TrainOptions


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    # Flags become settings through the environment, so every worker process sees them.
    flags = {
        "host": args.host,
        "port": args.port,
        "model_dir": args.models,
        "workers": args.workers,
    }
    for key, value in flags.items():
        if value is not None:
            os.environ[f"DROPOUT_{key.upper()}"] = str(value)
    settings = Settings()  # validate once here, with a clear error, before forking workers
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the
    # handler it found; a no-op one makes that graceful shutdown exit 0, as platforms expect.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=False,  # service.accesslog writes one JSON line per request instead
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from service.datasets import UCIDataset
    from service.training import train_uci_regression

    opts = TrainOptions(
        hidden=tuple(args.hidden),
        dropout=args.dropout,
        input_dropout=not args.no_input_dropout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        mc_samples=args.mc_samples,
        progress=not args.quiet,
        scaling=args.scaling,
    )
    dataset = UCIDataset.load(args.dataset)
    out = args.out or Path("models") / dataset.name
    report = train_uci_regression(dataset, args.split, out, opts, version=args.version)
    print(f"wrote {out} in {report.seconds:.1f} s")
    for key, value in report.metrics.items():
        print(f"  {key}: {value}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from service.report import build_report
    from service.repository import ModelLoadError, load_model

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

    serve = sub.add_parser("serve", help="serve the model repository over HTTP")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--models", type=Path, help="model repository folder (default models)")
    serve.add_argument("--workers", type=int, help="server processes (default 1)")
    serve.set_defaults(func=_serve)

    d = TrainOptions()
    train = sub.add_parser("train", help="train a regression MLP on a UCI-format data set")
    train.add_argument("dataset", help="shipped data set name (concrete, energy, ...) or a folder")
    train.add_argument("--split", type=int, default=0, help="published split (default 0)")
    train.add_argument("--out", type=Path, help="model folder (default models/<dataset>)")
    train.add_argument("--version", default="1", help="model version (default 1)")
    train.add_argument("--hidden", type=int, nargs="+", default=list(d.hidden))
    train.add_argument("--dropout", type=float, default=d.dropout)
    train.add_argument("--no-input-dropout", action="store_true", help="no dropout on inputs")
    train.add_argument("--epochs", type=int, default=d.epochs)
    train.add_argument("--batch-size", type=int, default=d.batch_size)
    train.add_argument("--lr", type=float, default=d.lr)
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--mc-samples", type=int, default=d.mc_samples, help="T for scoring")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--scaling",
        choices=["inverted", "vanilla"],
        default=d.scaling,
        help="dropout scaling: inverted (torch's, identity at eval) or vanilla (x (1-p) at eval)",
    )
    train.set_defaults(func=_train)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
