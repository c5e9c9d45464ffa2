"""What a running service keeps in its (embedded) flagged store is bounded, and measured.

A real server on loopback with a retention of 3 flags and a stored-bytes cap: more edge cases than the
retention allows end with the 3 newest kept (the size gauges say so), and a frame whose upload is over
the cap is stored as its decoded frame re-encoded within the cap, while a small one is kept as sent.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from service_helpers import publish_model, running_server, solid_png, wait_until

CAP = 20_000


def gauge(http: httpx.Client, name: str) -> float | None:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def bright_noise_png(size: int = 256) -> bytes:
    """A bright (edge case) frame whose PNG is far over CAP: noise does not compress."""
    pixels = np.random.default_rng(1).integers(140, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_retention_and_the_size_cap_bound_what_the_service_keeps(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size=8, threshold=0.5)
    settings = {
        "default_model": "bright",
        "flagged_max_frames": 3,
        "flagged_max_image_bytes": CAP,
        "flagged_retention_poll_s": 0.2,
    }
    big = bright_noise_png()
    assert len(big) > 5 * CAP
    with running_server(repo, settings, log_dir=tmp_path) as server, server.client() as http:
        response = http.post("/score", files=[("files", ("big.png", big, "image/png"))])
        assert response.status_code == 200, response.text
        big_id = response.json()["results"][0]["flagged_id"]
        stored = http.get(f"/flagged/{big_id}/image")
        assert stored.status_code == 200 and stored.headers["content-type"] == "image/png"
        assert len(stored.content) <= CAP  # re-encoded from the decoded frame, shrunk to fit
        assert Image.open(io.BytesIO(stored.content)).size[0] < 256

        ids = []
        for value in (200, 210, 220, 230):
            frame = solid_png(value)
            result = http.post("/score", files=[("files", (f"f{value}.png", frame, "image/png"))]).json()
            ids.append(result["results"][0]["flagged_id"])
            if len(ids) == 1:  # two flags so far, within the retention: nothing can have gone yet
                assert http.get(f"/flagged/{ids[0]}/image").content == frame  # within the cap: as sent

        def kept() -> list[int]:
            return sorted(item["id"] for item in http.get("/flagged").json()["items"])

        assert wait_until(lambda: kept() == ids[1:], 30), f"kept {kept()}:\n{server.log()}"
        assert wait_until(lambda: gauge(http, "edgecase_flagged_store_frames") == 3, 30)
        stored_bytes = gauge(http, "edgecase_flagged_store_bytes")
        assert stored_bytes == sum(len(solid_png(v)) for v in (210, 220, 230))
        assert (gauge(http, "edgecase_flagged_pruned_total") or 0) >= 2
