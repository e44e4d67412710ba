"""Prometheus metrics: one registry per app; the front doors count their requests here.

With several worker processes (``serve --workers N``) each worker writes its values to files
in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, set up by the
command line before the workers start) and every scrape, whichever worker answers it, adds
up all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from torch import Tensor

from service.core.model import ModelConfig
from service.serving.gather import Gathered

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Queue waits and forward passes start far below a millisecond.
COMPUTE_BUCKETS = (0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS)
BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
MC_SAMPLE_BUCKETS = (2, 10, 30, 100, 300, 1000, 3000, 10_000, 100_000)
#: Served std, in the target's units, whatever they are: 1, 2, 5 a decade from 1e-3 to 1e4.
STD_BUCKETS = (*(m * 10.0**e for e in range(-3, 4) for m in (1, 2, 5)), 1e4)
#: Mutual information in nats (at most ln(classes): 2.3 for ten).
MI_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: The OOD score is the statistic over its held-out 99th percentile: above 1 is flagged.
OOD_SCORE_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0)


class LiveCount:
    """A count of what is in progress, shown by a gauge. In one process the gauge reads the
    count when scraped, so a change costs an addition rather than a locked update; in
    multiprocess mode, where a gauge cannot read a function, each change is written
    through to the worker's file as well."""

    __slots__ = ("_gauge", "value")

    def __init__(self, gauge: Gauge, shared: bool) -> None:
        self.value = 0
        self._gauge = gauge if shared else None
        if not shared:
            gauge.set_function(lambda: self.value)

    def inc(self) -> None:
        self.value += 1
        if self._gauge is not None:
            self._gauge.inc()

    def dec(self) -> None:
        self.value -= 1
        if self._gauge is not None:
            self._gauge.dec()


def _apply(updates: list[tuple[Callable[[float], None], float]]) -> None:
    for update, value in updates:
        update(value)


class _FoldFirst:
    """Registered before every collector: whatever reads the registry (a scrape,
    ``get_sample_value``) folds the waiting observations first, and sees all of them."""

    def __init__(self, fold: Callable[[], None]) -> None:
        self._fold = fold

    def collect(self) -> list[Metric]:
        self._fold()
        return []


class Metrics:
    """The service's collectors, registered on their own registry (no global state).

    Observations wait up to ``FOLD_S`` before they reach their collectors, and are folded
    in together (``gather.Gathered``): a scrape, or anything else reading the registry,
    folds first, so it sees every request answered before it. In multiprocess mode another
    worker's file lags its requests by ``FOLD_S`` at most.
    """

    #: Seconds an observation may wait for its collector.
    FOLD_S = 0.05

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Multiprocess mode, read once: the live gauges, the scrape and the shutdown agree.
        self._shared = bool(os.environ.get(MULTIPROC_DIR))
        self._live: dict[str, LiveCount] = {}
        # Observations wait here for the next fold (``add``), each as its collector's update.
        self._updates: dict[tuple[int, tuple[str, ...]], Callable[[float], None]] = {}
        self._later: Gathered[tuple[Callable[[float], None], float]] = Gathered(_apply, self.FOLD_S)
        self.registry.register(_FoldFirst(self.fold))  # first: it runs before the others
        # gRPC calls count here too (protocol "grpc": gRPC rides HTTP/2), with the full
        # method as endpoint and the status code's name as status.
        labels = ("protocol", "method", "endpoint", "model", "status")
        self.requests = Counter(
            "dropout_http_requests",
            "Requests answered, HTTP and gRPC.",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "dropout_http_request_duration_seconds",
            "Time from request to the end of the response.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = LiveCount(
            Gauge(
                "dropout_http_requests_in_flight",
                "Requests being handled.",
                registry=self.registry,
                multiprocess_mode="livesum",
            ),
            self._shared,
        )
        # A gauge of 1 per model rather than an Info, which multiprocess mode cannot carry.
        self.model_info = Gauge(
            "dropout_model_info",
            "Models served: 1 per name, version, sha256 and task.",
            ("name", "version", "sha256", "task"),
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        # The data plane's: labelled by model and kind ("eval" or "mc"), whichever protocol asked.
        self.queue_wait = Histogram(
            "dropout_inference_queue_wait_seconds",
            "Time from admission to the start of the forward pass that served the request.",
            ("model", "kind"),
            buckets=COMPUTE_BUCKETS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "dropout_inference_compute_seconds",
            "Duration of one forward job: an eval batch or one MC request.",
            ("model", "kind"),
            buckets=COMPUTE_BUCKETS,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "dropout_batch_requests",
            "Eval requests coalesced into one batch.",
            ("model",),
            buckets=BATCH_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "dropout_batch_rows",
            "Input rows in one eval batch, before padding to whole blocks.",
            ("model",),
            buckets=BATCH_ROW_BUCKETS,
            registry=self.registry,
        )
        self.mc_samples = Histogram(
            "dropout_mc_samples",
            "Monte-Carlo passes (T) per MC request.",
            ("model",),
            buckets=MC_SAMPLE_BUCKETS,
            registry=self.registry,
        )
        # What the models answer, not how fast: a drift in what clients send shows here.
        self.mc_std = Histogram(
            "dropout_mc_std",
            "Regression: the MC std served, per row and output (the model's own units).",
            ("model",),
            buckets=STD_BUCKETS,
            registry=self.registry,
        )
        self.mc_mutual_information = Histogram(
            "dropout_mc_mutual_information",
            "Classification: the mutual information (nats) served, per row.",
            ("model",),
            buckets=MI_BUCKETS,
            registry=self.registry,
        )
        self.ood_score = Histogram(
            "dropout_ood_score",
            "Calibrated models: the out-of-distribution score served per row (over 1: flagged).",
            ("model",),
            buckets=OOD_SCORE_BUCKETS,
            registry=self.registry,
        )
        self.pending = Gauge(
            "dropout_inference_pending_requests",
            "Requests admitted for a model and not yet answered (queued or computing).",
            ("model",),
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "dropout_inference_rejected_requests",
            "Requests refused by admission control (overloaded) or past their deadline.",
            ("model", "reason"),
            registry=self.registry,
        )
        self.torch_threads = Gauge(
            "dropout_torch_threads",
            "Threads over which one MC request of a worker spreads its tiles.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    def exposition(self) -> bytes:
        """The Prometheus text of this app, or of every worker in multiprocess mode."""
        if self._shared:
            self.fold()  # this worker's file: the others fold on their own
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def close(self) -> None:
        """At a worker's shutdown: its last observations are folded in, and its live gauges
        leave the sums of the other workers."""
        self.fold()
        if self._shared:
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def pending_count(self, model: str) -> LiveCount:
        """Requests admitted for ``model`` and not yet answered (a ``LiveCount``)."""
        live = self._live.get(model)
        if live is None:
            live = self._live[model] = LiveCount(self.pending.labels(model), self._shared)
        return live

    def add(self, metric: Counter | Histogram, labels: tuple[str, ...], value: float = 1) -> None:
        """Count ``value`` (a Counter) or observe it (a Histogram) under ``labels``, at the
        next fold: within ``FOLD_S``, and before anything reads the registry."""
        key = (id(metric), labels)
        update = self._updates.get(key)
        if update is None:  # ``labels`` costs several times the update: label sets here are
            child = metric.labels(*labels)  # bounded (routes, models, statuses), so memoised
            update = child.inc if isinstance(child, Counter) else child.observe
            self._updates[key] = update
        self._later.add((update, value))

    def fold(self) -> None:
        """Hand every observation made so far to its collector."""
        self._later.flush()

    def observe_request(
        self, protocol: str, method: str, endpoint: str, model: str, status: str, seconds: float
    ) -> None:
        """Count and time one answered request by protocol ("http" or "grpc"), method,
        endpoint template (gRPC: the full method), model (a served model's name, else "")
        and status (gRPC: the code's name)."""
        labels = (protocol, method, endpoint, model, status)
        self.add(self.requests, labels)
        self.add(self.latency, labels, seconds)

    def observe_mc(
        self, config: ModelConfig, n_samples: int, compute_s: float, outputs: dict[str, Tensor]
    ) -> None:
        """One MC answer: its passes, its compute time, and per row the spread it served
        (std or mutual information) and its out-of-distribution score."""
        name = (config.name,)
        self.add(self.mc_samples, name, n_samples)
        self.add(self.compute, (config.name, "mc"), compute_s)
        if config.task == "regression":
            spread, values = self.mc_std, outputs["std"]
        else:
            spread, values = self.mc_mutual_information, outputs["mutual_information"]
        for v in values.reshape(-1).tolist():
            self.add(spread, name, v)
        scores = outputs.get("ood_score")
        if scores is not None:
            for v in scores.tolist():
                self.add(self.ood_score, name, v)

    def observe_batch(self, model: str, requests: int, rows: int, compute_s: float) -> None:
        self.add(self.batch_requests, (model,), requests)
        self.add(self.batch_rows, (model,), rows)
        self.add(self.compute, (model, "eval"), compute_s)
