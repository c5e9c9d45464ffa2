"""New versions without a restart: warmed before they serve, no failed request during the swap,
broken versions refused while the old one keeps serving; readiness before the first model exists."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import publish_broken, publish_model, running_server, solid_png, wait_until

from service.errors import NotReadyError
from service.metrics import Metrics
from service.pool import ModelPool, ReloadReport
from service.registry import ModelRegistry
from service.settings import Settings


def metric_value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class Load:
    """Client threads posting frames in a loop, recording every status and the version that answered."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.stop = threading.Event()
        self.statuses: Counter[int] = Counter()
        self.versions: list[int] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, index: int) -> None:
        files = [("files", (f"t{index}-{i}.png", solid_png(40 * i))) for i in range(3)]
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    response = client.post("/score", files=files)
                except httpx.HTTPError as exc:  # a dropped connection counts as a failure too
                    with self._lock:
                        self.errors.append(repr(exc))
                    continue
                with self._lock:
                    self.statuses[response.status_code] += 1
                    if response.status_code == 200:
                        self.versions.append(response.json()["version"])
                    else:
                        self.errors.append(response.text)


def test_a_new_version_takes_over_under_load_with_no_failed_request(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1)
    with (
        running_server(repo, {"max_queue_delay_ms": 1}, log_dir=tmp_path) as server,
        Load(server.url) as load,
    ):
        assert wait_until(lambda: len(load.versions) >= 20)
        publish_model(repo, "bright", 2, threshold=0.3)
        report = httpx.post(f"{server.url}/admin/reload", timeout=30).json()
        assert report["loaded"] == ["bright/2"] and report["serving"] == {"bright": 2}
        swapped_at = len(load.versions)
        assert wait_until(lambda: len(load.versions) >= swapped_at + 40)
    assert load.errors == [] and set(load.statuses) == {200}, (load.statuses, load.errors[:3])
    assert load.versions[0] == 1 and load.versions[-1] == 2
    # After /admin/reload returned, only the (at most 4) requests already in flight may still be on 1.
    assert set(load.versions[swapped_at + 4 :]) == {2}


def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1)
    with (
        running_server(repo, log_dir=tmp_path) as server,
        server.client() as client,
        Load(server.url) as load,
    ):
        for version, how in [(2, "graph"), (3, "hash"), (4, "shape"), (5, "runtime")]:
            publish_broken(repo, "bright", version, how=how)
            report = client.post("/admin/reload").json()
            assert report["loaded"] == [] and list(report["refused"]) == [f"bright/{version}"]
            assert report["serving"] == {"bright": 1}
        assert "warm-up failed" in report["refused"]["bright/5"]
        n = len(load.versions)
        assert wait_until(lambda: len(load.versions) >= n + 10)
        metrics = client.get("/metrics").text
        models = client.get("/models").json()["models"][0]
    assert load.errors == [] and set(load.versions) == {1}
    assert metric_value(metrics, "edgecase_model_loads_total", model="bright", outcome="refused") == 4
    assert models["version"] == 1 and models["available_versions"] == [1, 2, 3, 4, 5]
    assert "refused bright/2" in server.log()


def test_polling_picks_up_a_new_version_on_its_own(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1)
    with running_server(repo, {"reload_poll_s": 0.2}, log_dir=tmp_path) as server, server.client() as client:
        publish_model(repo, "bright", 2)

        def serving_version() -> int:
            return int(client.get("/readyz").json()["serving"]["bright"])

        assert wait_until(lambda: serving_version() == 2, timeout=20)
        result = client.post("/score", content=solid_png(10), headers={"Content-Type": "image/png"}).json()
        assert result["version"] == 2


def test_not_ready_until_a_model_is_published_then_ready_without_restart(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    settings = {"reload_poll_s": 0.2}
    with running_server(repo, settings, wait="alive", log_dir=tmp_path) as server, server.client() as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"] == "not_ready"
        assert int(ready.headers["Retry-After"]) >= 1
        scored = client.post("/score", content=solid_png(10), headers={"Content-Type": "image/png"})
        assert scored.status_code == 503
        publish_model(repo, "bright", 1)
        assert wait_until(server.is_ready, timeout=20), server.log()
        scored = client.post("/score", content=solid_png(10), headers={"Content-Type": "image/png"})
        assert scored.status_code == 200


@pytest.mark.slow
def test_two_workers_both_move_to_a_new_version_by_polling_under_load(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1)
    options = {"workers": 2, "log_dir": tmp_path, "timeout": 90}
    with running_server(repo, {"reload_poll_s": 0.3}, **options) as server, Load(server.url) as load:
        assert wait_until(lambda: len(load.versions) >= 20)
        publish_model(repo, "bright", 2)
        # Each worker polls on its own; give both time, then check that only version 2 answers.
        assert wait_until(lambda: 2 in load.versions, timeout=30)
        time.sleep(2.0)
        settled = len(load.versions)
        assert wait_until(lambda: len(load.versions) >= settled + 40, timeout=60)
    assert load.errors == [] and set(load.statuses) == {200}, (load.statuses, load.errors[:3])
    assert set(load.versions[settled:]) == {2}


def resolve_during_a_slow_start(repo: Path, delay_s: float, startup_wait_s: float) -> int:
    """Start a pool over ``repo`` whose startup load takes ``delay_s`` longer than it needs to, ask it
    for the default model while that load runs, and return the version that answers."""
    settings = Settings(repo=repo, startup_wait_s=startup_wait_s, providers=["CPUExecutionProvider"])

    async def scenario() -> int:
        registry = ModelRegistry(repo, providers=settings.providers)
        pool = ModelPool(registry, settings, Metrics(CollectorRegistry()))
        refresh = pool.refresh

        async def slow_refresh() -> ReloadReport:
            await asyncio.sleep(delay_s)
            return await refresh()

        pool.refresh = slow_refresh  # type: ignore[method-assign]
        start = asyncio.create_task(pool.start())
        await asyncio.sleep(0.05)
        assert not pool.ready
        try:
            return (await pool.resolve(None, None)).model.version
        finally:
            await start
            await pool.close()

    return asyncio.run(scenario())


def test_a_request_during_the_startup_load_waits_for_it_instead_of_failing(tmp_path: Path) -> None:
    # With several workers, /readyz can be answered by a ready worker while another still warms up.
    publish_model(tmp_path, "bright", 1)
    assert resolve_during_a_slow_start(tmp_path, delay_s=0.5, startup_wait_s=10.0) == 1


def test_a_startup_load_slower_than_the_wait_still_answers_not_ready(tmp_path: Path) -> None:
    publish_model(tmp_path, "bright", 1)
    with pytest.raises(NotReadyError):
        resolve_during_a_slow_start(tmp_path, delay_s=1.0, startup_wait_s=0.1)
