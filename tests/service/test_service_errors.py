"""Bad input gets a 4xx with a reason, never a 500: one test per error code of the error table.

The server here has small limits (4 frames, 300 kB bodies, 250,000 pixels per frame) so the limits
can be hit cheaply. Every error body has the same shape: {"error", "detail", "frame"?}.
"""

from __future__ import annotations

import base64
import io
import json
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import RunningServer, publish_model, running_server, solid_png

LIMITS = {"max_frames_per_request": 4, "max_body_bytes": 300_000, "max_pixels_per_frame": 250_000}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("errors")
    publish_model(root / "models", "bright", 1)
    with running_server(root / "models", LIMITS, log_dir=root) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"error", "detail", "frame", "request_id"} and body["error"] == code, body
    assert body["request_id"] == response.headers["X-Request-ID"], "errors name their request"
    for word in words:
        assert word in body["detail"], body
    return body


def test_a_corrupt_frame_is_422_and_named(client: httpx.Client) -> None:
    files = [("files", ("ok.png", solid_png(10))), ("files", ("broken.png", b"\x89PNG\r\n\x1a\nnot really"))]
    body = assert_error(client.post("/score", files=files), 422, "corrupt_frame", "broken.png")
    assert body["frame"] == "broken.png"


def test_a_truncated_png_is_422_not_padded_with_grey(client: httpx.Client) -> None:
    png = solid_png(10, size=64)
    response = client.post("/score", content=png[: len(png) // 2], headers={"Content-Type": "image/png"})
    assert_error(response, 422, "corrupt_frame", "'0'")


def test_bad_base64_in_json_names_the_frame(client: httpx.Client) -> None:
    frames = [
        {"key": "good", "image": base64.b64encode(solid_png(1)).decode()},
        {"key": "cam7", "image": "%%%"},
    ]
    body = assert_error(
        client.post("/score", json={"frames": frames}), 422, "corrupt_frame", "cam7", "base64"
    )
    assert body["frame"] == "cam7"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (json.dumps({"images": []}).encode(), "frames"),
        (json.dumps({"frames": []}).encode(), "frames"),
        (json.dumps({"frames": [{"key": "a"}]}).encode(), "image"),
        (json.dumps([1, 2]).encode(), "schema"),
    ],
)
def test_json_that_does_not_match_the_schema_is_422(client: httpx.Client, body: bytes, reason: str) -> None:
    response = client.post("/score", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 422, "bad_request", reason)


def test_multipart_without_files_parts_is_422(client: httpx.Client) -> None:
    response = client.post("/score", data={"image": "x"}, files=[("other", ("a.png", solid_png(1)))])
    assert_error(response, 422, "bad_request", "'files'")


@pytest.mark.parametrize("version", ["abc", "0", "-3"])
def test_a_malformed_query_is_422(client: httpx.Client, version: str) -> None:
    response = client.post(
        "/score", params={"version": version}, content=solid_png(1), headers={"Content-Type": "image/png"}
    )
    assert_error(response, 422, "invalid_request", "version")


def test_a_body_over_the_limit_is_413(client: httpx.Client) -> None:
    response = client.post("/score", content=b"\0" * 400_000, headers={"Content-Type": "image/png"})
    assert_error(response, 413, "too_large", "300,000")


def test_a_chunked_body_without_length_is_cut_off_at_the_limit_too(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(50):
            yield b"\0" * 10_000

    response = client.post("/score", content=chunks(), headers={"Content-Type": "image/png"})
    assert_error(response, 413, "too_large", "300,000")


def test_too_many_frames_is_413(client: httpx.Client) -> None:
    files = [("files", (f"{i}.png", solid_png(i))) for i in range(5)]
    assert_error(client.post("/score", files=files), 413, "too_large", "5 frames", "limit is 4")


def test_a_decompression_bomb_is_413_before_its_pixels_are_decoded(client: httpx.Client) -> None:
    # A 10,000 x 10,000 grey PNG whose compressed data is tiny: the header alone gives it away.
    width = height = 10_000
    raw = zlib.compress(b"".join(b"\0" + b"\0" * width for _ in range(64)), 9)
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    files = [("files", ("fine.png", solid_png(3))), ("files", ("bomb.png", bomb))]
    body = assert_error(client.post("/score", files=files), 413, "too_large", "bomb.png", "100,000,000")
    assert body["frame"] == "bomb.png"


def test_a_frame_just_under_the_pixel_limit_is_accepted(client: httpx.Client) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((500, 500, 3), dtype=np.uint8)).save(buffer, format="PNG")
    response = client.post("/score", content=buffer.getvalue(), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("content_type", ["text/plain", "image/gif", "application/octet-stream", None])
def test_an_unsupported_content_type_is_415(client: httpx.Client, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/score", content=solid_png(1), headers=headers)
    assert_error(response, 415, "unsupported_media_type", "multipart/form-data")


def test_an_unknown_model_or_version_is_404(client: httpx.Client) -> None:
    png = {"content": solid_png(1), "headers": {"Content-Type": "image/png"}}
    assert_error(
        client.post("/score", params={"model": "nope"}, **png), 404, "unknown_model", "nope", "bright"
    )
    assert_error(client.post("/score", params={"version": 7}, **png), 404, "unknown_model", "no version 7")


def test_unknown_routes_and_methods_answer_in_the_same_shape(client: httpx.Client) -> None:
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.get("/score"), 405, "method_not_allowed")


def test_after_all_that_the_server_logged_no_unhandled_error(
    server: RunningServer, client: httpx.Client
) -> None:
    assert client.get("/readyz").status_code == 200
    assert "Traceback" not in server.log()
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics
