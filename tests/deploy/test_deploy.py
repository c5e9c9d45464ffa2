"""Deployment files: Prometheus config and rules are valid and unit-tested, every metric they or the Grafana
dashboard use exists in service/metrics.py, docker-compose.yml validates, and a real Prometheus scrapes a
real server (slow).

promtool and docker-compose are Debian packages (`apt-get install prometheus docker-compose`); tests that
need one skip with that reason when it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from service_helpers import REPO_ROOT, free_port, publish_model, running_server, solid_png, wait_until

from service.metrics import BatchMetrics, Metrics

DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "edgecase.json"
RULE_FILES = [PROMETHEUS_DIR / "rules.yml", PROMETHEUS_DIR / "alerts.yml"]
METRIC_NAME = re.compile(r"\bedgecase_[a-z0-9_]+")
RECORDED_NAME = re.compile(r"\bedgecase:[a-z0-9_:]+")


def needs(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(
            f"{tool} is not installed (Debian: apt-get install -y {'prometheus' if 'prom' in tool else tool})"
        )
    return path


def exported_series() -> set[str]:
    """Every series service/metrics.py exports or pushes (histograms _bucket/_sum/_count, counters _total)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    names: set[str] = set()
    families = [*Metrics().registry.collect(), *BatchMetrics().registry.collect()]
    for family in families:
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def rule_exprs() -> list[str]:
    exprs = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            exprs += [rule["expr"] for rule in group["rules"]]
    return exprs


def recorded_names() -> set[str]:
    names = set()
    for group in yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())["groups"]:
        names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [var["definition"] for var in dashboard["templating"]["list"]]
    return exprs


def test_the_metric_set_has_what_the_dashboard_and_alerts_need() -> None:
    assert {
        "edgecase_http_requests_total",
        "edgecase_http_request_duration_seconds_bucket",
        "edgecase_queue_wait_seconds_bucket",
        "edgecase_inference_duration_seconds_bucket",
        "edgecase_batch_size_frames_bucket",
        "edgecase_queue_depth_frames",
        "edgecase_frames_scored_total",
        "edgecase_frames_flagged_total",
        "edgecase_score_p_value_bucket",
    } <= exported_series()


@pytest.mark.parametrize("source", ["alerts and rules", "dashboard"])
def test_every_metric_referenced_exists_in_service_metrics(source: str) -> None:
    exprs = rule_exprs() if source == "alerts and rules" else dashboard_exprs()
    assert exprs
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    unknown = used - exported_series()
    assert not unknown, f"{source} use metrics that service/metrics.py does not export: {sorted(unknown)}"
    recorded = {name for expr in exprs for name in RECORDED_NAME.findall(expr)}
    assert recorded <= recorded_names(), f"undefined recording rules: {sorted(recorded - recorded_names())}"


def test_the_alerts_cover_the_operational_failure_modes() -> None:
    alerts = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    assert {
        "EdgecaseServiceDown",
        "EdgecaseHigh5xxRate",
        "EdgecaseHigh4xxRate",
        "EdgecaseScoreLatencyP99High",
        "EdgecaseQueueNearFull",
        "EdgecaseLoadShedding",
        "EdgecaseFlagRateDrift",
        "EdgecaseScoreDistributionShift",
    } <= alerts


def test_the_dashboard_is_valid_and_has_the_operator_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for needed in ("request rate by status", "latency p50 / p99", "queue wait vs inference", "batch size",
                   "queue depth", "scored and flagged", "flag rate vs", "score distribution"):  # fmt: skip
        assert needed in titles, f"no panel for {needed!r}"
    assert any(p["type"] == "heatmap" for p in panels)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
        assert all(t["expr"].strip() and t["datasource"]["uid"] == uid for t in panel["targets"])


def test_compose_mounts_models_and_the_flagged_store_and_the_deploy_configs() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"edgecase", "prometheus", "grafana"}
    service = services["edgecase"]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "./models:/models:ro" in service["volumes"]
    flagged_dir = service["environment"]["EDGECASE_FLAGGED_DIR"]
    assert any(v.endswith(f":{flagged_dir}") for v in service["volumes"])
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["edgecase:8000"]


def test_the_kubernetes_manifest_probes_real_routes_and_keeps_one_store_writer() -> None:
    from service.app import create_app
    from service.settings import Settings

    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / "base" / "edgecase.yaml").read_text())}
    deployment = docs["Deployment"]["spec"]
    # SQLite is safe across one pod's workers, not across pods: one replica, never two at once.
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    (container,) = deployment["template"]["spec"]["containers"]
    routes = set(create_app(Settings()).openapi()["paths"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in routes
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in routes
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/models", "/data/flagged"}


def test_the_serving_images_never_install_torch() -> None:
    cpu = (DEPLOY / "Dockerfile").read_text()
    gpu = (DEPLOY / "Dockerfile.gpu").read_text()
    assert "FROM python:3.11-slim" in cpu and "'.[serve,cpu,store]'" in cpu
    assert "nvidia/cuda" in gpu and "'.[serve,gpu,store]'" in gpu
    for text in (cpu, gpu):
        install_lines = [line for line in text.splitlines() if "pip install" in line]
        assert not any("torch" in line or "train" in line for line in install_lines)
    assert "torch==2.13.0" in (DEPLOY / "Dockerfile.train").read_text()


def test_promtool_accepts_the_config_and_the_rules() -> None:
    promtool = needs("promtool")
    for args in (
        ["check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        ["check", "rules", *map(str, RULE_FILES)],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, parses (checked by promtool as a rule)."""
    promtool = needs("promtool")
    grafana_vars = {"$__rate_interval": "1m", "$model": ".*"}
    rules = []
    for i, expr in enumerate(e for e in dashboard_exprs() if not e.startswith("label_values(")):
        for variable, value in grafana_vars.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    promtool = needs("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_validates_the_stack() -> None:
    compose = needs("docker-compose")
    result = subprocess.run(
        [compose, "-f", str(REPO_ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_a_real_prometheus_scrapes_a_live_server(tmp_path: Path) -> None:
    prometheus = needs("prometheus")
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size=8, threshold=0.5)
    with running_server(repo, {"default_model": "bright"}, log_dir=tmp_path) as server:
        with server.client() as http:
            for value in (30, 220, 240):
                files = [("files", (f"{value}.png", solid_png(value), "image/png"))]
                assert http.post("/score", files=files).status_code == 200
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(path) for path in RULE_FILES]
        job = config["scrape_configs"][0]
        job["scrape_interval"] = "1s"
        job["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
        config["scrape_configs"] = [job]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
        process = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        api = f"http://127.0.0.1:{port}/api/v1"

        def query(expr: str) -> list[dict]:
            try:
                response = httpx.get(f"{api}/query", params={"query": expr}, timeout=2)
                return response.json()["data"]["result"] if response.status_code == 200 else []
            except httpx.HTTPError:
                return []

        try:
            assert wait_until(lambda: bool(query('up{job="edgecase"} == 1')), timeout=30), (
                tmp_path / "prometheus.log"
            ).read_text()
            scored = query('sum(edgecase_frames_scored_total{model="bright"})')
            assert wait_until(lambda: bool(query('edgecase_frames_scored_total{model="bright"} >= 3')), 15)
            flagged = query('edgecase_frames_flagged_total{model="bright", version="1"}')
            assert flagged and float(flagged[0]["value"][1]) == 2.0, (scored, flagged)
            rules = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
            loaded = {rule["name"]: rule["health"] for group in rules for rule in group["rules"]}
            assert "EdgecaseFlagRateDrift" in loaded and "edgecase:flag_rate:ratio_rate15m" in loaded
            time.sleep(2)  # a couple of rule evaluations
            rules = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
            bad = {r["name"]: r.get("lastError") for g in rules for r in g["rules"] if r["health"] == "err"}
            assert not bad, bad
            # The dashboard's queries run against real series; the throughput panel has data.
            answered = {}
            for expr in dashboard_exprs():
                if not expr.startswith("label_values("):
                    filled = expr.replace("$__rate_interval", "30s").replace("$model", ".*")
                    response = httpx.get(f"{api}/query", params={"query": filled}, timeout=5)
                    assert response.status_code == 200, (filled, response.text)
                    answered[expr] = response.json()["data"]["result"]
            scored_rate = next(
                v
                for k, v in answered.items()
                if k.startswith("sum by (model, version) (rate(edgecase_frames_scored_total")
            )
            assert scored_rate and scored_rate[0]["metric"] == {"model": "bright", "version": "1"}
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()
