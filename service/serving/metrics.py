"""Prometheus metrics: one registry per app; the front doors count their requests here.

With several worker processes (``serve --workers N``) each worker writes its values to files
in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, set up by the
command line before the workers start) and every scrape, whichever worker answers it, adds
up all of them.
"""

from __future__ import annotations

import os
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from torch import Tensor

from service.core.model import ModelConfig

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

M = TypeVar("M", bound=MetricWrapperBase)

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


class Metrics:
    """The service's collectors, registered on their own registry (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Multiprocess mode, read once: the live gauges, the scrape and the shutdown agree.
        self._shared = bool(os.environ.get(MULTIPROC_DIR))
        self._live: dict[str, LiveCount] = {}
        self._children: dict[tuple[int, tuple[str, ...]], object] = {}
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
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def close(self) -> None:
        """At a worker's shutdown: its live gauges leave the sums of the other workers."""
        if self._shared:
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def pending_count(self, model: str) -> LiveCount:
        """Requests admitted for ``model`` and not yet answered (a ``LiveCount``)."""
        live = self._live.get(model)
        if live is None:
            live = self._live[model] = LiveCount(self.pending.labels(model), self._shared)
        return live

    def child(self, metric: M, *values: str) -> M:
        """``metric.labels(*values)``, memoised: label sets here are bounded (route templates,
        served models, statuses), and ``labels`` costs several times the update itself."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child  # type: ignore[return-value]

    def observe_request(
        self, protocol: str, method: str, endpoint: str, model: str, status: str, seconds: float
    ) -> None:
        """Count and time one answered request by protocol ("http" or "grpc"), method,
        endpoint template (gRPC: the full method), model (a served model's name, else "")
        and status (gRPC: the code's name)."""
        labels = (protocol, method, endpoint, model, status)
        self.child(self.requests, *labels).inc()
        self.child(self.latency, *labels).observe(seconds)

    def observe_mc(
        self, config: ModelConfig, n_samples: int, compute_s: float, outputs: dict[str, Tensor]
    ) -> None:
        """One MC answer: its passes, its compute time, and per row the spread it served
        (std or mutual information) and its out-of-distribution score."""
        name = config.name
        self.child(self.mc_samples, name).observe(n_samples)
        self.child(self.compute, name, "mc").observe(compute_s)
        if config.task == "regression":
            spread = self.child(self.mc_std, name)
            values = outputs["std"]
        else:
            spread = self.child(self.mc_mutual_information, name)
            values = outputs["mutual_information"]
        for v in values.reshape(-1).tolist():
            spread.observe(v)
        scores = outputs.get("ood_score")
        if scores is not None:
            ood = self.child(self.ood_score, name)
            for v in scores.tolist():
                ood.observe(v)

    def observe_batch(self, model: str, requests: int, rows: int, compute_s: float) -> None:
        self.child(self.batch_requests, model).observe(requests)
        self.child(self.batch_rows, model).observe(rows)
        self.child(self.compute, model, "eval").observe(compute_s)
