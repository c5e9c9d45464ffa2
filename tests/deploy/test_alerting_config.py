"""The alerting path as written: Prometheus sends to Alertmanager, Alertmanager's config is valid
(`amtool check-config`) and routes everything to a receiver, compose runs it, and every alert links a
runbook section of docs/operations.md that says what it means, what to check and what to do.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from service_helpers import REPO_ROOT

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
ALERTMANAGER_CONFIG = REPO_ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
OPERATIONS = REPO_ROOT / "docs" / "operations.md"


def alert_rules() -> list[dict[str, object]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def runbook_sections() -> dict[str, str]:
    """docs/operations.md's `###` sections by their GitHub anchor (lower case, spaces to dashes)."""
    sections: dict[str, str] = {}
    for chunk in re.split(r"^### ", OPERATIONS.read_text(), flags=re.M)[1:]:
        title, _, body = chunk.partition("\n")
        anchor = re.sub(r"[^a-z0-9 _-]", "", title.strip().lower()).replace(" ", "-")
        sections[anchor] = body.split("\n## ")[0]
    return sections


def test_amtool_accepts_the_alertmanager_config() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (Debian: apt-get install -y prometheus-alertmanager)")
    result = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_routed_to_a_webhook_receiver() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    routes = [config["route"], *config["route"].get("routes", [])]
    assert all(route["receiver"] in receivers for route in routes)
    webhook = receivers[config["route"]["receiver"]]["webhook_configs"][0]
    assert webhook["url"].startswith("http") and webhook["send_resolved"] is True
    # Notifications are per alert and model version, the labels the alerts carry.
    assert {"alertname", "model", "version"} <= set(config["route"]["group_by"])


def test_prometheus_sends_to_the_alertmanager_compose_runs() -> None:
    prometheus = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (manager,) = prometheus["alerting"]["alertmanagers"]
    assert manager["static_configs"][0]["targets"] == ["alertmanager:9093"]
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["alertmanager"]
    assert "./deploy/alertmanager:/etc/alertmanager:ro" in service["volumes"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in service["command"]
    assert "9093:9093" in service["ports"] and not service["image"].endswith(":latest")


def test_every_alert_links_a_runbook_that_says_what_to_do() -> None:
    sections = runbook_sections()
    rules = alert_rules()
    assert len(rules) >= 8
    for rule in rules:
        url = rule["annotations"]["runbook_url"]  # type: ignore[index]
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md" and anchor == str(rule["alert"]).lower(), url
        assert anchor in sections, f"docs/operations.md has no section for {rule['alert']}"
        body = sections[anchor].lower()
        for part in ("what it means", "what to check", "what to do"):
            assert f"**{part}.**" in body, f"the {rule['alert']} runbook lacks '{part}'"
