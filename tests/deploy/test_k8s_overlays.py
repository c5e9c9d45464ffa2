"""deploy/k8s as kubectl renders it: every overlay (`kubectl kustomize`) checked against the service it
deploys: probes on routes the app has, ports that agree, EDGECASE_* names that are Settings fields with
values Settings accepts, CPU requested for every worker, one worker per GPU, images pinned by version,
and the fleet overlays (several replicas) only on the shared flagged store, with a PodDisruptionBudget
and a HorizontalPodAutoscaler.

kubectl comes from Debian's kubernetes-client (scripts/install-test-tools); the kustomizations use only
what its built-in kustomize v2.0 knows, so any kubectl from 1.14 up renders them.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from functools import cache
from typing import Any

import pytest
import yaml
from service_helpers import REPO_ROOT

from edgecase import __version__
from service.metrics import Metrics
from service.settings import ENV_PREFIX, Settings

K8S = REPO_ROOT / "deploy" / "k8s"
SINGLE = ["overlays/cpu", "overlays/gpu"]
FLEET = ["overlays/shared-store", "overlays/gpu-shared-store"]
GPU = {"overlays/gpu", "overlays/gpu-shared-store"}
SHARED_STORE_ENV = {"EDGECASE_FLAGGED_URL", "EDGECASE_FLAGGED_IMAGES"}


@cache
def render(overlay: str) -> dict[str, list[dict[str, Any]]]:
    """The overlay's objects by kind (kubectl kustomize; empty documents dropped)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (Debian: apt-get install -y kubernetes-client)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    objects: dict[str, list[dict[str, Any]]] = {}
    for doc in yaml.safe_load_all(result.stdout):
        if doc:
            objects.setdefault(doc["kind"], []).append(doc)
    return objects


def one(objects: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (obj,) = objects[kind]
    return obj


def container_of(objects: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@cache
def app_routes() -> set[str]:
    from service.app import create_app

    return set(create_app(Settings()).openapi()["paths"])


@pytest.mark.parametrize("overlay", SINGLE + FLEET)
def test_probes_ports_and_settings_agree_with_the_service(overlay: str) -> None:
    objects = render(overlay)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    container = container_of(objects)
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"an env variable is set twice: {names}"
    unknown = {
        n
        for n in names
        if n.startswith(ENV_PREFIX) and n.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
    }
    assert not unknown, f"EDGECASE_* names Settings does not read: {sorted(unknown)}"
    env = literal_env(container)
    settings = Settings(
        **{k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    )

    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": settings.port} and settings.host == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"/readyz", "/healthz", "/metrics", "/score"} <= app_routes()
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.port)
    service = one(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    # Resources follow the settings: a CPU per worker, memory bounded, the repo mounted read-only.
    resources = container["resources"]
    assert float(resources["requests"]["cpu"]) >= settings.workers and "memory" in resources["limits"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[str(settings.repo)]["readOnly"] is True and str(settings.flagged_dir) in mounts
    assert settings.log_format == "json"

    image, _, tag = container["image"].rpartition(":")
    assert tag == __version__ and image.endswith("edgecase-serve-gpu" if overlay in GPU else "edgecase-serve")
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("overlay", sorted(GPU))
def test_gpu_overlays_take_one_gpu_with_one_worker_and_the_cuda_provider(overlay: str) -> None:
    objects = render(overlay)
    container = container_of(objects)
    settings = Settings(workers=literal_env(container)["EDGECASE_WORKERS"],  # type: ignore[arg-type]
                        providers=literal_env(container)["EDGECASE_PROVIDERS"])  # fmt: skip
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # One worker per GPU: each worker process would hold its own CUDA context and copy of the models.
    assert settings.workers == 1
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    tolerations = one(objects, "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/shared-store"])
def test_cpu_overlays_ask_for_no_gpu(overlay: str) -> None:
    container = container_of(render(overlay))
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert "EDGECASE_PROVIDERS" not in literal_env(container)


@pytest.mark.parametrize("overlay", SINGLE)
def test_one_replica_overlays_keep_one_writer_on_the_embedded_store(overlay: str) -> None:
    objects = render(overlay)
    deployment = one(objects, "Deployment")["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    claims = {pvc["metadata"]["name"]: pvc for pvc in objects["PersistentVolumeClaim"]}
    assert claims["edgecase-flagged"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    volumes = {v["name"]: v for v in deployment["template"]["spec"]["volumes"]}
    assert volumes["flagged"]["persistentVolumeClaim"]["claimName"] == "edgecase-flagged"
    assert not {"PodDisruptionBudget", "HorizontalPodAutoscaler"} & set(objects)
    assert not SHARED_STORE_ENV & {e["name"] for e in container_of(objects)["env"]}


@pytest.mark.parametrize("overlay", FLEET)
def test_fleet_overlays_run_several_replicas_only_on_the_shared_store(overlay: str) -> None:
    objects = render(overlay)
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2 and spec["strategy"]["type"] == "RollingUpdate"
    # No per-pod store: no flagged claim at all, the store comes from the Secret.
    assert "edgecase-flagged" not in {pvc["metadata"]["name"] for pvc in objects["PersistentVolumeClaim"]}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert set(volumes["flagged"]) == {"name", "emptyDir"}
    env = {e["name"]: e for e in container_of(objects)["env"]}
    for name in SHARED_STORE_ENV:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "edgecase-flagged-store" and not ref.get("optional", False)

    labels = spec["template"]["metadata"]["labels"]
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["maxUnavailable"] == 1
    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= spec["replicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and "cpu" in container_of(objects)["resources"]["requests"]


def test_both_fleet_overlays_patch_the_same_way() -> None:
    """kustomize v2 loads no patch from outside an overlay's folder, so the file is copied; kept equal."""
    cpu, gpu = (K8S / overlay / "shared-store.yaml" for overlay in FLEET)
    assert filecmp.cmp(cpu, gpu, shallow=False)


def test_the_queue_depth_metric_named_for_prometheus_adapter_exists() -> None:
    hpa = (K8S / "parts" / "fleet" / "hpa.yaml").read_text()
    exported = {family.name for family in Metrics().registry.collect()}
    assert "edgecase_queue_depth_frames" in hpa and "edgecase_queue_depth_frames" in exported


def test_the_service_monitor_scrapes_the_service_metrics_port() -> None:
    monitor = one(render("monitoring"), "ServiceMonitor")["spec"]
    service = one(render("overlays/cpu"), "Service")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" in app_routes()


def test_no_image_anywhere_is_latest() -> None:
    texts = [path.read_text() for path in K8S.rglob("*.yaml")]
    texts.append((REPO_ROOT / "docker-compose.yml").read_text())
    for text in texts:
        for line in text.splitlines():
            if line.strip().startswith(("image:", "newTag:")):
                assert not line.split("#")[0].rstrip().endswith(("latest", ":")), line
