"""Attack: many small-on-the-wire, huge-when-decoded frames in one request (a pixel bomb).

Each 1-bit PNG is a few KB and within the per-frame pixel limit, but decoded to RGB it is megabytes;
before the per-request pixel budget the service decoded all of them and held them until the answer
(256 x 4000x4000 frames: 12 GB). Now the headers are read first and the request is refused with 413
naming the frame that crossed the budget, before any frame is decoded.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from attack_helpers import assert_serves_normally, multipart, peak_growth
from PIL import Image
from service_helpers import publish_model, running_server


def one_bit_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_pixel_bomb_request_is_refused_from_its_headers_naming_the_frame(tmp_path: Path) -> None:
    # Scaled down from the report (256 frames of 4000x4000): 64 frames of 2000x2000 (4 Mpx each, 12 MB
    # as RGB, 1 KB on the wire) against a 16 Mpx request budget: the fifth frame crosses it.
    publish_model(tmp_path / "models", "bright", 1)
    frame = one_bit_png(2000)
    body, content_type = multipart((f"{i}.png", frame, "image/png") for i in range(64))
    assert len(body) < 200_000
    settings = {"max_pixels_per_request": 16_000_000}
    with running_server(tmp_path / "models", settings, log_dir=tmp_path) as server:
        with peak_growth(server) as grown:
            response = httpx.post(
                f"{server.url}/score", content=body, headers={"Content-Type": content_type}, timeout=60
            )
        assert response.status_code == 413, response.text
        error = response.json()
        assert error["error"] == "too_large" and error["frame"] == "4.png", error
        assert "20,000,000 decoded pixels" in error["detail"] and "16,000,000" in error["detail"]
        # Nothing was decoded: 64 decoded frames would be 768 MB.
        assert grown[0] < 60, f"server peak RSS grew by {grown[0]:.0f} MB"
        assert_serves_normally(server)


def test_a_frame_over_the_per_frame_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    publish_model(tmp_path / "models", "bright", 1)
    body, content_type = multipart(
        [("ok.png", one_bit_png(100), "image/png"), ("big.png", one_bit_png(5000), "image/png")]
    )
    with running_server(
        tmp_path / "models", {"max_pixels_per_frame": 16_000_000}, log_dir=tmp_path
    ) as server:
        with peak_growth(server) as grown:
            response = httpx.post(
                f"{server.url}/score", content=body, headers={"Content-Type": content_type}, timeout=60
            )
        assert response.status_code == 413, response.text
        assert response.json()["frame"] == "big.png"
        assert "5000x5000 = 25,000,000 pixels" in response.json()["detail"]
        assert grown[0] < 60, f"server peak RSS grew by {grown[0]:.0f} MB"
        assert_serves_normally(server)


@pytest.mark.slow
def test_large_frames_within_the_budget_are_decoded_one_at_a_time(tmp_path: Path) -> None:
    # 8 frames of 4000x4000 (16 Mpx each, 48 MB as RGB): within the default 128 Mpx budget, so all
    # are scored; each is resized right after decoding, so the peak is about one frame, not eight.
    publish_model(tmp_path / "models", "bright", 1)
    frame = one_bit_png(4000)
    body, content_type = multipart((f"{i}.png", frame, "image/png") for i in range(8))
    with running_server(tmp_path / "models", {"decode_threads": 1}, log_dir=tmp_path) as server:
        with peak_growth(server) as grown:
            response = httpx.post(
                f"{server.url}/score", content=body, headers={"Content-Type": content_type}, timeout=120
            )
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 8
        assert grown[0] < 250, f"server peak RSS grew by {grown[0]:.0f} MB (8 frames held would be 384+)"
        assert_serves_normally(server)


def test_the_reported_bomb_with_default_settings_is_refused_at_the_ninth_frame(tmp_path: Path) -> None:
    # The report's request, unscaled: 256 frames of a 1-bit 4000x4000 PNG (16 Mpx each, within the
    # per-frame limit), 0.5 MB on the wire, 12 GB decoded. The default budget (128 Mpx) holds 8.
    publish_model(tmp_path / "models", "bright", 1)
    frame = one_bit_png(4000)
    body, content_type = multipart((f"{i}.png", frame, "image/png") for i in range(256))
    assert len(body) < 1_000_000
    with running_server(tmp_path / "models", log_dir=tmp_path) as server:
        with peak_growth(server) as grown:
            response = httpx.post(
                f"{server.url}/score", content=body, headers={"Content-Type": content_type}, timeout=60
            )
        assert response.status_code == 413, response.text
        assert response.json()["frame"] == "8.png"
        assert grown[0] < 60, f"server peak RSS grew by {grown[0]:.0f} MB"
        assert_serves_normally(server)
