"""Two service replicas share one flagged store (real PostgreSQL + a real S3 server), and a SIGKILL of
one of them under load loses no acknowledged flag.

Both replicas start at once on an empty database (so they race to create the schema), then clients
send bright frames (every one an edge case, stored before its response) to both. Replica A is killed
with SIGKILL (no shutdown code runs) while requests are in flight; the clients of B keep going a little
longer. Then, through B: every `flagged_id` acknowledged by either replica is listed once, under the
key it was sent with, and its image reads back as the bytes that were sent; every row in the store
(acknowledged or not) has its image; and B's size gauge reports the store's size.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_helpers import RunningServer, publish_model, solid_png, start_server, wait_until
from store_servers import fresh_database, make_bucket, moto_s3, postgres_server

CLIENTS_PER_REPLICA = 3
FRAMES_PER_REQUEST = 4
LOAD_SECONDS = 8.0  # at most: the load stops as soon as both replicas acknowledged enough
STARTUP_S = 90.0  # two replicas start side by side on two shared cores


@pytest.fixture(scope="module")
def shared_store() -> Iterator[tuple[str, str, dict[str, str]]]:
    """(database URL, images URL, the AWS_* variables) of an empty shared store."""
    with postgres_server() as pg_url, moto_s3() as aws:
        bucket = make_bucket(aws)
        yield fresh_database(pg_url), f"s3://{bucket}/{uuid.uuid4().hex[:8]}/", aws


def send_load(
    server: RunningServer,
    client: int,
    stop: threading.Event,
    acked: dict[int, tuple[str, bytes]],
    lock: threading.Lock,
) -> None:
    """Post bright frames until stopped; remember flag id -> (key, bytes sent) for every 200."""
    with httpx.Client(base_url=server.url, timeout=10.0) as http:
        request = 0
        while not stop.is_set():
            keys = [f"p{server.port}-c{client}-r{request}-{i}.png" for i in range(FRAMES_PER_REQUEST)]
            frames = [
                solid_png(130 + (client * 31 + request * 7 + i) % 120) for i in range(FRAMES_PER_REQUEST)
            ]
            request += 1
            files = [("files", (key, data, "image/png")) for key, data in zip(keys, frames, strict=True)]
            try:
                response = http.post("/score", files=files)
            except httpx.HTTPError:
                continue  # the replica is gone: never acknowledged
            if response.status_code != 200:
                continue
            for result, key, data in zip(response.json()["results"], keys, frames, strict=True):
                if result.get("flagged_id") is not None:
                    with lock:
                        acked[result["flagged_id"]] = (key, data)


def all_flags(http: httpx.Client) -> list[dict]:
    found: list[dict] = []
    while True:
        page = http.get("/flagged", params={"limit": 1000, "offset": len(found)}).json()
        found.extend(page["items"])
        if not page["items"] or len(found) >= page["total"]:
            return found


def kill_group(server: RunningServer) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(15)


def gauge(http: httpx.Client, name: str) -> float | None:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_two_replicas_share_the_store_and_a_sigkill_loses_no_acknowledged_flag(
    tmp_path: Path, shared_store: tuple[str, str, dict[str, str]]
) -> None:
    database, images, aws = shared_store
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size=8, threshold=0.5)
    settings = {
        "default_model": "bright",
        "max_queue_delay_ms": 2,
        "flagged_url": database,
        "flagged_images": images,
        "flagged_retention_poll_s": 0.5,
    }
    replicas = [start_server(repo, settings, wait="none", log_dir=tmp_path, env=aws) for _ in range(2)]
    a, b = replicas
    acked: dict[int, tuple[str, bytes]] = {}
    lock = threading.Lock()
    stop_a, stop_b = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []
    try:
        for server in replicas:
            ready = wait_until(lambda s=server: s.is_ready() or s.process.poll() is not None, STARTUP_S)
            assert ready and server.process.poll() is None, f"replica did not start:\n{server.log()}"
        for server, stop in ((a, stop_a), (b, stop_b)):
            threads += [
                threading.Thread(target=send_load, args=(server, c, stop, acked, lock), daemon=True)
                for c in range(CLIENTS_PER_REPLICA)
            ]
        for thread in threads:
            thread.start()

        def acked_by(server: RunningServer) -> int:
            with lock:
                return sum(1 for key, _ in acked.values() if key.startswith(f"p{server.port}-"))

        wait_until(lambda: acked_by(a) >= 100 and acked_by(b) >= 100, LOAD_SECONDS)
        kill_group(a)  # requests to A are in flight: some were committed and never acknowledged
        assert a.process.returncode == -signal.SIGKILL
        before = acked_by(b)
        wait_until(lambda: acked_by(b) >= before + 20, LOAD_SECONDS)  # B goes on serving alone
    finally:
        stop_a.set()
        stop_b.set()
        for thread in threads:
            thread.join(15)
        kill_group(a)
    try:
        assert acked_by(a) >= 10 and acked_by(b) >= 10, f"too little load:\n{a.log()}\n{b.log()}"
        with b.client() as http:
            stored = all_flags(http)
            by_id = {item["id"]: item for item in stored}
            assert len(by_id) == len(stored)
            missing = sorted(set(acked) - set(by_id))
            assert not missing, f"{len(missing)} acknowledged flags lost, e.g. {missing[:5]}"
            keys = Counter(item["key"] for item in stored)
            assert [key for key, n in keys.items() if n > 1] == []  # each frame flagged exactly once
            for flag_id, (key, sent) in acked.items():
                assert by_id[flag_id]["key"] == key
                image = http.get(f"/flagged/{flag_id}/image")
                assert image.status_code == 200 and image.content == sent, f"flag {flag_id}: image differs"
            unacknowledged = [item["id"] for item in stored if item["id"] not in acked]
            for flag_id in unacknowledged:  # committed by A just before the kill: still whole
                assert http.get(f"/flagged/{flag_id}/image").status_code == 200
            assert wait_until(lambda: gauge(http, "edgecase_flagged_store_frames") == len(stored), 30)
            assert (gauge(http, "edgecase_flagged_store_bytes") or 0) > 0
    finally:
        b.stop()
    print(f"{len(acked)} acknowledged flags ({acked_by(a)} by the killed replica), {len(stored)} stored")
