"""A numpy reference of dropout in a ReLU MLP, written as the classic notes write it.

The test oracle for the torch engine: plain float64 numpy, no torch, one layer at a time, as
in Srivastava et al. (2014) and the CS231n notes. Masks are given, not drawn, so a test can
hand it the masks torch drew and compare the answers.

* vanilla: training multiplies each hidden activation by its 0/1 mask; testing multiplies
  it by the keep probability ``1 - p`` so that its expected value matches training.
* inverted: training multiplies by ``mask / (1 - p)``; testing is the identity.
"""

from __future__ import annotations

import numpy as np

Layer = tuple[np.ndarray, np.ndarray]  # (W (out, in), b (out,)) as torch stores them


def relu(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0.0)


def forward_train(
    x: np.ndarray, layers: list[Layer], p: float, masks: list[np.ndarray], scaling: str
) -> np.ndarray:
    """Train mode, per hidden layer: ``relu(W h + b)``, times its mask (over ``1 - p`` if
    inverted)."""
    h = x
    for (w, b), mask in zip(layers[:-1], masks, strict=True):
        h = relu(h @ w.T + b)
        h = h * mask
        if scaling == "inverted":
            h = h / (1.0 - p)
    w, b = layers[-1]
    out: np.ndarray = h @ w.T + b
    return out


def forward_test(x: np.ndarray, layers: list[Layer], p: float, scaling: str) -> np.ndarray:
    """Test mode: no mask; vanilla scales each hidden activation by ``1 - p``."""
    h = x
    for w, b in layers[:-1]:
        h = relu(h @ w.T + b)
        if scaling == "vanilla":
            h = h * (1.0 - p)
    w, b = layers[-1]
    out: np.ndarray = h @ w.T + b
    return out
