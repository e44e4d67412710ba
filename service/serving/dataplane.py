"""The data plane: one request in, one answer out, whatever protocol carried it.

Like KServe's ``DataPlane``, it takes a protocol-neutral ``InferRequest`` (a model name and
version, rows as JSON lists or a tensor, and MC parameters when the request asks for
Monte-Carlo dropout) and returns an ``InferAnswer`` (named output tensors, and the
``n_samples`` and ``seed`` an MC answer used). Inside: the checks of rows and widths
against the model and the limits, the seed drawn when none was sent, per-model admission
with its deadline, eval batching, the jobs that run on the event loop or on thread pools
(``jobs.JobRunner``), and the refusal of any answer holding a number JSON cannot carry.
REST v1, REST v2 and any later front door only translate.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from service.core.engine import MCResult, MLPEngine, train_pass_seeds
from service.core.errors import (
    ControlRefused,
    InvalidInput,
    ModelLoadFailed,
    ModelNotFound,
    NotReady,
    VersionNotFound,
)
from service.core.repository import (
    LoadedModel,
    ModelLoadError,
    ModelRepository,
    describe_failure,
    load_model,
)
from service.serving.admission import Admission
from service.serving.batching import EvalBatcher, blocked_predict, choose_block, padded_macs
from service.serving.jobs import JobRunner, Ran
from service.serving.metrics import Metrics
from service.serving.observe import annotate
from service.serving.outputs import (
    OUTPUT,
    Method,
    check_coverage,
    coverage_method,
    mc_outputs,
)
from service.serving.priority import EvalFirst
from service.settings import Settings

log = logging.getLogger(__name__)

#: Model folder names (``ModelConfig.name``): never a path.
_MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def _is_model_name(name: str) -> bool:
    return _MODEL_NAME.fullmatch(name) is not None


#: The smallest magnitude that rounds to infinity in float32 (FLT_MAX plus half an ulp).
_FLOAT32_OVERFLOW = float(2**128 - 2**103)
#: JSON rows of at most this many values are checked in Python, larger ones with numpy.
SMALL_INPUT_VALUES = 256
#: Answers of at most this many values are checked for NaN and infinity in Python.
SMALL_OUTPUT_VALUES = 64

#: Request rows as JSON gives them, or a decoded ``(B, in)`` array or tensor.
Inputs = list[list[float]] | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class MCParams:
    """Monte-Carlo dropout: ``n_samples`` passes (None: the default) from ``seed`` (None:
    drawn, and returned so the answer replays). ``coverage`` asks for intervals (regression)
    or prediction sets (classification) that hold that share of targets; ``target_se`` stops
    sampling once every output's MC standard error is at most it (``n_samples`` passes at
    most, the maximum when none is named)."""

    n_samples: int | None = None
    seed: int | None = None
    return_samples: bool = False
    coverage: float | None = None
    target_se: float | None = None


@dataclass(frozen=True)
class InferRequest:
    """One prediction request: eval when ``mc`` is None, else MC dropout."""

    model: str
    inputs: Inputs
    version: str | None = None
    mc: MCParams | None = None


@dataclass(frozen=True)
class InferAnswer:
    """Named output tensors: ``output`` for eval (float32); ``mean``, ``variance``, ``std``
    and the task's extras for MC (float64; ``samples`` float32, flags bool), with the
    ``n_samples`` and ``seed`` it used, and how it met a ``coverage``."""

    model: LoadedModel
    outputs: dict[str, torch.Tensor]
    n_samples: int | None = None  # passes used (fewer than asked when target_se was met)
    seed: int | None = None
    coverage: float | None = None
    coverage_method: Method | None = None  # how coverage was met (outputs.coverage_method)


@dataclass(frozen=True)
class CompareAnswer:
    """Eval, ``k`` single train-mode passes and MC for the same rows, each with its time."""

    model: LoadedModel
    n_samples: int
    seed: int
    eval: torch.Tensor  # (B, out)
    train_pass_seeds: list[int]
    train_passes: torch.Tensor  # (k, B, out)
    mc: MCResult
    eval_seconds: float
    train_pass_seconds: list[float]
    mc_seconds: float


@dataclass(frozen=True)
class RepositoryEntry:
    """A folder of the model repository and whether it serves (the repository extension's
    index)."""

    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str


@dataclass(frozen=True)
class Readiness:
    """What /readyz and the v2 health calls report."""

    status: Literal["ready", "loading", "not ready"]
    models: list[str]
    failed: dict[str, str]


def _finite(values: list[Any]) -> bool:
    """Whether every number of ``Tensor.tolist()``'s rows (or of one row) is finite."""
    if values and isinstance(values[0], list):
        return all(math.isfinite(v) for row in values for v in row)
    return all(map(math.isfinite, values))


def check_outputs(model: LoadedModel, outputs: Mapping[str, torch.Tensor]) -> None:
    """Refuse an answer holding a number JSON cannot carry (NaN, infinity), naming the rows.

    Finite inputs can still overflow inside the model (values near float32's limit times
    the weights); the answer would otherwise carry ``null`` where a number belongs. Every
    tensor has rows on its first axis (``samples``, rows on its second, is finite when the
    mean over it is).
    """
    checked = [t for name, t in outputs.items() if name != "samples"]
    if sum(t.numel() for t in checked) <= SMALL_OUTPUT_VALUES and all(
        t.dim() <= 2 for t in checked
    ):
        # A few values (a one-row answer): checked in Python. On a served request numpy's
        # calls cost more than that, their code cold by the time an answer is checked (eval
        # at one client about 10% more requests a second, measured side by side).
        if all(_finite(t.tolist()) for t in checked):
            return
    else:
        # numpy's isfinite costs a tenth of torch's on small tensors, and one call over all
        # the outputs at once a third of one per output: rows are looked for only on a failure.
        arrays = [t.numpy() for t in checked]
        every = arrays[0] if len(arrays) == 1 else np.concatenate([a.reshape(-1) for a in arrays])
        if np.isfinite(every).all():
            return
    bad: set[int] = set()
    for name, t in outputs.items():
        if name == "samples":
            continue
        values = t.numpy()
        if not np.isfinite(values).all():
            finite = np.isfinite(values.reshape(len(values), -1)).all(1)
            bad.update(np.flatnonzero(~finite).tolist())
    if bad:
        rows = sorted(bad)
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise InvalidInput(
            ["inputs", rows[0]],
            f"model {model.config.name!r} computes outputs beyond float range for rows "
            f"[{shown}]: their values are too large for this model",
        )


class DataPlane:
    """Serves the models of one repository: checks, admission, batching, jobs, answers."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.repository: ModelRepository | None = None
        self.jobs = JobRunner(
            inline_max_macs=settings.inline_max_macs,
            inference_threads=settings.inference_threads,
            tile_threads=settings.intra_op_threads(),
        )
        self._admission = Admission(
            settings.max_queue_size, settings.request_timeout_s, self.metrics
        )
        self._batchers: dict[str, EvalBatcher] = {}
        # Each model's eval block on this machine (batching.choose_block), with the engine
        # it was checked for: a reloaded version is checked again.
        self._blocks: dict[str, tuple[MLPEngine, int]] = {}
        self.priority = EvalFirst(settings.mc_share)
        self._control = asyncio.Lock()  # one load or unload at a time
        self.device = "cpu"

    # -- the repository -------------------------------------------------------------------

    async def load(self, device: str) -> None:
        """Load the repository off the event loop, then publish it (readiness follows)."""
        self.device = device
        s = self.settings
        try:
            repo = await asyncio.to_thread(ModelRepository.load, s.model_dir, device, s.mc_mask)
        except Exception as exc:  # an unreadable repository: say so in readiness, never hang
            log.error("could not read the model repository %s", s.model_dir, exc_info=exc)
            reason = (
                exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            )
            repo = ModelRepository(failures={"(repository)": f"could not be read: {reason}"})
        for model in list(repo):
            try:  # checked here, off the loop, rather than on the model's first request
                await asyncio.to_thread(self.block_rows, model)
            except Exception as exc:  # a model that cannot compute a pass does not serve
                log.error("model %r cannot compute an eval pass", model.config.name, exc_info=exc)
                del repo.models[model.config.name]
                repo.failures[model.config.name] = describe_failure(exc)
                continue
            c = model.config
            self.metrics.model_info.labels(c.name, c.version, c.sha256, c.task).set(1)
        self.repository = repo
        # Everything alive now (torch, the app, the models) lives as long as the process:
        # out of the collector's way, a full collection no longer walks some 200 000 objects
        # every few hundred requests (measured: eval at 64 clients 3793 -> 4572 requests/s).
        gc.freeze()

    async def load_model(self, name: str) -> LoadedModel:
        """(Re)load ``models/<name>`` from disk and serve it, atomically: requests already
        admitted finish on the version they found, later ones get the new one. A folder that
        fails its checks raises ``ModelLoadFailed`` and leaves the old version serving."""
        folder = self._control_folder(name)
        async with self._control:
            args = (folder, self.device, self.settings.mc_mask)
            try:
                model = await asyncio.to_thread(load_model, *args)
                await asyncio.to_thread(self.block_rows, model)
            except ModelLoadError as exc:
                raise ModelLoadFailed(name, str(exc)) from None
            except Exception as exc:
                raise ModelLoadFailed(name, describe_failure(exc)) from None
            self._swap(name, model)
        return model

    async def unload_model(self, name: str) -> None:
        """Stop serving ``name``; requests already admitted finish. Unloading a folder that
        is not served does nothing."""
        self._control_folder(name, must_exist=False)
        async with self._control:
            self._swap(name, None)

    def index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """Every folder of the repository and every served model, with its state."""
        repo = self._repository()
        root = self.settings.model_dir
        listed = root.iterdir() if root.is_dir() else iter(())
        folders = [p.name for p in listed if _is_model_name(p.name) and p.is_dir()]
        entries = []
        for name in sorted({*folders, *repo.models}):
            model = repo.models.get(name)
            if model is not None:
                entries.append(RepositoryEntry(name, model.config.version, "READY", ""))
            elif not ready_only:
                reason = repo.failures.get(name, "not loaded")
                entries.append(RepositoryEntry(name, "", "UNAVAILABLE", reason))
        return entries

    def _repository(self) -> ModelRepository:
        if self.repository is None:
            raise NotReady("models are still loading")
        return self.repository

    def _control_folder(self, name: str, must_exist: bool = True) -> Path:
        if self.settings.workers > 1:
            raise ControlRefused(
                f"this server runs {self.settings.workers} worker processes, each holding its "
                "own models: a load or unload would reach one of them. Restart the server to "
                "change its models, or run one worker per process (and more replicas)"
            )
        repo = self._repository()
        folder = self.settings.model_dir / name
        served = not must_exist and name in repo.models
        if not (_is_model_name(name) and (folder.is_dir() or served)):
            raise ModelNotFound(name, [e.name for e in self.index()], "repository folders")
        return folder

    def _swap(self, name: str, model: LoadedModel | None) -> None:
        """Serve ``model`` under ``name`` (None: nothing), on the event loop: no request sees
        a half-made change. The replaced version's batcher answers what it holds, then stops."""
        repo = self._repository()
        old = repo.models.pop(name, None)
        repo.failures.pop(name, None)
        if old is not None:
            c = old.config
            self.metrics.model_info.labels(c.name, c.version, c.sha256, c.task).set(0)
            batcher = self._batchers.pop(name, None)
            if batcher is not None:
                batcher.retire()
        if model is not None:
            repo.models[name] = model
            c = model.config
            self.metrics.model_info.labels(c.name, c.version, c.sha256, c.task).set(1)

    def readiness(self) -> Readiness:
        """Ready once loaded, with every model (or, if allowed, some) served."""
        repo = self.repository
        if repo is None:
            return Readiness("loading", [], {})
        ok = bool(repo.models) and (not repo.failures or self.settings.allow_partial_ready)
        return Readiness("ready" if ok else "not ready", sorted(repo.models), dict(repo.failures))

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        """The served model of that name (and version, when one is named)."""
        if self.repository is None:
            raise NotReady("models are still loading")
        model = self.repository.get(name)
        if version is not None and version != model.config.version:
            raise VersionNotFound(name, version, model.config.version)
        return model

    def models(self) -> list[LoadedModel]:
        return list(self.repository) if self.repository else []

    def replay_scope(self, model: LoadedModel) -> dict[str, str | int]:
        """What an answer's bits depend on beyond the request (DESIGN.md contract 6)."""
        return {**model.engine.replay_scope(), "eval_block_rows": self.block_rows(model)}

    def block_rows(self, model: LoadedModel) -> int:
        """Rows of every eval pass of ``model``: ``DROPOUT_EVAL_BLOCK_ROWS`` where that keeps
        every row's bits at every position on this machine (``batching.choose_block``, a few
        passes, checked once per loaded version), else a fallback."""
        name = model.config.name
        checked = self._blocks.get(name)
        if checked is None or checked[0] is not model.engine:
            checked = self._blocks[name] = (
                model.engine,
                choose_block(model.engine, self.settings.eval_block_rows),
            )
        return checked[1]

    # -- requests -------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferAnswer:
        """Answer one request: eval, or MC dropout when ``request.mc`` says so."""
        model = self.model(request.model, request.version)
        x = self.to_tensor(model, request.inputs)
        if request.mc is None:
            return InferAnswer(model, {OUTPUT: await self._predict(model, x)})
        mc = request.mc
        config = model.config
        adaptive = mc.target_se is not None
        if adaptive and mc.n_samples is None:
            n = self.settings.max_n_samples  # the cap: sampling stops at the target
        else:
            n = self.n_samples(mc.n_samples)
        annotate(n_samples=n)  # the cap with target_se; the passes drawn once answered
        if mc.target_se is not None and not 0 < mc.target_se < math.inf:
            raise InvalidInput(["target_se"], f"target_se must be > 0, got {mc.target_se}")
        seed = secrets.randbits(63) if mc.seed is None else mc.seed
        if mc.return_samples:
            self._check_sample_values(n, x, model)
        if mc.coverage is not None:
            check_coverage(config, mc.coverage)
        async with self._admission.admit(config.name):
            ran = await self._mc(model, x, n, seed, mc.return_samples, mc.target_se)
        result = ran.result
        annotate(n_samples=result.n_samples)
        outputs = mc_outputs(config, result, mc.coverage)
        check_outputs(model, outputs)
        self.metrics.observe_mc(config, result.n_samples, ran.compute_s, outputs)
        self._observe(model, "mc", ran)
        method = None if mc.coverage is None else coverage_method(config)
        return InferAnswer(model, outputs, result.n_samples, seed, mc.coverage, method)

    async def compare(
        self,
        name: str,
        inputs: Inputs,
        n_samples: int | None,
        seed: int | None,
        n_train_passes: int,
    ) -> CompareAnswer:
        """What eval, a model left in train mode, and MC dropout answer to the same rows."""
        model = self.model(name)
        x = self.to_tensor(model, inputs)
        n = self.n_samples(n_samples)
        annotate(n_samples=n)
        seed = secrets.randbits(63) if seed is None else seed
        seeds = train_pass_seeds(seed, n_train_passes)
        engine = model.engine

        def train_pass(s: int) -> Callable[[Callable[[], bool]], torch.Tensor]:
            return lambda _: engine.train_pass(x, s)

        async with self._admission.admit(model.config.name):
            # Each piece runs where predict and predict/mc would run it, so all three answer
            # the same bits for the same rows and seed.
            ev = await self._eval(model, x)
            passes = [
                await self.jobs.run(train_pass(s), engine.mc_macs(len(x), 1), "mc") for s in seeds
            ]
            mc = await self._mc(model, x, n, seed, False)
        train_passes = torch.stack([p.result for p in passes])
        check_outputs(model, {"eval": ev.result, "train_passes": train_passes.transpose(0, 1)})
        check_outputs(model, mc_outputs(model.config, mc.result))
        return CompareAnswer(
            model=model,
            n_samples=n,
            seed=seed,
            eval=ev.result,
            train_pass_seeds=seeds,
            train_passes=train_passes,
            mc=mc.result,
            eval_seconds=ev.compute_s,
            train_pass_seconds=[p.compute_s for p in passes],
            mc_seconds=mc.compute_s,
        )

    # -- checks ---------------------------------------------------------------------------

    def to_tensor(self, model: LoadedModel, inputs: Inputs) -> torch.Tensor:
        """Check rows and widths against the model and the limits; return ``(B, in)`` float32
        in torch's own memory.

        ``inputs`` is JSON rows (v1), or an array or tensor a codec decoded (v2); rows and
        arrays take the same conversion, so v1 and v2 compute on the same bits.
        """
        annotate(model=model.config.name, rows=len(inputs))
        if len(inputs) > self.settings.max_rows:
            raise InvalidInput(
                ["inputs"], f"{len(inputs)} rows exceed the maximum of {self.settings.max_rows}"
            )
        width = model.config.input_dim
        if isinstance(inputs, list):
            for i, row in enumerate(inputs):
                if len(row) != width:
                    raise InvalidInput(
                        ["inputs", i],
                        f"row {i} has {len(row)} values; model {model.config.name!r} "
                        f"expects {width}",
                    )
            if len(inputs) * width <= SMALL_INPUT_VALUES and all(
                -_FLOAT32_OVERFLOW < v < _FLOAT32_OVERFLOW for row in inputs for v in row
            ):
                # A few values: checked in Python and converted in one torch call (numpy's
                # four calls cost a one-row request more than its forward pass), with the
                # same float64 to float32 rounding as below, so the same bits. What fails
                # the check goes below, where the error names the row.
                return torch.tensor(inputs, dtype=torch.float32)
            values = np.array(inputs, dtype=np.float64)
        else:
            values = inputs.cpu().numpy() if isinstance(inputs, torch.Tensor) else inputs
            if values.ndim != 2 or values.shape[1] != width:
                raise InvalidInput(
                    ["inputs", 0],
                    f"rows of {values.shape[1:]} values; model {model.config.name!r} "
                    f"expects {width}",
                )
        if values.dtype == np.float64:  # past FP32's range is infinity once converted
            within = np.abs(values) < _FLOAT32_OVERFLOW  # False for NaN and infinities too
        else:
            within = np.isfinite(values)
        if not within.all():
            bad = int(np.flatnonzero(~within.all(1))[0])
            raise InvalidInput(
                ["inputs", bad],
                f"row {bad} holds a value that is not a finite number within float32 range",
            )
        return torch.from_numpy(values).to(torch.float32, copy=True)

    def n_samples(self, requested: int | None) -> int:
        n = self.settings.default_n_samples if requested is None else requested
        if not 2 <= n <= self.settings.max_n_samples:
            raise InvalidInput(
                ["n_samples"], f"n_samples must be in [2, {self.settings.max_n_samples}], got {n}"
            )
        return n

    def _check_sample_values(self, n: int, x: torch.Tensor, model: LoadedModel) -> None:
        values = n * x.shape[0] * model.config.output_dim
        if values > self.settings.max_sample_values:
            raise InvalidInput(
                ["return_samples"],
                f"samples would hold {values} values, over the limit of "
                f"{self.settings.max_sample_values}; lower n_samples or rows",
            )

    # -- jobs -----------------------------------------------------------------------------

    async def _predict(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        async with self._admission.admit(model.config.name):
            self.priority.eval_started()
            try:
                if self.settings.batching:
                    ran = await self._batcher(model).predict(x)
                else:
                    ran = await self._eval(model, x)
                    self.metrics.observe_batch(model.config.name, 1, x.shape[0], ran.compute_s)
            finally:
                self.priority.eval_ended()
        check_outputs(model, {OUTPUT: ran.result})
        self._observe(model, "eval", ran)
        return ran.result

    async def _eval(self, model: LoadedModel, x: torch.Tensor) -> Ran[torch.Tensor]:
        """One eval job over zero-padded blocks, as a batch of one."""
        block = self.block_rows(model)
        macs = padded_macs(model.engine, x.shape[0], block)
        return await self.jobs.run(lambda _: blocked_predict(model.engine, x, block), macs, "eval")

    async def _mc(
        self,
        model: LoadedModel,
        x: torch.Tensor,
        n: int,
        seed: int,
        return_samples: bool,
        target_se: float | None = None,
    ) -> Ran[MCResult]:
        """One MC job (its answer unchecked: the caller checks what it sends)."""
        engine = model.engine
        macs = engine.mc_macs(x.shape[0], n)  # an adaptive job is sized by its cap
        async with self.priority.mc_turn() as waited:  # eval first
            if waited is not None:
                annotate(priority_wait_ms=round(waited * 1000, 3))
            inline = self.jobs.inline(macs) or self._alone(macs)
            tiles = map if inline else self.jobs.tile_map(engine.tile_macs(x.shape[0], n))

            def work(stopped: Callable[[], bool]) -> MCResult:
                return engine.predict_mc(
                    x,
                    n,
                    seed,
                    return_samples=return_samples,
                    stop=stopped,
                    map_tiles=tiles,
                    target_se=target_se,
                )

            return await self.jobs.run(work, macs, "mc", inline=inline)

    def _alone(self, macs: int) -> bool:
        """Whether an MC job of ``macs`` multiply-adds computes on the loop because its
        request is the only one the front doors have read and not answered, and no eval
        traffic is about (``inline_alone_max_macs``)."""
        return (
            self.settings.inline_max_macs > 0
            and macs <= self.settings.inline_alone_max_macs
            and self.metrics.in_flight.value <= 1
            and not self.priority.evals_active()
        )

    def _batcher(self, model: LoadedModel) -> EvalBatcher:
        name = model.config.name
        batcher = self._batchers.get(name)
        if batcher is None:
            s = self.settings
            batcher = self._batchers[name] = EvalBatcher(
                name,
                model.engine,
                functools.partial(self.jobs.run, kind="eval"),
                self.metrics,
                max_rows=s.max_batch_size,
                max_delay_s=s.max_delay_ms / 1000,
                block_rows=self.block_rows(model),
                inline=self.jobs.inline,
            )
        return batcher

    def _observe(self, model: LoadedModel, kind: str, ran: Ran[Any]) -> None:
        self.metrics.add(self.metrics.queue_wait, (model.config.name, kind), ran.queue_s)
        annotate(
            queue_ms=round(ran.queue_s * 1000, 3),
            compute_ms=round(ran.compute_s * 1000, 3),
            batch_requests=ran.shared,
        )

    def close(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()
        self.jobs.close()
