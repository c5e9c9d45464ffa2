"""Attack: JSON bodies built to be expensive to parse: millions of tiny items, deep nesting, garbage.

Before, two million `{"image": ""}` items (26 MB) were parsed and validated in full before the
256-frame limit was checked (12 s, 1.7 GB, /healthz slowed), and deeply nested JSON raised
RecursionError: a 500. Now the frame count is bounded while parsing (the parser stops at the limit)
and every malformed body is a 4xx with a reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from attack_helpers import assert_serves_normally, peak_growth, server_errors
from service_helpers import RunningServer, publish_model, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("jsonflood")
    publish_model(root / "models", "bright", 1)
    with running_server(root / "models", log_dir=root) as running:
        yield running


def post_json(server: RunningServer, body: bytes, path: str = "/score") -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=60
    )


def test_millions_of_tiny_items_stop_at_the_frame_limit(server: RunningServer) -> None:
    body = b'{"frames": [' + b",".join([b'{"image": ""}'] * 2_000_000) + b"]}"
    assert len(body) > 26_000_000
    with peak_growth(server) as grown:
        started = time.monotonic()
        response = post_json(server, body)
        took = time.monotonic() - started
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "too_large" and "256 frames" in response.json()["detail"]
    # The body itself is held once (28 MB, plus the chunks it arrived in); its items are not built.
    assert grown[0] < 150, f"server peak RSS grew by {grown[0]:.0f} MB"
    assert took < 10, f"{took:.1f} s to refuse"
    assert_serves_normally(server)


@pytest.mark.parametrize("path", ["/score", "/flagged/1/review"])
def test_deeply_nested_json_is_a_4xx_not_a_500(server: RunningServer, path: str) -> None:
    for body in (b"[" * 200_000 + b"]" * 200_000, b'{"frames": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        response = post_json(server, body, path)
        assert response.status_code in (413, 422), response.text
        assert response.json()["error"] in ("bad_request", "invalid_request", "too_large")
    assert not server_errors(server), server_errors(server)
    assert_serves_normally(server)


@pytest.mark.parametrize(
    "body",
    [b"{", b'{"frames": [}', b"\xff\xfe", b'{"frames": 1}', b'{"frames": [[]]}', b"[]", b'"frames"'],
)
def test_malformed_json_is_a_422_with_a_reason(server: RunningServer, body: bytes) -> None:
    response = post_json(server, body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]
