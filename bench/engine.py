"""MC dropout in process: the engine against the naive ways, the peer library and the floor.

Every method answers the same question (mean and variance of T dropout passes over B rows)
for MLPs with dropout 0.1 after each hidden layer. Methods run round-robin within each cell,
so a slow patch of a shared machine hits them alike; the cell reports each one's median.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from service.core.engine import MC_CHUNK_ELEMENTS, MLPEngine, keep_mask, mask_source
from service.core.model import ModelConfig, build_sequential, load_into_sequential

P = 0.1
MODELS = {"16-256-256-1": (16, [256, 256], 1), "64-512-512-512-10": (64, [512, 512, 512], 10)}
ROWS = (1, 32)
SAMPLES = (10, 100, 1000, 10_000)
#: The batched methods hold T x B rows of every activation at once; past this many bytes per
#: activation they are not run (the shared machine has no room for several GB per call).
BATCHED_MAX_BYTES = 400 * 2**20
#: The floor's GEMMs run as single products up to this many rows, and are scaled linearly
#: beyond (a GEMM of that height is already at the machine's throughput).
FLOOR_MAX_ROWS = 1 << 13
#: A method whose call would take longer than this (extrapolated linearly in T from the last
#: T measured) is not run: the naive loop at T = 10000 would dominate the whole benchmark.
MAX_CALL_SECONDS = 20.0
BASELINES = ("naive loop", "naive batched", "peer")  # the methods that cap may skip

Method = Callable[[torch.Tensor, int, int], object]


@dataclass
class Cell:
    model: str
    rows: int
    samples: int
    seconds: dict[str, float] = field(default_factory=dict)  # method -> median
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why


def config_for(name: str) -> ModelConfig:
    d_in, hidden, d_out = MODELS[name]
    return ModelConfig(
        name="bench",
        version="1",
        task="regression",
        input_dim=d_in,
        hidden=hidden,
        output_dim=d_out,
        dropout=[P] * len(hidden),
        noise_variance=[1.0] * d_out,
        sha256="0" * 64,
    )


def random_weights(config: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(shape, generator=g) / shape[-1] ** 0.5
        for name, shape in config.weight_shapes().items()
    }


def peer_module() -> ModuleType | None:
    """torch-uncertainty's MC-dropout module, or None when the peers extra is not installed.

    Its package ``__init__`` imports Lightning's CLI, which the wrapper never uses; loading
    the module file alone measures the wrapper exactly as shipped without pulling Lightning.
    """
    spec = importlib.util.find_spec("torch_uncertainty")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = f"{spec.submodule_search_locations[0]}/methods/mc_dropout.py"
    module_spec = importlib.util.spec_from_file_location("tu_mc_dropout", path)
    assert module_spec is not None
    assert module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def summary(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return y.mean(0), y.var(0, correction=0)


class Suite:
    """The five ways of computing one model's MC summary, built once per model."""

    def __init__(self, name: str, peer: ModuleType | None) -> None:
        self.config = config_for(name)
        tensors = random_weights(self.config)
        self.model = build_sequential(self.config)
        load_into_sequential(self.model, tensors)
        self.engine = MLPEngine(self.config, tensors, mask_mode="packed")
        self.engine_torch = MLPEngine(self.config, tensors, mask_mode="torch")
        self.peer = peer
        self.linears = [m for m in self.model if isinstance(m, nn.Linear)]

    def methods(self, rows: int, samples: int) -> tuple[dict[str, Method], dict[str, str]]:
        width = max(self.config.hidden)
        batched_bytes = rows * samples * width * 4
        methods: dict[str, Method] = {"naive loop": self.naive_loop}
        skipped: dict[str, str] = {}
        too_big = f"needs {batched_bytes / 2**20:.0f} MiB per activation"
        if batched_bytes <= BATCHED_MAX_BYTES:
            methods["naive batched"] = self.naive_batched
        else:
            skipped["naive batched"] = too_big
        if self.peer is None:
            skipped["peer"] = "torch-uncertainty not installed"
        elif batched_bytes <= BATCHED_MAX_BYTES:
            methods["peer"] = self.peer_method(samples)
        else:
            skipped["peer"] = too_big
        methods["engine"] = lambda x, t, s: self.engine.predict_mc(x, t, s)
        methods["engine (torch masks)"] = lambda x, t, s: self.engine_torch.predict_mc(x, t, s)
        methods["floor"] = self.floor_method(rows, samples)
        methods["floor GEMMs"] = self.floor_method(rows, samples, masks=False)
        return methods, skipped

    @torch.no_grad()
    def naive_loop(self, x: torch.Tensor, samples: int, seed: int) -> object:
        torch.manual_seed(seed)
        self.model.train()
        return summary(torch.stack([self.model(x) for _ in range(samples)]))

    @torch.no_grad()
    def naive_batched(self, x: torch.Tensor, samples: int, seed: int) -> object:
        torch.manual_seed(seed)
        self.model.train()
        return summary(self.model(x.repeat(samples, 1)).view(samples, *x.shape[:1], -1))

    def peer_method(self, samples: int) -> Method:
        assert self.peer is not None
        wrapped = self.peer.mc_dropout(
            self.model, samples, on_batch=True, task="regression", probabilistic=False
        )

        @torch.no_grad()
        def run(x: torch.Tensor, t: int, seed: int) -> object:
            torch.manual_seed(seed)
            wrapped.eval()  # the wrapper keeps only its dropout layers in train mode
            return summary(wrapped(x).view(t, x.shape[0], -1))

        return run

    def floor_method(self, rows: int, samples: int, *, masks: bool = True) -> Method:
        """The products of every layer after the first as single GEMMs, plus the masks."""
        height = min(rows * samples, FLOOR_MAX_ROWS)
        scale = rows * samples / height
        g = torch.Generator().manual_seed(0)
        first, *rest = self.linears
        inputs = [torch.randn(height, lin.in_features, generator=g) for lin in rest]
        outputs = [torch.empty(height, lin.out_features) for lin in rest]
        weights = [lin.weight.detach().t() for lin in rest]

        def run(x: torch.Tensor, t: int, seed: int) -> object:
            start = time.perf_counter()
            first(x)  # once: no dropout before it
            bits = mask_source(seed, "packed")
            for a, w, out in zip(inputs, weights, outputs, strict=True):
                if masks:  # in pieces of an engine chunk: one huge draw is slower, not a floor
                    for piece in range(0, a.numel(), MC_CHUNK_ELEMENTS):
                        keep_mask((min(MC_CHUNK_ELEMENTS, a.numel() - piece),), P, bits)
                torch.mm(a, w, out=out)
            return (time.perf_counter() - start) * (scale - 1)  # the rows not run

        return run


def time_cell(methods: dict[str, Method], x: torch.Tensor, samples: int, budget: float) -> dict:
    """Median seconds per method, running the methods in turn until ``budget`` is spent."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():  # warm-up
        fn(x, samples, 0)
    start, rounds = time.perf_counter(), 0
    while rounds < 3 or (time.perf_counter() - start < budget and rounds < 50):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            extra = fn(x, samples, rounds)
            elapsed = time.perf_counter() - t0
            times[name].append(elapsed + (extra if isinstance(extra, float) else 0.0))
        rounds += 1
        if time.perf_counter() - start > 4 * budget:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def too_slow(
    methods: dict[str, Method], skipped: dict[str, str], last: Cell | None, t: int
) -> None:
    """Move the methods whose call would exceed ``MAX_CALL_SECONDS`` from ``methods`` to
    ``skipped``, extrapolating from the previous cell of the same model and rows."""
    if last is None:
        return
    for name, seconds in last.seconds.items():
        estimate = seconds * t / last.samples
        if name in methods and name in BASELINES and estimate > MAX_CALL_SECONDS:
            del methods[name]
            skipped[name] = f"about {estimate:.0f} s per call, extrapolated from T={last.samples}"


def run(budget: float = 1.0, samples: tuple[int, ...] = SAMPLES) -> list[Cell]:
    peer = peer_module()
    cells = []
    for name in MODELS:
        suite = Suite(name, peer)
        for rows in ROWS:
            x = torch.randn(
                rows, suite.config.input_dim, generator=torch.Generator().manual_seed(1)
            )
            last = None
            for t in samples:
                methods, skipped = suite.methods(rows, t)
                too_slow(methods, skipped, last, t)
                cell = last = Cell(name, rows, t, time_cell(methods, x, t, budget), skipped)
                cells.append(cell)
                print(
                    f"{name} B={rows} T={t}: "
                    + ", ".join(f"{m} {s * 1e3:.2f} ms" for m, s in cell.seconds.items()),
                    flush=True,
                )
    return cells
