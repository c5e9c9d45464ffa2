"""Dynamic batching seen from outside: concurrent requests share session.run calls; a full queue is 429."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import publish_model, running_server, solid_png


def batch_size_samples(metrics_text: str) -> dict[str, float]:
    """le -> cumulative count of edgecase_batch_size_frames for bright/1, plus 'sum' and 'count'."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "edgecase_batch_size_frames":
            continue
        for sample in family.samples:
            if sample.labels.get("model") != "bright":
                continue
            key = sample.labels.get("le") or sample.name.rsplit("_", 1)[-1]
            out[key] = sample.value
    return out


def test_concurrent_requests_are_coalesced_into_batches(tmp_path: Path) -> None:
    publish_model(tmp_path / "models", "bright", 1)
    settings = {"max_batch_size": 16, "max_queue_delay_ms": 50}
    with running_server(tmp_path / "models", settings, log_dir=tmp_path) as server:
        png = solid_png(30)

        def one(i: int) -> tuple[int, str]:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                r = c.post("/score", files=[("files", (f"f{i}.png", png))])
                return r.status_code, r.json()["results"][0]["key"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(one, range(32)))
        assert outcomes == [(200, f"f{i}.png") for i in range(32)]
        samples = batch_size_samples(httpx.get(f"{server.url}/metrics").text)
        assert samples["sum"] == 32, "every frame went through exactly one batch"
        assert samples["count"] < 32, f"no two requests shared a batch: {samples}"
        assert samples["1.0"] < samples["count"], "some batch held more than one frame"


def test_a_full_queue_answers_429_with_retry_after_and_recovers(tmp_path: Path) -> None:
    publish_model(tmp_path / "models", "bright", 1)
    # 3-frame requests against a 4-frame queue: the first waits out the 1.5 s delay, the second cannot fit.
    settings = {
        "max_batch_size": 4,
        "max_queue_frames": 4,
        "max_queue_delay_ms": 1500,
        "eager_dispatch": False,
    }
    with running_server(tmp_path / "models", settings, log_dir=tmp_path) as server:
        files = [("files", (f"{i}.png", solid_png(i))) for i in range(3)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool, server.client() as client:
            first = pool.submit(client.post, "/score", files=files)
            time.sleep(0.5)
            second = client.post("/score", files=files)
            assert second.status_code == 429, second.text
            assert int(second.headers["Retry-After"]) >= 1
            assert second.json()["error"] == "queue_full"
            assert first.result().status_code == 200
            assert client.post("/score", files=files).status_code == 200  # room again once drained
