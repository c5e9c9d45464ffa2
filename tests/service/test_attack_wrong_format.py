"""Attack: images in formats the API does not promise, or not the type they claim to be.

Before, `Image.open` accepted anything Pillow knows (TIFF, PSD, EPS, ICO, JPEG 2000: large, rarely
exercised decoders) whatever the content type said: a TIFF sent as image/png was scored, 200. Now
only PNG, JPEG and WebP are opened, and a part's declared type must match its bytes: 422
`unsupported_frame_format`, naming the frame (errors.py says why 422 and not 415).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from attack_helpers import assert_serves_normally, multipart, peak_growth, server_errors
from PIL import Image
from service_helpers import RunningServer, publish_model, running_server, solid_png


def encoded(fmt: str, side: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 40, dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("formats")
    publish_model(root / "models", "bright", 1)
    with running_server(root / "models", log_dir=root) as running:
        yield running


def assert_refused(response: httpx.Response, frame: str, *words: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["error"] == "unsupported_frame_format" and error["frame"] == frame, error
    for word in words:
        assert word in error["detail"], error


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF", "ICO", "PPM", "JPEG2000"])
def test_a_format_we_do_not_promise_is_refused_even_as_image_png(server: RunningServer, fmt: str) -> None:
    with peak_growth(server) as grown:
        response = httpx.post(
            f"{server.url}/score", content=encoded(fmt), headers={"Content-Type": "image/png"}, timeout=30
        )
    assert_refused(response, "0", "accepted: PNG, JPEG, WEBP")
    assert grown[0] < 20
    assert_serves_normally(server)


def test_a_part_whose_bytes_are_not_its_declared_type_is_named(server: RunningServer) -> None:
    parts = [("fine.png", solid_png(10), "image/png"), ("liar.png", encoded("JPEG"), "image/png")]
    body, content_type = multipart(parts)
    response = httpx.post(
        f"{server.url}/score", content=body, headers={"Content-Type": content_type}, timeout=30
    )
    assert_refused(response, "liar.png", "declared image/png but the bytes are JPEG")
    # A generic part type does not constrain the format: the same JPEG as octet-stream is scored.
    body, content_type = multipart(
        [("fine.png", solid_png(10), "image/png"), ("any", encoded("JPEG"), "application/octet-stream")]
    )
    response = httpx.post(
        f"{server.url}/score", content=body, headers={"Content-Type": content_type}, timeout=30
    )
    assert response.status_code == 200, response.text


def test_a_tiff_inside_json_is_refused_too(server: RunningServer) -> None:
    frames = [{"key": "tiff", "image": base64.b64encode(encoded("TIFF")).decode()}]
    response = httpx.post(
        f"{server.url}/score",
        content=json.dumps({"frames": frames}),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert_refused(response, "tiff", "not a recognised image format")
    assert not server_errors(server)
