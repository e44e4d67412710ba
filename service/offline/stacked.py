"""Many independent dropout MLPs trained as one stacked model (offline training only).

Every weight carries a leading model axis ``M`` and every layer is one ``torch.baddbmm``,
so a whole hyper-parameter grid (and several data splits) trains in the time of a few
sequential runs on a CPU. The models share no parameter: each has its own data, dropout rate,
L2 strength and masks, and Adam is elementwise, so stacking them is the same as training
them one by one, except that they visit their rows in the same shuffled order.

The recipe is Gal & Ghahramani's Keras one (``net.py`` of DropoutUncertaintyExps):
Glorot-uniform weights and zero biases, inverted dropout before every Dense layer, the mean
squared error plus ``reg * sum(W**2)`` over the weight matrices (Keras ``l2(reg)``), Adam
with its default settings, reshuffled mini-batches every epoch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from service.core.model import bias_name, weight_name


@dataclass(frozen=True)
class Stack:
    """Weights ``(M, in, out)`` and biases ``(M, 1, out)`` of M MLPs, and their dropout rates."""

    weights: list[Tensor]
    biases: list[Tensor]
    p: Tensor  # (M,) dropout probability of each model, before every Linear layer

    @property
    def size(self) -> int:
        return int(self.p.shape[0])

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """One dropout pass of every model: ``x (M, ..., B, D)`` -> ``(M, ..., B, out)``."""
        keep = (1.0 - self.p).view(-1, *([1] * (x.dim() - 1)))  # broadcast over (..., B, D)
        h = x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            # Inverted dropout noise, Bernoulli(keep) / keep, built in place: few passes.
            noise = torch.bernoulli(keep.expand(h.shape), generator=generator).div_(keep)
            h = h * noise
            lead = h.shape[:-1]
            h = torch.baddbmm(b, h.reshape(h.shape[0], -1, h.shape[-1]), w)
            h = h.reshape(*lead, w.shape[-1])
            if i < last:
                h = torch.relu(h)
        return h

    def tensors(self, m: int) -> dict[str, Tensor]:
        """Model ``m`` under the repository's tensor names (``(out, in)`` weights)."""
        out: dict[str, Tensor] = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[weight_name(i)] = w[m].detach().t().contiguous().clone()
            out[bias_name(i)] = b[m].detach().reshape(-1).clone()
        return out


def glorot_stack(
    m: int, widths: list[int], generator: torch.Generator
) -> tuple[list[Tensor], list[Tensor]]:
    """Keras' default initialisation for M models: Glorot-uniform weights, zero biases."""
    weights, biases = [], []
    for fan_in, fan_out in itertools.pairwise(widths):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        w = (torch.rand(m, fan_in, fan_out, generator=generator) * 2 - 1) * limit
        weights.append(w.requires_grad_())
        biases.append(torch.zeros(m, 1, fan_out, requires_grad=True))
    return weights, biases


def train_stack(
    x: Tensor,
    y: Tensor,
    hidden: tuple[int, ...],
    p: Tensor,
    reg: Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    desc: str = "train",
    progress: bool = True,
) -> Stack:
    """Fit M MLPs: model ``m`` on ``x[m] (N, D)``, ``y[m] (N, out)``, with ``p[m]``, ``reg[m]``."""
    m, n, d = x.shape
    widths = [d, *hidden, y.shape[-1]]
    weights, biases = glorot_stack(m, widths, generator)
    stack = Stack(weights, biases, p)
    optimiser = torch.optim.Adam([*weights, *biases])
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for _ in bar:
        # One shuffle for all M models (their masks still differ): an index_select per
        # batch instead of M gathers.
        total = torch.zeros(m)
        for idx in torch.split(torch.randperm(n, generator=generator), batch_size):
            xb, yb = x[:, idx], y[:, idx]  # (M, B, D), (M, B, out)
            mse = (stack.forward(xb, generator) - yb).square().mean(dim=(1, 2))  # (M,)
            l2 = torch.stack([w.square().sum(dim=(1, 2)) for w in weights]).sum(0)  # (M,)
            optimiser.zero_grad(set_to_none=True)
            # Summing the M losses keeps every model's gradient its own.
            torch.autograd.backward((mse + reg * l2).sum())
            optimiser.step()
            total += mse.detach() * len(idx)
        bar.set_postfix(mse=f"{float(total.mean()) / n:.4f}", refresh=False)
    for t in (*weights, *biases):
        t.requires_grad_(False)
    return stack


@torch.no_grad()
def mc_samples_stack(
    stack: Stack,
    x: Tensor,
    target: tuple[Tensor, Tensor],
    n_samples: int,
    generator: torch.Generator,
    *,
    chunk_elements: int = 1 << 22,
) -> Tensor:
    """``n_samples`` dropout passes of every model on its rows, in target units: ``(M, T, N)``
    float32.

    ``x (M, N, D)`` standardised inputs; ``target`` the ``(M,)`` mean and std that map each
    model's output back to the target's units. T is walked in chunks so that the hidden
    activations stay bounded.
    """
    m, n, _ = x.shape
    y_mean, y_std = (v.view(m, 1, 1).float() for v in target)
    width = max(w.shape[-1] for w in stack.weights)
    chunk = max(1, min(n_samples, chunk_elements // (m * n * width)))
    out = torch.empty(m, n_samples, n)
    for start in range(0, n_samples, chunk):
        t = min(chunk, n_samples - start)
        xt = x.unsqueeze(1).expand(m, t, n, x.shape[-1])  # (M, t, N, D)
        out[:, start : start + t] = stack.forward(xt, generator)[..., 0] * y_std + y_mean
    return out
