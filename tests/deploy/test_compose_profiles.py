"""docker-compose.yml's two profiles, as docker-compose itself reads them: `cpu` runs today's service
from deploy/Dockerfile, `gpu` the same service from deploy/Dockerfile.gpu on one NVIDIA GPU with one
worker and the CUDA provider. Both answer as `edgecase:8000`, the target Prometheus scrapes.

docker-compose is Debian's package (scripts/install-test-tools); the test skips, saying so, without it.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from typing import Any

import pytest
import yaml
from service_helpers import REPO_ROOT

from service.settings import ENV_PREFIX, Settings


@cache
def compose_config(profile: str) -> dict[str, Any]:
    """`docker-compose --profile P config`: validates the file and prints it resolved (anchors merged)."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (Debian: apt-get install -y docker-compose)")
    result = subprocess.run(
        [compose, "-f", str(REPO_ROOT / "docker-compose.yml"), "--profile", profile, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def mount(volume: str | dict[str, Any]) -> tuple[str, bool]:
    """(container path, read-only) of a volume, in the short syntax (compose v1) or the long one (v2)."""
    if isinstance(volume, dict):
        return volume["target"], bool(volume.get("read_only", False))
    parts = volume.split(":")
    return parts[1], parts[2:] == ["ro"]


def published(port: str | dict[str, Any]) -> tuple[int, int]:
    """(host port, container port) in either syntax ("[ip:]host:container[/protocol]" or a mapping)."""
    if isinstance(port, dict):
        return int(port["published"]), int(port["target"])
    host, container = port.split("/")[0].split(":")[-2:]
    return int(host), int(container)


def settings_of(service: dict[str, Any]) -> Settings:
    env = service["environment"]
    unknown = {k for k in env if k.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields}
    assert not unknown, f"environment names Settings does not read: {sorted(unknown)}"
    return Settings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items()})


@pytest.mark.parametrize(
    ("profile", "name", "dockerfile"),
    [("cpu", "edgecase", "deploy/Dockerfile"), ("gpu", "edgecase-gpu", "deploy/Dockerfile.gpu")],
)
def test_each_profile_runs_the_service_from_its_dockerfile(profile: str, name: str, dockerfile: str) -> None:
    services = compose_config(profile)["services"]
    service = services[name]
    assert service["profiles"] == [profile] and service["build"]["dockerfile"] == dockerfile
    assert not service["image"].endswith(":latest")
    settings = settings_of(service)
    volumes = dict(map(mount, service["volumes"]))
    assert volumes[str(settings.repo)] is True and str(settings.flagged_dir) in volumes
    assert (8000, settings.port) in map(published, service["ports"])
    # The monitoring runs whichever profile is chosen: no profile on it, no dependency on a profiled service.
    for monitor in ("prometheus", "alertmanager", "grafana"):
        assert "profiles" not in services[monitor]
        assert not {"edgecase", "edgecase-gpu"} & set(services[monitor].get("depends_on", {}))


def test_the_gpu_profile_reserves_one_nvidia_gpu_for_one_worker() -> None:
    service = compose_config("gpu")["services"]["edgecase-gpu"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    settings = settings_of(service)
    assert settings.workers == 1  # one worker per GPU (docs/operations.md says why)
    assert settings.providers is not None and settings.providers[0] == "CUDAExecutionProvider"
    # Scraped under the name Prometheus knows, whichever profile runs.
    assert "edgecase" in service["networks"]["default"]["aliases"]
    prometheus = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    edgecase_job = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "edgecase")
    assert edgecase_job["static_configs"][0]["targets"] == ["edgecase:8000"]


def test_the_cpu_profile_asks_for_no_gpu() -> None:
    service = compose_config("cpu")["services"]["edgecase"]
    assert "deploy" not in service
    assert settings_of(service).providers is None
