"""Every Prometheus metric the service exports, named `edgecase_<what>_<unit>`, in one place.

`Metrics` is built in the app's lifespan (never at import) on its own `CollectorRegistry`, so several
apps in one test process do not collide. With several worker processes, `edgecase serve` sets
`PROMETHEUS_MULTIPROC_DIR` before any worker imports prometheus_client; each worker then writes its
values to files there and `/metrics` merges all of them (`MultiProcessCollector`), so any worker answers
for the whole server. Gauges declare how they merge (`multiprocess_mode`).

Labels stay low-cardinality: route templates (not raw paths), model name and version, status code.
The score distribution is exported as conformal p-values (`edgecase_score_p_value`): for frames
exchangeable with the calibration normals they are (super-)uniform on [0, 1] whatever the model's score
units (Vovk, Gammerman & Shafer, "Algorithmic Learning in a Random World", 2005; Bates et al., "Testing
for outliers with conformal p-values", Ann. Statist. 2023), so drift shows as mass piling up near 0 on
one shared set of buckets. The raw score is exported too, in multiples of the
model's threshold (`edgecase_score_threshold_ratio`, 1.0 = the edge-case line).

Batch runs (`edgecase score --pushgateway URL`) do not serve /metrics: they push `BatchMetrics` to a
Prometheus Pushgateway once, at the end of the run (`service/batch_push.py`), and Prometheus scrapes it.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
P_VALUE_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)

# Batch runs (`edgecase score`), pushed to the Pushgateway with grouping labels job, model, version.
# `batch_run`, not `batch`: `edgecase_batch_size_frames` above is the service's dynamic batching.
BATCH_FRAMES = "edgecase_batch_run_frames"
BATCH_EDGE_CASES = "edgecase_batch_run_edge_cases"
BATCH_ERRORS = "edgecase_batch_run_errors"
BATCH_TARGET_FPR = "edgecase_batch_run_target_fpr"
BATCH_DURATION = "edgecase_batch_run_duration_seconds"
BATCH_LAST_SUCCESS = "edgecase_batch_run_last_success_timestamp_seconds"
BATCH_LAST_FAILURE = "edgecase_batch_run_last_failure_timestamp_seconds"


def multiprocess_dir() -> Path | None:
    """The shared metrics folder when running with several workers, else None."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


class Metrics:
    """The service's metrics, registered on one registry (pass your own in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgecase_http_requests_total",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "edgecase_http_request_duration_seconds",
            "Time from request start to response end, by route template and method",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "edgecase_queue_wait_seconds",
            "Time a request's frames wait in the batcher queue before their batch starts",
            ["model", "version"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "edgecase_inference_duration_seconds",
            "Time of one session.run on a batch",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "edgecase_batch_size_frames",
            "Frames per session.run (dynamic batching coalesces concurrent requests)",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "edgecase_queue_depth_frames",
            "Frames waiting in the batcher queue (summed over live workers)",
            ["model", "version"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.frames_scored = Counter(
            "edgecase_frames_scored_total",
            "Frames scored",
            ["model", "version"],
            registry=r,
        )
        self.frames_flagged = Counter(
            "edgecase_frames_flagged_total",
            "Frames at or above the threshold, written to the flagged store",
            ["model", "version"],
            registry=r,
        )
        self.p_value = Histogram(
            "edgecase_score_p_value",
            "Conformal p-value of each frame's score against the calibration normals (uniform when no drift)",
            ["model", "version"],
            buckets=P_VALUE_BUCKETS,
            registry=r,
        )
        self.threshold_ratio = Histogram(
            "edgecase_score_threshold_ratio",
            "Score divided by the model's threshold (1.0 = edge case line; only for positive thresholds)",
            ["model", "version"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "edgecase_model_info",
            "1 for each model version serving, with its head, units and execution provider",
            ["model", "version", "head", "units", "provider"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.model_threshold = Gauge(
            "edgecase_model_threshold_score",
            "Threshold of each serving model version, in its score units",
            ["model", "version"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.model_target_fpr = Gauge(
            "edgecase_model_target_fpr",
            "Target false-positive rate each serving model version was calibrated at (its manifest's)",
            ["model", "version"],
            multiprocess_mode="livemax",
            registry=r,
        )
        # The flagged store's size: every worker (and replica) measures the one shared store, so the
        # most recent measurement is the value (take max() across replicas in queries).
        self.flagged_store_frames = Gauge(
            "edgecase_flagged_store_frames",
            "Flags held by the flagged store (what retention's flagged_max_frames bounds)",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.flagged_store_bytes = Gauge(
            "edgecase_flagged_store_bytes",
            "Image bytes held by the flagged store (what retention's flagged_max_bytes bounds)",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.flagged_pruned = Counter(
            "edgecase_flagged_pruned_total",
            "Flags deleted by the flagged store's retention (oldest unreviewed first)",
            registry=r,
        )
        self.model_loads = Counter(
            "edgecase_model_loads_total",
            "Model version loads by outcome: loaded (now serving) or refused (kept the old one)",
            ["model", "outcome"],
            registry=r,
        )

    def exposition(self) -> bytes:
        """The text format for /metrics: this process's registry, or every worker's in multiprocess mode."""
        if multiprocess_dir() is not None:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)


class BatchMetrics:
    """One batch run's gauges, on a fresh registry that is pushed once (no process ever serves them)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.frames = Gauge(BATCH_FRAMES, "Frames the last batch run read (scored or failed)", registry=r)
        self.edge_cases = Gauge(
            BATCH_EDGE_CASES,
            "Frames the last batch run flagged as edge cases (score > threshold)",
            registry=r,
        )
        self.errors = Gauge(
            BATCH_ERRORS,
            "Failures in the last batch run: frames that did not score, unreadable shards",
            registry=r,
        )
        self.target_fpr = Gauge(
            BATCH_TARGET_FPR,
            "Target false-positive rate of the model version the last batch run used",
            registry=r,
        )
        self.duration = Gauge(BATCH_DURATION, "Wall-clock seconds of the last batch run", registry=r)
        self.last_success = Gauge(
            BATCH_LAST_SUCCESS, "Unix time the last successful batch run ended", registry=r
        )
        self.last_failure = Gauge(BATCH_LAST_FAILURE, "Unix time the last failed batch run ended", registry=r)


def mark_process_dead(pid: int | None = None) -> None:
    """Drop this worker's live gauges from the merged view when it exits (multiprocess mode only)."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid if pid is not None else os.getpid())  # type: ignore[no-untyped-call]
