"""A flag acknowledged to a client survives a crash: SIGKILL the server under load, restart, find them all.

The server scores concurrent requests of bright frames with the brightness test graph (threshold 0.5,
so every frame is an edge case and lands in the flagged store before its response is sent). It is
killed with SIGKILL (no shutdown code runs) while requests are in flight, restarted on the same store,
and every `flagged_id` seen in a 200 response must be listed by GET /flagged with an image that reads
back as the frame that was sent. With two worker processes (slow: two startups of two workers), both
write to the one store at once and the whole process group is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import RunningServer, publish_model, solid_png, start_server

CLIENTS = 6
FRAMES_PER_REQUEST = 4
LOAD_SECONDS = 2.0
DEADLINE_S = 30.0  # per worker process: starting workers dominates on 2 shared cores


def frame_value(client: int, request: int, index: int) -> int:
    """Distinct bright frames (some repeat on purpose: identical frames share one stored image)."""
    return 130 + (client * 31 + request * 7 + index) % 120


def send_load(url: str, client: int, stop: threading.Event, acked: dict[int, bytes], lock: threading.Lock):
    """Post bright frames until stopped; remember (flag id -> bytes sent) for every 200 response."""
    with httpx.Client(base_url=url, timeout=10.0) as http:
        request = 0
        while not stop.is_set():
            frames = [solid_png(frame_value(client, request, i)) for i in range(FRAMES_PER_REQUEST)]
            files = [
                ("files", (f"c{client}-r{request}-{i}.png", data, "image/png"))
                for i, data in enumerate(frames)
            ]
            request += 1
            try:
                response = http.post("/score", files=files)
            except httpx.HTTPError:
                continue  # the server is gone: this request was never acknowledged
            if response.status_code != 200:
                continue  # 429/503 under load: not acknowledged either
            for result, data in zip(response.json()["results"], frames, strict=True):
                if result.get("flagged_id") is not None:
                    with lock:
                        acked[result["flagged_id"]] = data


def all_flags(http: httpx.Client) -> dict[int, dict]:
    found: dict[int, dict] = {}
    offset = 0
    while True:
        page = http.get("/flagged", params={"limit": 1000, "offset": offset}).json()
        found.update({item["id"]: item for item in page["items"]})
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return found


def kill_server_group(server: RunningServer) -> None:
    """SIGKILL the server and every worker it forked (they share its session's process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(15)


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_every_acknowledged_flag_survives_sigkill(tmp_path: Path, workers: int) -> None:
    started = time.monotonic()
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size=8, threshold=0.5)
    settings = {"default_model": "bright", "max_queue_delay_ms": 2}
    server = start_server(repo, settings, workers=workers, log_dir=tmp_path)
    acked: dict[int, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    clients = [
        threading.Thread(target=send_load, args=(server.url, c, stop, acked, lock), daemon=True)
        for c in range(CLIENTS)
    ]
    try:
        for thread in clients:
            thread.start()
        # Kill once flags are flowing (or after LOAD_SECONDS at most), with requests still in flight.
        deadline = time.monotonic() + LOAD_SECONDS
        while time.monotonic() < deadline and len(acked) < 200:
            time.sleep(0.05)
        kill_server_group(server)
        assert server.process.returncode == -signal.SIGKILL
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=15)
        kill_server_group(server)
    assert len(acked) >= 10, f"too little load reached the server before the kill:\n{server.log()}"

    restarted = start_server(
        repo, settings, workers=workers, log_dir=tmp_path
    )  # same repo -> same flagged store
    try:
        with restarted.client() as http:
            stored = all_flags(http)
            missing = sorted(set(acked) - set(stored))
            assert not missing, f"{len(missing)} acknowledged flags lost after SIGKILL, e.g. {missing[:5]}"
            for flag_id, sent in acked.items():
                image = http.get(f"/flagged/{flag_id}/image")
                assert image.status_code == 200 and image.content == sent, f"flag {flag_id}: image differs"
                assert stored[flag_id]["model"] == "bright" and stored[flag_id]["version"] == 1
    finally:
        restarted.stop()
    elapsed = time.monotonic() - started
    assert elapsed < DEADLINE_S * workers, f"crash test took {elapsed:.1f} s"
    print(
        f"{len(acked)} acknowledged flags, {len(stored)} stored, all present after SIGKILL ({elapsed:.1f} s)"
    )
