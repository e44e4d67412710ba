"""Tensor maths of eval and Monte-Carlo-dropout inference. No HTTP here.

Contracts (see DESIGN.md):

* ``predict`` never draws a random number and never reads a train/eval flag: dropout layers
  are the identity (inverted scaling) or a multiplication by ``1 - p`` (vanilla scaling).
* ``predict_mc`` owns one random stream per call (``mask_source``), runs the ``T`` passes as batched
  tensor ops (no Python loop over samples), computes the layers before the first dropout
  once, and walks ``T`` in chunks so that memory stays bounded.
* ``dropout_noise`` draws its mask exactly as ``F.dropout(x, p, training=True)`` does on the
  CPU: ``empty_like(x).bernoulli_(1 - p)``, then ``div_(1 - p)``.
* MC draws its masks in one of two modes (``MaskMode``), both exact Bernoulli(1 - p) at the
  53-bit resolution of torch's own kernel: ``torch`` (the default) is that kernel, mask for
  mask; ``packed`` spends one random byte per element instead of a 64-bit word, several
  times cheaper (see ``keep_mask`` and ``PackedStreams``).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import operator
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from service.core.model import Activation, ModelConfig, as_activation, bias_name, weight_name

Scaling = Literal["inverted", "vanilla"]
MaskMode = Literal["packed", "torch"]
DEFAULT_MASK_MODE: MaskMode = "torch"

#: Most activation elements (samples x rows x width) one MC chunk holds. Part of what a seed
#: means: changing it changes the order in which masks are drawn, so it is not a setting.
MC_CHUNK_ELEMENTS = 1 << 21
#: Most activation elements of one tile: the unit of MC work one thread computes. Like the
#: chunk, it fixes the shape of every matrix product, so it is part of what a seed means.
MC_TILE_ELEMENTS = 1 << 16

#: Eval passes of at most this many input values (rows x input width) standardise their
#: rows in Python (``MLPEngine.predict_block``).
FEW_VALUES = 256

#: Computes ``fn`` over tiles and yields the results in order: ``map``, or a thread pool's.
TileMap = Callable[[Callable[[int], Tensor], Iterable[int]], Iterator[Tensor]]


class Stopped(Exception):
    """An MC computation stopped between tiles because its ``stop`` callback asked."""


class one_thread:  # noqa: N801 - a context manager, named as the function it replaced
    """Run the body with one intra-op thread in this OS thread.

    A CPU matrix product split over several threads may sum in another order (measured with
    torch 2.13: a 100x256 by 256x1 product differs in the last bit between 1 and 2 threads),
    so every forward pass computes on one thread, and a seed's bits never depend on the
    thread settings. Where the thread already runs one (the service's pools and event loop),
    this costs a call to ``torch.get_num_threads`` (a class, not a generator: entered several
    times per request).
    """

    __slots__ = ("_before",)

    def __enter__(self) -> None:
        self._before = torch.get_num_threads()
        if self._before != 1:
            torch.set_num_threads(1)

    def __exit__(self, *_: object) -> None:
        if self._before != 1:
            torch.set_num_threads(self._before)


def activation_fn(act: Activation) -> Callable[[Tensor], Tensor]:
    """``act`` as a function, in place where torch has the op (it only ever runs on a fresh
    ``F.linear`` output); the same kernels as the torch modules, so the same bits."""
    match act.name:
        case "relu":
            return torch.relu_
        case "tanh":
            return torch.tanh_
        case "sigmoid":
            return torch.sigmoid_
        case "silu":
            return functools.partial(F.silu, inplace=True)
        case "gelu":
            return functools.partial(F.gelu, approximate=act.approximate or "none")
        case "leaky_relu":
            slope = 0.01 if act.negative_slope is None else act.negative_slope
            return functools.partial(F.leaky_relu_, negative_slope=slope)
        case "elu":
            return functools.partial(F.elu_, alpha=1.0 if act.alpha is None else act.alpha)
    return _identity


def _tensor(values: array[float], rows: int) -> Tensor:
    """A fresh float32 tensor of ``rows`` rows holding ``values``: made by torch's allocator
    (aligned as every tensor the engine computes on) and filled in one copy, where
    ``torch.tensor`` of lists stores value by value."""
    t = torch.empty((rows, len(values) // rows), dtype=torch.float32)
    ctypes.memmove(t.data_ptr(), values.buffer_info()[0], len(values) * values.itemsize)
    return t


def _identity(h: Tensor) -> Tensor:
    return h


#: torch's CPU ``bernoulli_(q)`` keeps an element when a 53-bit uniform double is below ``q``,
#: so P(keep) = ceil(q 2^53) / 2^53. The packed mode splits that threshold into its top 8 bits,
#: compared with one random byte per element, and the 45 bits below, drawn only for the one
#: element in 256 whose byte ties: the same probability, from an eighth of the random bits.
_TIE_BITS = 45

#: Below this many elements a packed draw's fixed cost (a dozen torch and numpy calls)
#: exceeds what torch's kernel spends on the whole mask (make bench, 2 cores: at 5120
#: elements the packed engine lost to torch's kernel), so packed mode takes smaller masks
#: from torch's kernel. Which kernel draws a mask depends on its shape alone.
PACKED_MIN_ELEMENTS = 1 << 14
#: A packed mask's random words come from torch's generator (seeded in 3 us) up to this many
#: words, and from numpy's SFC64 stream (seeded in about 20 us, then about four times as
#: fast as torch's mt19937) beyond.
SFC64_MIN_WORDS = 1 << 13
_FULL_RANGE = -(2**63)  # random_(from=int64 min, to=None) fills all 64 bits of each word


class PackedStreams:
    """The packed mode's random streams for one request, all seeded with its seed: torch's
    generator for small masks and short word runs, numpy's SFC64 (made when first needed)
    for long ones."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.small = torch.Generator().manual_seed(seed)
        self._sfc64: np.random.SFC64 | None = None

    def words(self, n: int) -> np.ndarray:
        """``n`` random 64-bit words (uint64)."""
        if n < SFC64_MIN_WORDS:
            words = torch.empty(n, dtype=torch.int64).random_(
                _FULL_RANGE, None, generator=self.small
            )
            return words.numpy().view(np.uint64)
        if self._sfc64 is None:
            self._sfc64 = np.random.SFC64(self.seed)
        return self._sfc64.random_raw(n)


#: What one request's masks are drawn from: torch's generator (``torch`` mode) or the
#: packed streams (``packed`` mode).
MaskSource = torch.Generator | PackedStreams


def mask_source(
    seed: int, mode: MaskMode = DEFAULT_MASK_MODE, device: torch.device | str = "cpu"
) -> MaskSource:
    """The random stream of one MC request: every mask of the request is drawn from it.
    Packed masks are drawn on the host (then moved to ``device``)."""
    if mode == "packed":
        return PackedStreams(seed)
    return torch.Generator(device=device).manual_seed(seed)


def dropout_noise(
    shape: tuple[int, ...],
    p: float,
    generator: torch.Generator,
    scaling: Scaling = "inverted",
    *,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Multiplicative dropout noise: a Bernoulli(1-p) mask, divided by 1-p when inverted."""
    noise = keep_mask(shape, p, generator, device=device)
    if scaling == "inverted":
        noise.div_(1.0 - p)
    return noise


def keep_mask(
    shape: tuple[int, ...],
    p: float,
    source: MaskSource,
    *,
    device: torch.device | str = "cpu",
) -> Tensor:
    """A float32 mask of ones (kept, probability 1-p) and zeros, drawn from ``source``.

    From a ``torch.Generator`` it is torch's own ``bernoulli_(1 - p)``, mask for mask what
    ``F.dropout`` draws; from ``PackedStreams`` it is the packed draw (built on the host, then
    moved to ``device``), or torch's kernel on the small generator below
    ``PACKED_MIN_ELEMENTS``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if isinstance(source, torch.Generator):
        return torch.empty(shape, dtype=torch.float32, device=device).bernoulli_(
            1.0 - p, generator=source
        )
    n = math.prod(shape)
    if n < PACKED_MIN_ELEMENTS:
        keep = torch.empty(shape, dtype=torch.float32).bernoulli_(1.0 - p, generator=source.small)
    else:
        keep = _packed_keep_mask(n, 1.0 - p, source).view(shape)
    return keep.to(device)


def _packed_keep_mask(n: int, q: float, streams: PackedStreams) -> Tensor:
    """``n`` float32 Bernoulli(q) draws at torch's 53-bit resolution, one byte each."""
    threshold = math.ceil(q * 2**53)  # exact: q * 2^53 only shifts the exponent
    high, low = threshold >> _TIE_BITS, threshold & ((1 << _TIE_BITS) - 1)
    if high > 255:  # q rounds to 1: every byte is below the threshold
        return torch.ones(n, dtype=torch.float32)
    draws = streams.words((n + 7) // 8).view(np.uint8)[:n]
    # torch compares into float32 fastest, numpy finds the rare ties fastest: both read the
    # same bytes, and the ties are settled in place through the shared buffer.
    keep = torch.lt(torch.from_numpy(draws), high, out=torch.empty(n, dtype=torch.float32))
    ties = np.flatnonzero(draws == high)
    if ties.size:
        keep.numpy()[ties] = (streams.words(ties.size) & ((1 << _TIE_BITS) - 1)) < low
    return keep


def _without_subnormals(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` owned by the engine, its subnormal values set to zero.

    Weight decay leaves some weights below float32's smallest normal number (1.2e-38; the
    shipped concrete model has 155). On Intel CPUs a single one in a matrix slows its product
    about 40 times (measured: 7.4 ms against 0.16 ms for 1000x100 by 100x100), and each
    product it contributes lies some 30 orders of magnitude below the resolution of the
    others' sum, so no answer changes (tests/test_engine.py compares with the plain module).
    """
    owned = t.to(copy=True).contiguous()
    owned[owned.abs() < torch.finfo(torch.float32).tiny] = 0.0
    return owned


def dropout(
    x: Tensor, p: float, generator: torch.Generator, scaling: Scaling = "inverted"
) -> Tensor:
    """Train-mode dropout of ``x`` drawing from ``generator``: ``F.dropout``'s mask for its seed."""
    return x * dropout_noise(tuple(x.shape), p, generator, scaling, device=x.device)


def train_pass_seeds(seed: int, k: int) -> list[int]:
    """``k`` independent 63-bit seeds derived from ``seed`` (numpy's SeedSequence spawning):
    the seeds of ``k`` single train-mode passes that all replay from one seed."""
    children = np.random.SeedSequence(seed).spawn(k)
    return [int(c.generate_state(1, np.uint64)[0]) >> 1 for c in children]


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last axis, with 0 log 0 = 0."""
    h: Tensor = -torch.special.xlogy(probs, probs).sum(-1)
    return h


@dataclass(frozen=True)
class MCResult:
    """Summary of ``T`` stochastic passes; tensors are float64 except ``samples``."""

    mean: Tensor  # (B, out)
    variance: Tensor  # (B, out) population variance over the T samples
    samples: Tensor | None  # (T, B, out) float32, when asked for
    entropy: Tensor | None  # (B,) classification: entropy of the mean probabilities
    mutual_information: Tensor | None  # (B,) classification: BALD
    n_samples: int = 0  # passes drawn (fewer than asked when a target_se was met)


#: Passes of an adaptive request's first stage; each later stage doubles the total.
ADAPTIVE_FIRST_STAGE = 32


def mc_stages(n_samples: int, target_se: float | None) -> Iterator[int]:
    """The passes of each stage: all ``n_samples`` at once, or with a ``target_se`` 32, 32,
    64, 128, ... (the total doubling) up to ``n_samples``. A pure function of the request,
    so an adaptive answer replays from its seed like any other (it differs from a fixed-T
    answer of the same final T: its masks are drawn in other chunks)."""
    if target_se is None:
        yield n_samples
        return
    done, total = 0, min(ADAPTIVE_FIRST_STAGE, n_samples)
    while done < n_samples:
        yield total - done
        done, total = total, min(2 * total, n_samples)


def _worst_se(moments: _Moments, passes: int) -> float:
    """The largest MC standard error ``sqrt(variance / T)`` over every row and output."""
    return float((moments.variance() / passes).max().sqrt())


class _Moments:
    """Running mean and sum of squared deviations, merged chunk by chunk (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.var: Tensor | None = None

    def add(self, chunk: Tensor) -> None:
        """Fold in a ``(t, ...)`` chunk of samples."""
        c = chunk.double()
        n_b = c.shape[0]
        if self.mean is None:  # the first chunk: one fused op
            self.var, self.mean = torch.var_mean(c, 0, correction=0)
            self.n = n_b
            return
        if self.m2 is None:  # a second chunk: the first one's sum of squares
            assert self.var is not None
            self.m2 = self.var * self.n
        self.var = None
        mean_b = c.mean(0)
        m2_b = (c - mean_b).square_().sum(0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.n * n_b / n)
        self.n = n

    def variance(self) -> Tensor:
        if self.var is not None:  # a single chunk
            return self.var
        assert self.m2 is not None
        return self.m2 / self.n


class MLPEngine:
    """One loaded model: its weights as plain tensors, and the two inference paths."""

    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, Tensor],
        *,
        device: torch.device | str = "cpu",
        chunk_elements: int = MC_CHUNK_ELEMENTS,
        mask_mode: MaskMode = DEFAULT_MASK_MODE,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self._on_cpu = self.device.type == "cpu"
        self.chunk_elements = chunk_elements
        self.mask_mode: MaskMode = mask_mode
        # The function after each Linear: its hidden activation, or for the last the output
        # activation (when the model has one).
        out = config.output_activation
        self._acts = [activation_fn(a) for a in config.activations] + [
            _identity if out is None else activation_fn(as_activation(out))
        ]
        self._layers = [
            (
                _without_subnormals(tensors[weight_name(i)].to(self.device, torch.float32)),
                _without_subnormals(tensors[bias_name(i)].to(self.device, torch.float32)),
            )
            for i in range(config.n_linear)
        ]
        self._p = [config.dropout_before(i) for i in range(config.n_linear)]
        # MC multiplies by 0/1 masks; inverted dropout's 1/(1-p) moves into the weights that
        # read the mask, which saves a pass over every mask.
        self._mc_layers = [
            (_without_subnormals(w / (1.0 - p)), b)
            if p > 0 and config.dropout_scaling == "inverted"
            else (w, b)
            for (w, b), p in zip(self._layers, self._p, strict=True)
        ]
        # Layers before the first dropout are deterministic: MC computes them once.
        self._first_dropout = next((i for i, p in enumerate(self._p) if p > 0), config.n_linear)
        self._mc_width = max(config.widths[self._first_dropout :])  # widest MC activation
        self._row_macs = sum(a * b for a, b in itertools.pairwise(config.widths))
        self._x_norm = self._affine(config.input_standardization)
        self._y_norm = self._affine(config.target_standardization)
        # The same transforms as Python floats, for predict_block's few rows: its Python
        # division must never meet a std that float32 made 0 (torch's would give inf).
        x_lists = None if self._x_norm is None else [t.tolist() for t in self._x_norm]
        self._x_lists = x_lists
        self._y_lists = None if self._y_norm is None else [t.tolist() for t in self._y_norm]
        self._few_in_python = self._on_cpu and (x_lists is None or all(x_lists[1]))
        zero = [[0.0] * config.input_dim]  # a padding row, standardised
        self._zero_row = self._standardized(zero) if self._few_in_python else array("f")

    def _host(self, t: Tensor) -> Tensor:
        """``t`` on the host: itself on a CPU engine (``.cpu()`` is a torch call)."""
        return t if self._on_cpu else t.cpu()

    def _affine(self, s: object) -> tuple[Tensor, Tensor] | None:
        if s is None:
            return None
        mean = torch.tensor(s.mean, dtype=torch.float32, device=self.device)  # type: ignore[attr-defined]
        std = torch.tensor(s.std, dtype=torch.float32, device=self.device)  # type: ignore[attr-defined]
        return mean, std

    def replay_scope(self) -> dict[str, str | int]:
        """What this engine's answers depend on beyond the request and the weights: the same
        values replay the same bits (DESIGN.md contract 6)."""
        device = str(self.device)
        if self.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(self.device)})"
        return {
            "torch_version": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": device,
            "mask_mode": self.mask_mode,
            "mc_chunk_elements": self.chunk_elements,
            "mc_tile_elements": MC_TILE_ELEMENTS,
        }

    # -- cost ------------------------------------------------------------------------------

    def eval_macs(self, rows: int) -> int:
        """Multiply-adds of an eval pass over ``rows`` rows (what the data plane sizes jobs by)."""
        return rows * self._row_macs

    def mc_macs(self, rows: int, n_samples: int) -> int:
        """Multiply-adds of ``predict_mc`` (a mask element counted as one): the prefix once,
        the rest ``n_samples`` times."""
        w = self.config.widths
        products = [a * b for a, b in itertools.pairwise(w)]
        k = self._first_dropout
        masks = sum(w[i] for i in range(k, len(products)) if self._p[i] > 0)  # one each
        return rows * (sum(products[:k]) + n_samples * (sum(products[k:]) + masks))

    def tile_macs(self, rows: int, n_samples: int) -> int:
        """Multiply-adds of one MC tile (``tile_size`` samples past the shared prefix): the
        work a hand-over to another thread must pay for."""
        return self.mc_macs(rows, self.tile_size(rows, n_samples)) - self.mc_macs(rows, 0)

    # -- shared pieces -------------------------------------------------------------------

    def _prefix(self, x: Tensor) -> Tensor:
        """Input standardisation and the layers before the first dropout: ``(B, d)``."""
        h = (
            x
            if x.dtype == torch.float32 and (x.is_cpu if self._on_cpu else x.device == self.device)
            else x.to(self.device, torch.float32)
        )
        if self._x_norm is not None:
            mean, std = self._x_norm
            h = (h - mean) / std
        return self._first_layers(h)

    def _first_layers(self, h: Tensor) -> Tensor:
        """The layers before the first dropout, of standardised rows."""
        for i in range(self._first_dropout):
            h = self._linear(i, h)
        return h

    def _linear(self, i: int, h: Tensor, *, mc: bool = False) -> Tensor:
        w, b = (self._mc_layers if mc else self._layers)[i]
        return self._acts[i](F.linear(h, w, b))

    def _head(self, y: Tensor) -> Tensor:
        """Map raw outputs to answers: target units (regression) or probabilities."""
        if self.config.task == "classification":
            return torch.softmax(y, dim=-1)
        if self._y_norm is not None:
            mean, std = self._y_norm
            y = y * std + mean
        return y

    # -- eval ------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, x: Tensor) -> Tensor:
        """Eval-mode outputs ``(B, out)``: no dropout, no random numbers."""
        with one_thread():
            return self._host(self._head(self._eval_layers(self._prefix(x))))

    def predict_block(self, x: Tensor, block_rows: int) -> Tensor:
        """``predict`` of ``x``'s rows zero-padded to ``block_rows`` rows, the padding's
        outputs left out: ``(rows, out)`` for ``rows <= block_rows``.

        A few rows (``FEW_VALUES``) on the CPU are standardised in Python, and a regression
        target's transform undone in Python: the same bits as ``predict`` (each is one
        float32 subtraction, division, multiplication or addition, rounded once: computed
        on float32 values in double precision and rounded to float32, it comes out
        correctly rounded, as 53 bits >= 2 x 24 + 2). The padded block is then written into
        a tensor in one copy. On a served one-row request this saves the torch calls of the
        padding and the transforms, whose code is cold each time (docs/benchmarks.md,
        "Where a one-client request's time goes"). No inference mode here: no tensor of this
        pass requires a gradient, so autograd records nothing anyway.
        """
        rows = x.shape[0]
        few = rows > 0 and x.numel() <= FEW_VALUES
        if not (few and self._few_in_python and x.dtype == torch.float32):
            return self.predict(F.pad(x, (0, 0, 0, block_rows - rows)))[:rows]
        values = self._standardized(x.tolist())
        values += self._zero_row * (block_rows - rows)
        with one_thread():
            y = self._eval_layers(self._first_layers(_tensor(values, block_rows)))
            if self.config.task == "classification" or self._y_lists is None:
                return self._head(y)[:rows]
        mean, std = self._y_lists
        answers = array("f")
        for row in y.tolist()[:rows]:
            answers.extend(map(operator.add, array("f", map(operator.mul, row, std)), mean))
        return _tensor(answers, rows)

    def _standardized(self, rows: list[list[float]]) -> array[float]:
        """``(x - mean) / std`` of float32 rows, in Python, as one float32 array."""
        values = array("f")
        if self._x_lists is None:
            for row in rows:
                values.extend(row)
            return values
        mean, std = self._x_lists
        for row in rows:
            values.extend(map(operator.truediv, array("f", map(operator.sub, row, mean)), std))
        return values

    def _eval_layers(self, h: Tensor) -> Tensor:
        """The layers from the first dropout on, in eval mode."""
        for i in range(self._first_dropout, len(self._layers)):
            p = self._p[i]
            if p > 0 and self.config.dropout_scaling == "vanilla":
                h = h * (1.0 - p)
            h = self._linear(i, h)
        return h

    # -- Monte Carlo -----------------------------------------------------------------------

    def chunk_size(self, rows: int, n_samples: int) -> int:
        """Samples per chunk: a pure function of the request's shape, so seeds replay."""
        return max(1, min(n_samples, self.chunk_elements // (rows * self._mc_width)))

    def tile_size(self, rows: int, n_samples: int) -> int:
        """Samples per tile, the unit one thread computes: a pure function of the shape."""
        return max(1, min(n_samples, MC_TILE_ELEMENTS // (rows * self._mc_width)))

    @torch.inference_mode()
    def predict_mc(
        self,
        x: Tensor,
        n_samples: int,
        seed: int,
        *,
        return_samples: bool = False,
        stop: Callable[[], bool] | None = None,
        map_tiles: TileMap = map,
        target_se: float | None = None,
    ) -> MCResult:
        """``n_samples`` dropout passes seeded by ``seed``, summarised (and kept if asked).

        ``stop`` is asked before every tile: when it answers True the call raises ``Stopped``
        (a request past its deadline, or whose client left). ``map_tiles`` computes the tiles
        of a chunk, in order or on several threads: the answer is the same bits either way.
        With ``target_se`` the passes come in stages (``mc_stages``) until every output's
        standard error ``sqrt(variance / T)`` is at most ``target_se``, ``n_samples`` at most.
        """
        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        with one_thread():
            source = mask_source(seed, self.mask_mode, self.device)
            h0 = self._prefix(x)  # (B, d)
            rows = h0.shape[0]
            moments = _Moments()
            classification = self.config.task == "classification"
            entropy_sum: Tensor | float = 0.0
            kept: list[Tensor] = []
            passes = 0
            for stage in mc_stages(n_samples, target_se):
                chunk, tile = self.chunk_size(rows, stage), self.tile_size(rows, stage)
                for start in range(0, stage, chunk):
                    t = min(chunk, stage - start)
                    y = self._head(self._stochastic_pass(h0, t, source, tile, stop, map_tiles))
                    moments.add(y)  # y: (t, B, out)
                    if classification:
                        entropy_sum = entropy_sum + entropy(y).sum(0, dtype=torch.float64)
                    if return_samples:
                        kept.append(self._host(y))
                passes += stage
                if target_se is not None and _worst_se(moments, passes) <= target_se:
                    break
            mean, variance = moments.mean, moments.variance()
            assert mean is not None
            h_mean = mi = None
            if classification:
                h_mean = entropy(mean)
                mi = self._host((h_mean - entropy_sum / passes).clamp_(min=0.0))
                h_mean = self._host(h_mean)
            return MCResult(
                mean=self._host(mean),
                variance=self._host(variance),
                samples=torch.cat(kept) if return_samples else None,
                entropy=h_mean,
                mutual_information=mi,
                n_samples=passes,
            )

    @torch.inference_mode()
    def train_pass(self, x: Tensor, seed: int) -> Tensor:
        """One stochastic pass ``(B, out)`` seeded by ``seed``: what a model left in train mode
        answers to one call. Equal to ``predict_mc(x, 1, seed, return_samples=True)``'s sample."""
        with one_thread():
            source = mask_source(seed, self.mask_mode, self.device)
            return self._head(self._stochastic_pass(self._prefix(x), 1, source, 1))[0].cpu()

    def _stochastic_pass(
        self,
        h0: Tensor,
        t: int,
        source: MaskSource,
        tile: int,
        stop: Callable[[], bool] | None = None,
        map_tiles: TileMap = map,
    ) -> Tensor:
        """``t`` samples from the shared prefix ``h0 (B, d)``: returns ``(t, B, out)``.

        Every mask of the chunk is drawn first, layer by layer, in the order one pass over
        the whole chunk would draw them; the passes then run over tiles of ``tile`` samples,
        so each matrix product has a shape fixed by the request, whichever thread runs it.
        """
        masks = {
            i: keep_mask((t, *h0.shape[:-1], self.config.widths[i]), p, source, device=self.device)
            for i, p in enumerate(self._p)
            if i >= self._first_dropout and p > 0
        }

        def run(start: int) -> Tensor:
            if stop is not None and stop():
                raise Stopped
            with one_thread():
                n = min(tile, t - start)
                whole = n == t  # one tile: the masks as drawn, no slicing
                # The first layer here has a mask (it is the first dropout), which the
                # prefix (B, d) multiplies into by broadcasting: h becomes (n, B, d). A
                # model without dropout has no such layer: its n samples are views of h0.
                h = h0 if masks else h0.expand(n, *h0.shape)
                for i in range(self._first_dropout, len(self._layers)):
                    mask = masks.get(i)
                    if mask is not None:
                        part = mask if whole else mask[start : start + n]
                        h = part.mul_(h)  # into the fresh mask: no copy
                    h = self._linear(i, h, mc=True)
                return h

        # In order, the tiles run under the caller's inference mode; a pool thread needs its own.
        tile_fn = run if map_tiles is map else torch.inference_mode()(run)
        tiles = list(map_tiles(tile_fn, range(0, t, tile)))
        return tiles[0] if len(tiles) == 1 else torch.cat(tiles)
