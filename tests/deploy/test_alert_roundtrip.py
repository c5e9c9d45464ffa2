"""Alerts reach someone: a real edgecase server flags every frame it sees, a real Prometheus evaluates
the real rules against it, the flag-rate drift alert fires, a real Alertmanager routes it with the real
route and receiver, and the notification lands on a webhook sink served by this test.

Everything runs on loopback on free ports. The configs are derived from the ones in deploy/: the same
rule expressions, route and receiver, with intervals in seconds instead of minutes (rules evaluated and
targets scraped every second, the drift alert's `for` at zero, Alertmanager's group_wait at one second)
and the webhook URL pointed at the sink. The drift rule averages over 15 minutes and needs more than
one frame per second on that average, so the test scores a few thousand tiny frames.

Binaries: Debian's `prometheus` and `prometheus-alertmanager` (scripts/install-test-tools); the test
skips, saying so, when they are missing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from service_helpers import REPO_ROOT, free_port, publish_model, running_server, solid_png, wait_until

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
ALERTMANAGER_CONFIG = REPO_ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
ALERT = "EdgecaseFlagRateDrift"
FRAMES_PER_REQUEST = 256


def binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip(f"{' or '.join(names)} not installed (scripts/install-test-tools installs it on Debian)")


class WebhookSink:
    """An HTTP server that keeps every JSON body POSTed to it (what Alertmanager's webhook sends)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                sink.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        return [
            alert
            for body in list(self.bodies)
            for alert in body["alerts"]
            if alert["labels"].get("alertname") == alertname and alert["status"] == "firing"
        ]

    def __enter__(self) -> WebhookSink:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def started(cmd: list[str], log_path: Path, url: str, ready_path: str) -> Iterator[str]:
    """Run a monitoring binary until the block ends; yields its URL once it answers `ready_path`."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:

        def ready() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(url + ready_path, timeout=2).status_code == 200
            return False

        assert wait_until(lambda: process.poll() is not None or ready(), timeout=30) and ready(), (
            log_path.read_text(errors="replace")
        )
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def fast_rule_files(tmp_path: Path) -> list[Path]:
    """The real rules.yml and alerts.yml, evaluated every second and the drift alert firing at once."""
    paths = []
    for source in ("rules.yml", "alerts.yml"):
        rules = yaml.safe_load((PROMETHEUS_DIR / source).read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if rule.get("alert") == ALERT:
                    rule["for"] = "0s"
        path = tmp_path / source
        path.write_text(yaml.safe_dump(rules))
        paths.append(path)
    return paths


def fast_prometheus_config(tmp_path: Path, target: str, alertmanager: str) -> Path:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(p) for p in fast_rule_files(tmp_path)]
    (manager,) = config["alerting"]["alertmanagers"]
    manager["static_configs"] = [{"targets": [alertmanager]}]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "edgecase"]
    job["scrape_interval"] = "1s"
    job["static_configs"][0]["targets"] = [target]
    config["scrape_configs"] = [job]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def fast_alertmanager_config(tmp_path: Path, webhook_url: str) -> Path:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for route in [config["route"], *config["route"].get("routes", [])]:
        route.update(group_wait="1s", group_interval="1s")
    (receiver,) = [r for r in config["receivers"] if r["name"] == config["route"]["receiver"]]
    receiver["webhook_configs"][0]["url"] = webhook_url
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_flag_rate_drift_alert_reaches_the_webhook(tmp_path: Path) -> None:
    prometheus = binary("prometheus")
    alertmanager = binary("prometheus-alertmanager", "alertmanager")
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size=8, threshold=0.5)  # target FPR 0.05: drift above 25% flagged
    frames = [("files", (f"{i}.png", solid_png(230), "image/png")) for i in range(FRAMES_PER_REQUEST)]

    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(WebhookSink())
        server = stack.enter_context(running_server(repo, {"default_model": "bright"}, log_dir=tmp_path))
        am_port, prom_port = free_port(), free_port()
        am_config = fast_alertmanager_config(tmp_path, sink.url)
        am_url = stack.enter_context(
            started(
                [alertmanager, f"--config.file={am_config}", f"--storage.path={tmp_path / 'am'}",
                 f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                tmp_path / "alertmanager.log", f"http://127.0.0.1:{am_port}", "/-/ready",
            )
        )  # fmt: skip
        prom_config = fast_prometheus_config(tmp_path, f"127.0.0.1:{server.port}", f"127.0.0.1:{am_port}")
        stack.enter_context(
            started(
                [prometheus, f"--config.file={prom_config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                tmp_path / "prometheus.log", f"http://127.0.0.1:{prom_port}", "/-/ready",
            )
        )  # fmt: skip

        # Only edge cases, until the notification arrives (every wait has a deadline).
        deadline = time.monotonic() + 90
        with server.client(timeout=60) as http:
            while not sink.firing(ALERT) and time.monotonic() < deadline:
                response = http.post("/score", files=frames)
                assert response.status_code == 200, response.text
                assert all(r["is_edge_case"] for r in response.json()["results"])
        assert wait_until(lambda: bool(sink.firing(ALERT)), timeout=10), (
            f"no {ALERT} on the webhook; Alertmanager alerts: "
            f"{httpx.get(am_url + '/api/v2/alerts', timeout=5).text}\n"
            f"{(tmp_path / 'prometheus.log').read_text(errors='replace')[-3000:]}"
        )

    body = next(b for b in sink.bodies if any(a in sink.firing(ALERT) for a in b["alerts"]))
    assert body["receiver"] == "edgecase-webhook" and body["version"] == "4"
    (alert,) = sink.firing(ALERT)
    assert alert["labels"] | {"model": "bright", "version": "1", "severity": "warning"} == alert["labels"]
    assert alert["annotations"]["runbook_url"] == "docs/operations.md#edgecaseflagratedrift"
    assert alert["annotations"]["summary"].startswith("bright/1 flags 100")
