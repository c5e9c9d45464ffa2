"""Push a finished batch run's totals to a Prometheus Pushgateway, so batch runs show on the dashboard.

A batch run (`edgecase score`) ends before any Prometheus could scrape it, so it pushes its totals once,
at the end, to a Pushgateway that Prometheus scrapes with ``honor_labels: true`` (deploy/prometheus).
This is the Pushgateway's one intended use, a service-level batch job
(https://prometheus.io/docs/practices/pushing/): the grouping key is the job (``edgecase_score``), the
model and the version, not the machine or the run, so the Pushgateway keeps one group per model version
instead of growing forever. Concurrent runs of one model version on several machines can keep apart by
passing a stable ``instance`` (e.g. the data set's name; never a per-run id).

The push is a POST (``pushadd_to_gateway``), which replaces only the metrics it sends: a failed run
updates frames, edge cases, errors, duration and the last-failure time but leaves the last-success time
of the run before it, so "time since last success" keeps growing until a run succeeds.

A push that fails raises ``PushError`` with the URL and the reason. The caller has already written its
results; ``edgecase score`` prints the message and exits non-zero (the run's output stays valid).
"""

from __future__ import annotations

import time
import urllib.error
from collections.abc import Mapping
from typing import Any

from prometheus_client import pushadd_to_gateway

from service.metrics import BatchMetrics

DEFAULT_JOB = "edgecase_score"
SUMMARY_FIELDS = ("model", "version", "frames", "edge_cases", "errors", "seconds")


class PushError(RuntimeError):
    """The Pushgateway could not be reached or refused the push; the message says which and why."""


def push_run(
    url: str,
    summary: Mapping[str, Any],
    *,
    job: str = DEFAULT_JOB,
    timeout_s: float = 10.0,
    succeeded: bool = True,
    instance: str | None = None,
) -> None:
    """Push one run's frames, edge cases, errors, duration, target FPR and its success (or failure) time.

    ``summary`` is the run's ``_summary.json`` content (at least model, version, frames, edge_cases,
    errors, seconds; target_fpr when known). ``succeeded`` is False for a run that exits non-zero: its
    totals are pushed and its end goes to the last-failure gauge instead of the last-success one.
    Raises ``ValueError`` for a summary without those fields and ``PushError`` when the push fails.
    """
    missing = [name for name in SUMMARY_FIELDS if summary.get(name) is None]
    if missing:
        raise ValueError(f"run summary lacks {', '.join(missing)}: nothing to push")
    metrics = BatchMetrics()
    metrics.frames.set(float(summary["frames"]))
    metrics.edge_cases.set(float(summary["edge_cases"]))
    metrics.errors.set(float(summary["errors"]))
    metrics.duration.set(float(summary["seconds"]))
    if summary.get("target_fpr") is not None:
        metrics.target_fpr.set(float(summary["target_fpr"]))
    else:  # unknown: better no series than a made-up 0
        metrics.registry.unregister(metrics.target_fpr)
    (metrics.last_success if succeeded else metrics.last_failure).set(time.time())
    # The gauge of the other outcome is not sent, so the gateway keeps the value it had.
    metrics.registry.unregister(metrics.last_failure if succeeded else metrics.last_success)
    grouping = {"model": str(summary["model"]), "version": str(summary["version"])}
    if instance:
        grouping["instance"] = instance
    try:
        pushadd_to_gateway(url, job=job, registry=metrics.registry, grouping_key=grouping, timeout=timeout_s)
    except urllib.error.HTTPError as exc:  # the gateway answered, and said no (e.g. inconsistent metrics)
        body = exc.read().decode("utf-8", "replace").strip()
        raise PushError(f"Pushgateway {url} refused the push: HTTP {exc.code} {body or exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise PushError(f"cannot reach the Pushgateway at {url}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
        raise PushError(f"cannot push to the Pushgateway at {url}: {exc}") from exc
