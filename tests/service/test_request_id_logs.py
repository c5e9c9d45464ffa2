"""Logs you can follow: with EDGECASE_LOG_FORMAT=json every line is one JSON object, X-Request-ID is
read from the request (or made) and returned on every response, errors included, and every log line of a
request carries its id: the access line, the batcher's line for the batch that scored it.

The end-to-end test runs `edgecase serve` (the path that hands our logging config to uvicorn) on
loopback and parses its stderr; the others check the pieces in-process.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path
from typing import Any

import httpx
from service_helpers import publish_model, running_server, solid_png, wait_until

from service.app import create_app
from service.logs import JsonLineFormatter, RequestContextFilter, TextFormatter
from service.request_context import current_request_id, request_id_from
from service.settings import Settings

JSON_FIELDS = {"time", "level", "logger", "message", "request_id", "model", "version"}


def parse_lines(text: str) -> list[dict[str, Any]]:
    """Every line of the server's output as JSON (fails on a line that is not one object)."""
    records = []
    for line in text.splitlines():
        if line.strip():
            record = json.loads(line)
            assert isinstance(record, dict) and set(record) >= JSON_FIELDS, line
            records.append(record)
    return records


def lines_of(records: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [r for r in records if request_id in (r["request_id"], *r.get("request_ids", []))]


def test_json_logs_follow_a_request_from_access_line_to_batch(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, size=8, threshold=0.5)
    settings = {"default_model": "bright", "log_format": "json", "log_level": "debug"}
    with running_server(repo, settings, via_cli=True, log_dir=tmp_path) as server:
        with server.client() as http:
            ok = http.post(
                "/score",
                files=[("files", ("bright.png", solid_png(230), "image/png"))],
                headers={"X-Request-ID": "trip-42.frame:7"},
            )
            bad = http.post(
                "/score",
                files=[("files", ("broken.png", b"not an image", "image/png"))],
                headers={"X-Request-ID": "trip-42.frame:8"},
            )
            unnamed = http.get("/flagged/999999")
            spoofed = http.get("/healthz", headers={"X-Request-ID": 'evil" id with spaces'})

        assert ok.status_code == 200 and ok.headers["X-Request-ID"] == "trip-42.frame:7"
        assert ok.json()["results"][0]["is_edge_case"] is True
        # Errors carry the id too, in the header and in the body.
        assert bad.status_code == 422 and bad.headers["X-Request-ID"] == "trip-42.frame:8"
        assert bad.json() | {"request_id": "trip-42.frame:8"} == bad.json()
        assert bad.json()["error"] == "unsupported_frame_format"  # not PNG, JPEG or WebP
        # Without an id, one is made, and it is the same in header and body.
        made = unnamed.headers["X-Request-ID"]
        assert unnamed.status_code == 404 and len(made) == 32 and unnamed.json()["request_id"] == made
        # An id unfit for a log line or a header is replaced, not echoed.
        assert spoofed.status_code == 200 and " " not in spoofed.headers["X-Request-ID"]

        def access_lines_written() -> bool:
            records = parse_lines(server.log())
            return {"trip-42.frame:7", "trip-42.frame:8", made} <= {
                r["request_id"] for r in records if r["logger"] == "service.access"
            }

        assert wait_until(access_lines_written, timeout=20), server.log()

    records = parse_lines(server.log())
    assert any(r["logger"].startswith("uvicorn") for r in records), "uvicorn's own lines are JSON too"

    scored = lines_of(records, "trip-42.frame:7")
    (access,) = [r for r in scored if r["logger"] == "service.access"]
    assert access["method"] == "POST" and access["route"] == "/score" and access["status"] == 200
    assert 0 < access["duration"] < 30 and access["level"] == "INFO"
    assert access["model"] == "bright" and access["version"] == 1
    (batch,) = [r for r in scored if r["logger"] == "service.batcher"]
    assert batch["request_ids"] == ["trip-42.frame:7"] and batch["model"] == "bright"
    assert all(r["time"].endswith("+00:00") for r in scored)

    failed = lines_of(records, "trip-42.frame:8")
    assert [r["status"] for r in failed if r["logger"] == "service.access"] == [422]
    assert not any(r["logger"] == "service.batcher" for r in failed), "a frame that never decoded"
    # No line of one request carries another request's id.
    assert not set(map(id, scored)) & set(map(id, failed))


def test_an_unhandled_exception_still_answers_with_the_request_id() -> None:
    """A bug (not a ServiceError) is answered by Starlette's outermost middleware, outside ours."""
    app = create_app(Settings())

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom", headers={"X-Request-ID": "bug-1"})

    response = asyncio.run(get())
    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == "bug-1"
    assert response.json()["error"] == "internal_error" and response.json()["request_id"] == "bug-1"


def test_a_served_request_leaves_no_id_behind() -> None:
    """httpx's ASGI transport runs the app in the caller's task: later lines there must not inherit it."""
    app = create_app(Settings())

    async def get_then_look() -> tuple[httpx.Response, str | None]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/healthz", headers={"X-Request-ID": "done-1"})
        return response, current_request_id()

    response, left_behind = asyncio.run(get_then_look())
    assert response.headers["X-Request-ID"] == "done-1" and left_behind is None


def test_a_client_id_is_kept_only_when_it_is_plain() -> None:
    assert request_id_from([(b"x-request-id", b"4bf92f3577b34da6a3ce929d0e0e4736")]) == (
        "4bf92f3577b34da6a3ce929d0e0e4736"
    )
    assert request_id_from([(b"X-Request-ID", b"  job/17:frame@3  ")]) == "job/17:frame@3"
    for unfit in (b"", b"a b", b"x" * 129, b'a"b', b"line\nbreak"):
        made = request_id_from([(b"x-request-id", unfit)])
        assert made != unfit.decode("latin-1") and len(made) == 32
    assert request_id_from([]) != request_id_from([])


def test_both_formats_show_the_batch_request_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    logger = logging.getLogger("test_request_id_logs.batch")
    logger.propagate = False
    logger.addHandler(handler)
    extra = {"model": "vae", "version": 3, "request_ids": ["a", "b"]}
    try:
        handler.setFormatter(JsonLineFormatter())
        logger.warning("scored %d", 2, extra=extra)
        handler.setFormatter(TextFormatter())
        logger.warning("scored %d", 2, extra=extra)
    finally:
        logger.removeHandler(handler)
    json_line, text_line = stream.getvalue().splitlines()
    record = json.loads(json_line)
    assert record["message"] == "scored 2" and record["level"] == "WARNING"
    assert record["request_id"] is None and record["request_ids"] == ["a", "b"] and record["version"] == 3
    assert text_line.endswith("scored 2 [request_ids=a,b model=vae version=3]")
