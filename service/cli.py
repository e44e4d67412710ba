"""Command line: ``dropout-service serve`` and ``dropout-service train``."""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Sequence
from pathlib import Path

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
    )
    dataset = UCIDataset.load(args.dataset)
    out = args.out or Path("models") / dataset.name
    report = train_uci_regression(dataset, args.split, out, opts, version=args.version)
    print(f"wrote {out} in {report.seconds:.1f} s")
    for key, value in report.metrics.items():
        print(f"  {key}: {value}")
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
    train.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
