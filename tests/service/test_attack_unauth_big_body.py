"""Attack: a huge body sent to a route that needs a key, without one.

Before, only /score had a body limit: an 800 MB body to POST /flagged/1/review was read in full (1.7 GB
resident) and then answered 422. Now every route's body is bounded while it streams: a declared
Content-Length over the limit is refused before a byte is read, a chunked body as soon as it crosses
the limit, and neither the key check nor FastAPI's body parsing ever sees more than the limit.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from attack_helpers import (
    MB,
    assert_serves_normally,
    chunked,
    peak_growth,
    request_head,
    send_streaming,
)
from service_helpers import RunningServer, publish_model, running_server

SENT = 256 * MB  # scaled down from 800 MB: still far more than the limits, and the memory they bound
CHUNK = b"x" * (256 * 1024)
KEY = "the-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("bigbody")
    publish_model(root / "models", "bright", 1)
    settings = {"api_keys": [KEY], "max_other_body_bytes": MB, "max_body_bytes": 8 * MB}
    with running_server(root / "models", settings, log_dir=root) as running:
        yield running


def body() -> Iterator[bytes]:
    for _ in range(SENT // len(CHUNK)):
        yield CHUNK


@pytest.mark.parametrize("path", ["/flagged/1/review", "/score"])
def test_a_declared_huge_body_is_refused_before_it_is_read(server: RunningServer, path: str) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": str(SENT)}
    with peak_growth(server) as grown:
        answer = send_streaming(server.port, request_head("POST", path, headers, server.port), body())
    assert answer.status in (413, 401), answer.head
    assert answer.status == 413 and b'"too_large"' in answer.body, answer.body
    assert answer.sent < 64 * MB, f"the client could push {answer.sent / MB:.0f} MB before the answer"
    assert grown[0] < 20, f"server peak RSS grew by {grown[0]:.0f} MB"
    assert_serves_normally(server, KEY)


@pytest.mark.parametrize("path", ["/flagged/1/review", "/score"])
def test_a_chunked_huge_body_is_cut_off_at_the_limit(server: RunningServer, path: str) -> None:
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    with peak_growth(server) as grown:
        answer = send_streaming(
            server.port, request_head("POST", path, headers, server.port), chunked(body())
        )
    assert answer.status in (413, 401), answer.head
    assert answer.sent < 64 * MB, f"the client could push {answer.sent / MB:.0f} MB before the answer"
    assert grown[0] < 40, f"server peak RSS grew by {grown[0]:.0f} MB"
    assert_serves_normally(server, KEY)
