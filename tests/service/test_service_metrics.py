"""/metrics: valid Prometheus text with histograms, counts that match what was sent, low-cardinality
labels, and the same totals from any worker when `edgecase serve --workers 2` runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from service_helpers import RunningServer, publish_model, running_server, solid_png

HISTOGRAMS = {
    "edgecase_http_request_duration_seconds",
    "edgecase_queue_wait_seconds",
    "edgecase_inference_duration_seconds",
    "edgecase_batch_size_frames",
    "edgecase_score_p_value",
    "edgecase_score_threshold_ratio",
}


def parse(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """family name -> (type, samples); raises if the exposition is not valid Prometheus text."""
    return {f.name: (f.type, list(f.samples)) for f in text_string_to_metric_families(text)}


def value(families: dict[str, tuple[str, list[Sample]]], family: str, sample: str, **labels: str) -> float:
    return sum(
        s.value
        for s in families.get(family, ("", []))[1]
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def post_until_warm(url: str, png: bytes, timeout: float = 60.0) -> httpx.Response:
    """POST a frame, retrying while a worker answers 503: /readyz came from one worker, and the other
    may still be loading its model, which is what a 503 means and what a client should retry."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(url, content=png, headers={"Content-Type": "image/png"})
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    root = tmp_path_factory.mktemp("metrics")
    publish_model(root / "models", "bright", 1)
    with running_server(root / "models", log_dir=root) as server, server.client() as client:
        for value_ in (10, 200, 250):  # two edge cases
            client.post("/score", content=solid_png(value_), headers={"Content-Type": "image/png"})
        client.post("/score", files=[("files", (f"{i}.png", solid_png(i))) for i in range(4)])
        client.post("/score", content=b"junk", headers={"Content-Type": "image/png"})
        client.get("/flagged/12345/image")
        yield server, client.get("/metrics").text


def test_the_exposition_parses_and_has_histograms_not_just_counters(
    scraped: tuple[RunningServer, str],
) -> None:
    families = parse(scraped[1])
    for name in HISTOGRAMS:
        assert families[name][0] == "histogram", name
    assert families["edgecase_queue_depth_frames"][0] == "gauge"
    assert families["edgecase_model_info"][0] == "gauge"


def test_frames_scored_and_flagged_are_counted_by_model_and_version(
    scraped: tuple[RunningServer, str],
) -> None:
    families = parse(scraped[1])
    labels = {"model": "bright", "version": "1"}
    assert value(families, "edgecase_frames_scored", "edgecase_frames_scored_total", **labels) == 7
    assert value(families, "edgecase_frames_flagged", "edgecase_frames_flagged_total", **labels) == 2
    assert value(families, "edgecase_score_p_value", "edgecase_score_p_value_count", **labels) == 7
    assert value(families, "edgecase_batch_size_frames", "edgecase_batch_size_frames_sum", **labels) == 7


def test_requests_are_counted_by_route_template_and_status(scraped: tuple[RunningServer, str]) -> None:
    families = parse(scraped[1])
    name = "edgecase_http_requests_total"
    assert value(families, "edgecase_http_requests", name, route="/score", status="200") == 4
    assert value(families, "edgecase_http_requests", name, route="/score", status="422") == 1
    # The template, not /flagged/12345/image: one series per route however many ids are asked for.
    assert (
        value(families, "edgecase_http_requests", name, route="/flagged/{flag_id}/image", status="404") == 1
    )
    routes = {s.labels["route"] for s in families["edgecase_http_requests"][1]}
    assert not any(r.startswith("/flagged/1") for r in routes)
    latency = "edgecase_http_request_duration_seconds_count"
    assert value(families, "edgecase_http_request_duration_seconds", latency, route="/score") == 5


def test_the_model_info_metric_names_version_head_units_and_provider(
    scraped: tuple[RunningServer, str],
) -> None:
    families = parse(scraped[1])
    info = {
        "model": "bright",
        "version": "1",
        "head": "brightness",
        "units": "fraction",
        "provider": "CPUExecutionProvider",
    }
    assert value(families, "edgecase_model_info", "edgecase_model_info", **info) == 1
    assert value(families, "edgecase_model_threshold_score", "edgecase_model_threshold_score") == 0.5
    assert value(families, "edgecase_model_target_fpr", "edgecase_model_target_fpr") == 0.05  # its manifest


def test_two_workers_report_the_same_merged_totals(tmp_path: Path) -> None:
    publish_model(tmp_path / "models", "bright", 1)
    shared = tmp_path / "prometheus"
    shared.mkdir()
    (shared / "counter_999999.db").write_bytes(b"stale file from an earlier run")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(shared)}
    with running_server(tmp_path / "models", workers=2, log_dir=tmp_path, timeout=90, env=env) as server:
        for i in range(12):
            # A fresh connection each time, so the kernel spreads requests over both workers.
            response = post_until_warm(f"{server.url}/score", solid_png(i))
            assert response.status_code == 200, response.text
        totals = []
        for _ in range(8):
            families = parse(httpx.get(f"{server.url}/metrics", timeout=10).text)
            totals.append(value(families, "edgecase_frames_scored", "edgecase_frames_scored_total"))
            assert families["edgecase_batch_size_frames"][0] == "histogram"
        assert totals == [12.0] * 8, totals
        info = value(families, "edgecase_model_info", "edgecase_model_info", model="bright", version="1")
        assert info == 1  # livemax: 1 while any live worker serves it, not 2
        assert not (shared / "counter_999999.db").exists(), "serve empties the folder at start"
        pids = {path.stem.rsplit("_", 1)[-1] for path in shared.glob("gauge_livemax_*.db")}
        assert len(pids) == 2, f"expected two workers to have loaded the model: {sorted(shared.iterdir())}"
