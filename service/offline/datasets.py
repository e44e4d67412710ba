"""Data sets in the UCI format of Gal & Ghahramani's experiments, shipped under service/data/uci.

A folder holds ``data.txt`` (whitespace-separated rows), ``index_features.txt``,
``index_target.txt`` and the published splits ``index_train_K.txt`` / ``index_test_K.txt``;
optionally the protocol's ``n_hidden.txt``, ``n_epochs.txt``, ``dropout_rates.txt``,
``tau_values.txt`` and ``n_splits.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

UCI_ROOT = Path(str(files("service") / "data" / "uci"))

#: Published test RMSE and log-likelihood (mean +- s.e. over 20 splits), "grid search" column.
PUBLISHED = {
    "concrete": ("4.82 +- 0.16", "-2.93 +- 0.02"),
    "energy": ("0.54 +- 0.06", "-1.21 +- 0.01"),
    "wine-quality-red": ("0.62 +- 0.01", "-0.93 +- 0.01"),
    "yacht": ("0.67 +- 0.05", "-1.25 +- 0.01"),
}


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray  # (N, D) float64
    y_train: np.ndarray  # (N, 1)
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class UCIDataset:
    name: str
    path: Path
    x: np.ndarray  # (N, D)
    y: np.ndarray  # (N, 1)
    feature_names: list[str] | None = None  # feature_names.txt, one per line, if present

    @classmethod
    def load(cls, name_or_path: str | Path) -> UCIDataset:
        """A shipped data set by name (``concrete``), or any folder in the same format."""
        path = Path(name_or_path)
        if not path.is_dir():
            path = UCI_ROOT / str(name_or_path)
        if not (path / "data.txt").is_file():
            shipped = ", ".join(sorted(p.name for p in UCI_ROOT.iterdir() if p.is_dir()))
            raise FileNotFoundError(
                f"no data set at {name_or_path!r}: give a folder with data.txt or one of {shipped}"
            )
        data = np.loadtxt(path / "data.txt", ndmin=2)
        features = np.loadtxt(path / "index_features.txt", dtype=int, ndmin=1)
        target = int(np.loadtxt(path / "index_target.txt", dtype=int))
        names_file = path / "feature_names.txt"
        names = names_file.read_text().splitlines() if names_file.is_file() else None
        if names is not None and len(names) != len(features):
            raise ValueError(
                f"{names_file} names {len(names)} features; the data has {len(features)}"
            )
        return cls(path.name, path, data[:, features], data[:, [target]], names)

    def n_splits(self) -> int:
        return len(list(self.path.glob("index_train_*.txt")))

    def split(self, k: int) -> Split:
        if not 0 <= k < self.n_splits():
            raise ValueError(f"split {k} out of range: {self.name} has {self.n_splits()} splits")
        train = np.loadtxt(self.path / f"index_train_{k}.txt", dtype=int)
        test = np.loadtxt(self.path / f"index_test_{k}.txt", dtype=int)
        return Split(self.x[train], self.y[train], self.x[test], self.y[test])

    def protocol(self, name: str) -> list[float]:
        """A protocol grid file (``dropout_rates``, ``tau_values``, ``n_hidden``, ...)."""
        return [float(v) for v in np.loadtxt(self.path / f"{name}.txt", ndmin=1)]
