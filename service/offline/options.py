"""The options of the offline commands, apart from the code that runs them, so that the
command line can show their defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: The activations a trainer takes by name (``core.model.ActivationName``, without torch).
ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid", "silu", "leaky_relu", "elu", "identity")


@dataclass(frozen=True)
class TrainOptions:
    hidden: tuple[int, ...] = (100, 100)
    dropout: float = 0.01
    input_dropout: bool = True
    activation: str = "relu"
    epochs: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    validation_fraction: float = 0.2
    mc_samples: int = 1000
    progress: bool = True
    # "vanilla": unscaled masks in training, x (1-p) at eval (the config records it).
    scaling: Literal["inverted", "vanilla"] = "inverted"


@dataclass(frozen=True)
class ProtocolOptions:
    splits: int | None = None  # run the first k splits; None: all of them
    epochs: int | None = None  # None: n_epochs.txt x epoch_multiplier, as the paper's code
    epoch_multiplier: int = 100  # the published runs' training length (4000 epochs)
    hidden: int | None = None  # units of the one hidden layer; None: n_hidden.txt
    batch_size: int = 128
    lengthscale: float = 1e-2
    validation_fraction: float = 0.2
    val_mc_samples: int = 1000
    mc_samples: int = 10000
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class ReportOptions:
    repeats: int = 1000  # figure 1: identical calls
    max_samples: int = 10_000  # figures 2 and 3: largest n_samples
    latency_repeats: int = 30  # figure 3: timed calls per point (median reported)
    toy_epochs: int = 400  # figures 4 and 5: full-batch epochs of the small 1-D models
    seed: int = 0
    # One intra-op thread by default: on a shared machine two threads spin-wait for a core and
    # turn 0.3 ms into 30 ms; one thread measures the work, not the scheduler.
    threads: int = 1


#: Defaults of the shipped digits model (``dropout-service train-digits``).
DIGITS_OPTIONS = TrainOptions(
    hidden=(128, 128),
    dropout=0.25,
    input_dropout=False,
    epochs=150,
    batch_size=64,
    lr=1e-3,
    weight_decay=1e-4,
    mc_samples=1000,
)

#: Defaults of the shipped sine-gap model (``dropout-service train-sine-gap``). GELU, not
#: ReLU: with ReLU few second-layer units grow between the two intervals, so dropout's spread
#: barely grows in the gap (docs/uncertainty.md measures it); 1000 epochs, not 300: shorter
#: training leaves the on-data spread inflated.
SINE_GAP_OPTIONS = TrainOptions(
    hidden=(128, 128),
    activation="gelu",
    dropout=0.2,
    input_dropout=False,
    epochs=1000,
    batch_size=32,
    lr=1e-3,
    weight_decay=1e-5,
    mc_samples=1000,
)
