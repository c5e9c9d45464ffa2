"""A batch run's totals reach a real Prometheus Pushgateway and read back as pushed (service/batch_push.py).

The Pushgateway is Debian's `prometheus-pushgateway` (scripts/install-test-tools installs it), started
on a free loopback port for this module and always stopped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import REPO_ROOT, free_port, wait_until

from service import metrics as names
from service.batch_push import PushError, push_run

SUMMARY = {
    "model": "bright",
    "version": 3,
    "head": "brightness",
    "threshold": 0.5,
    "target_fpr": 0.05,
    "frames": 1200,
    "edge_cases": 17,
    "errors": 2,
    "seconds": 41.5,
    "shards": [],
    "failures": [],
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        pytest.skip(
            "prometheus-pushgateway is not installed (Debian: apt-get install -y prometheus-pushgateway)"
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("pushgateway") / "pushgateway.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT
        )
        try:

            def ready() -> bool:
                try:
                    return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return process.poll() is not None

            assert wait_until(ready, timeout=30) and process.poll() is None, log_path.read_text()
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


def pushed(url: str, metric: str, **labels: str) -> float | None:
    """The value of `metric` in the group with these grouping labels, read from the gateway's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_a_run_pushes_its_totals_and_its_success_time(gateway: str) -> None:
    before = time.time()
    push_run(gateway, SUMMARY)
    group = {"job": "edgecase_score", "model": "bright", "version": "3"}
    assert pushed(gateway, names.BATCH_FRAMES, **group) == 1200
    assert pushed(gateway, names.BATCH_EDGE_CASES, **group) == 17
    assert pushed(gateway, names.BATCH_ERRORS, **group) == 2
    assert pushed(gateway, names.BATCH_DURATION, **group) == 41.5
    assert pushed(gateway, names.BATCH_TARGET_FPR, **group) == 0.05
    success = pushed(gateway, names.BATCH_LAST_SUCCESS, **group)
    assert success is not None and before - 1 <= success <= time.time() + 1
    assert pushed(gateway, names.BATCH_LAST_FAILURE, **group) is None


def test_a_failed_run_keeps_the_last_success_time(gateway: str) -> None:
    summary = {**SUMMARY, "model": "failing", "version": 1}
    push_run(gateway, summary)
    group = {"job": "edgecase_score", "model": "failing", "version": "1"}
    success = pushed(gateway, names.BATCH_LAST_SUCCESS, **group)
    push_run(gateway, {**summary, "frames": 10, "errors": 9, "seconds": 2.0}, succeeded=False)
    assert pushed(gateway, names.BATCH_LAST_SUCCESS, **group) == success
    failure = pushed(gateway, names.BATCH_LAST_FAILURE, **group)
    assert failure is not None and success is not None and failure >= success
    assert pushed(gateway, names.BATCH_FRAMES, **group) == 10
    assert pushed(gateway, names.BATCH_ERRORS, **group) == 9


def test_an_instance_label_keeps_concurrent_runs_apart(gateway: str) -> None:
    push_run(gateway, {**SUMMARY, "model": "split", "frames": 5}, instance="cars-a")
    push_run(gateway, {**SUMMARY, "model": "split", "frames": 7}, instance="cars-b")
    assert pushed(gateway, names.BATCH_FRAMES, model="split", instance="cars-a") == 5
    assert pushed(gateway, names.BATCH_FRAMES, model="split", instance="cars-b") == 7


def scoring_run(tmp_path, values: list[int]) -> list[str]:
    """A published brightness model and one tar shard of solid frames: ``edgecase score`` arguments."""
    from service_helpers import publish_model

    from contract.writers import open_writer

    publish_model(tmp_path / "models", "pushed-cli", 2, size=8, threshold=0.5)
    with open_writer(tmp_path / "data", "tar", "test") as writer:
        for i, value in enumerate(values):
            writer.write(f"test/x/x_{i:06d}", np.full((8, 8, 3), value, dtype=np.uint8), {})
    return [
        "score", "--repo", str(tmp_path / "models"), "--model", "pushed-cli", "--data",
        str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--no-progress",
    ]  # fmt: skip


def test_edgecase_score_pushes_the_totals_of_its_summary(gateway: str, tmp_path) -> None:
    from edgecase.cli import main

    args = scoring_run(tmp_path, [10, 200, 250])
    assert main([*args, "--pushgateway", gateway]) == 0
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    group = {"job": "edgecase_score", "model": "pushed-cli", "version": "2"}
    assert pushed(gateway, names.BATCH_FRAMES, **group) == summary["frames"] == 3
    assert pushed(gateway, names.BATCH_EDGE_CASES, **group) == summary["edge_cases"] == 2
    assert pushed(gateway, names.BATCH_LAST_SUCCESS, **group) is not None


def test_edgecase_score_exits_1_when_the_push_fails_and_keeps_its_output(tmp_path, capsys) -> None:
    from edgecase.cli import main

    args = scoring_run(tmp_path, [10, 200])
    assert main([*args, "--pushgateway", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "could not push" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["exit_status"] == 0


def test_an_unreachable_gateway_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(PushError, match=f"cannot reach the Pushgateway at {url}"):
        push_run(url, SUMMARY, timeout_s=5)
    assert time.monotonic() - started < 10


def test_a_gateway_that_says_no_is_a_clear_error(gateway: str) -> None:
    # A URL with a wrong path prefix (e.g. behind a proxy): the gateway answers, with 404.
    with pytest.raises(PushError, match=r"refused the push: HTTP 404"):
        push_run(f"{gateway}/not-a-gateway-path", SUMMARY)


def test_a_summary_without_totals_is_refused_before_any_push() -> None:
    with pytest.raises(ValueError, match="lacks frames, seconds"):
        push_run("http://127.0.0.1:1", {k: v for k, v in SUMMARY.items() if k not in ("frames", "seconds")})


def test_the_pushed_names_follow_the_house_naming_rule() -> None:
    pushed_names = [
        names.BATCH_FRAMES,
        names.BATCH_EDGE_CASES,
        names.BATCH_ERRORS,
        names.BATCH_DURATION,
        names.BATCH_TARGET_FPR,
        names.BATCH_LAST_SUCCESS,
        names.BATCH_LAST_FAILURE,
    ]
    assert all(name.startswith("edgecase_batch_run_") for name in pushed_names)
    assert {f.name for f in names.BatchMetrics().registry.collect()} == set(pushed_names)


def test_the_stack_runs_a_pinned_pushgateway_that_prometheus_scrapes_with_honor_labels() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    image = compose["services"]["pushgateway"]["image"]
    assert re.fullmatch(r"prom/pushgateway:v\d+\.\d+\.\d+", image), image
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pushgateway"]
    # Without honor_labels the pushed job label would become exported_job and the dashboard finds nothing.
    assert job["honor_labels"] is True
    assert job["static_configs"][0]["targets"] == ["pushgateway:9091"]


def test_the_dashboard_has_a_batch_row_with_every_pushed_total() -> None:
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "dashboards" / "edgecase.json").read_text())
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert any("batch runs" in row["title"].lower() for row in rows)
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for name in (names.BATCH_FRAMES, names.BATCH_EDGE_CASES, names.BATCH_ERRORS, names.BATCH_DURATION):
        assert name in exprs, name
    assert f"time() - {names.BATCH_LAST_SUCCESS}" in exprs


@pytest.mark.slow
def test_prometheus_scrapes_the_pushed_run_and_the_dashboard_queries_answer(
    gateway: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install -y prometheus)")
    push_run(gateway, {**SUMMARY, "model": "scraped", "version": 2})
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pushgateway"]
    job.update(scrape_interval="1s", static_configs=[{"targets": [gateway.removeprefix("http://")]}])
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [job]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(tmp / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:

            def query(expr: str) -> list[dict]:
                try:
                    answer = httpx.get(
                        f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=2
                    )
                    return answer.json()["data"]["result"] if answer.status_code == 200 else []
                except httpx.HTTPError:
                    return []

            assert wait_until(
                lambda: bool(query('edgecase_batch_run_frames{model="scraped"}')), timeout=60
            ), (tmp / "prometheus.log").read_text()
            (frames,) = query('edgecase_batch_run_frames{model="scraped"}')
            # honor_labels: the pushed job survives (not renamed exported_job), next to model and version.
            assert frames["metric"]["job"] == "edgecase_score" and frames["metric"]["version"] == "2"
            dashboard = json.loads(
                (REPO_ROOT / "deploy" / "grafana" / "dashboards" / "edgecase.json").read_text()
            )
            batch = [
                t["expr"]
                for p in dashboard["panels"]
                for t in p.get("targets", [])
                if "edgecase_batch_run_" in t["expr"]
            ]
            answers = {e: query(e.replace("$model", "scraped")) for e in batch}
            assert all(answers.values()), {e: a for e, a in answers.items() if not a}
            (rate,) = answers[
                'edgecase_batch_run_edge_cases{model=~"$model"} / edgecase_batch_run_frames{model=~"$model"}'
            ]
            assert float(rate["value"][1]) == pytest.approx(17 / 1200)
        finally:
            process.terminate()
            process.wait(timeout=30)
