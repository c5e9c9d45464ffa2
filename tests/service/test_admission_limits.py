"""AdmissionMiddleware and BodyLimitMiddleware as ASGI components, driven directly (no server): the
rules themselves, deterministic, in milliseconds. The attack modules test them through uvicorn."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from service.admission import AdmissionMiddleware
from service.limits import BodyLimitMiddleware
from service.settings import Settings


def scope_for(settings: Settings, path: str = "/score", headers: dict[str, str] | None = None) -> Scope:
    app = SimpleNamespace(state=SimpleNamespace(settings=settings), router=SimpleNamespace(routes=[]))
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http", "method": "POST", "path": path, "headers": raw, "query_string": b"", "app": app}


class Held:
    """An inner app that answers 200 only when released: a request in flight."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def call(app: Any, scope: Scope, messages: list[Message] | None = None) -> list[Message]:
    sent: list[Message] = []
    queue = list(messages or [{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def status_of(sent: list[Message]) -> tuple[int, dict[str, Any]]:
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], (json.loads(body) if body else {})


def test_without_a_wait_requests_over_the_in_flight_limit_get_429_at_once() -> None:
    async def scenario() -> None:
        held = Held()
        admission = AdmissionMiddleware(held)
        settings = Settings(max_requests_in_flight=2, admission_wait_s=0)
        first = asyncio.create_task(call(admission, scope_for(settings)))
        second = asyncio.create_task(call(admission, scope_for(settings)))
        await asyncio.sleep(0.01)
        assert admission.in_flight == 2
        status, body = status_of(await call(admission, scope_for(settings)))
        assert status == 429 and body["error"] == "overloaded" and "2 requests in flight" in body["detail"]
        held.release.set()
        assert status_of(await first)[0] == status_of(await second)[0] == 200
        assert admission.in_flight == 0 and admission.body_bytes_in_flight == 0
        # Other routes and probes are never counted nor refused.
        held.release.clear()
        probe = asyncio.create_task(call(admission, scope_for(settings, "/healthz")))
        await asyncio.sleep(0.01)
        assert admission.in_flight == 0
        held.release.set()
        await probe

    asyncio.run(scenario())


def test_the_sum_of_body_sizes_in_flight_is_bounded() -> None:
    async def scenario() -> None:
        held = Held()
        admission = AdmissionMiddleware(held)
        settings = Settings(max_body_bytes_in_flight=10_000_000, max_body_bytes=8_000_000, admission_wait_s=0)
        big = {"Content-Length": "6000000", "Content-Type": "image/png"}
        first = asyncio.create_task(call(admission, scope_for(settings, headers=big)))
        await asyncio.sleep(0.01)
        status, body = status_of(await call(admission, scope_for(settings, headers=big)))
        assert status == 429 and "body bytes in flight" in body["detail"], body
        small = {"Content-Length": "1000000", "Content-Type": "image/png"}
        held.release.set()
        assert status_of(await call(admission, scope_for(settings, headers=small)))[0] == 200
        await first
        # Alone, a request is admitted whatever its size (its own limit is the body limit's job).
        held.release.clear()
        only = asyncio.create_task(
            call(admission, scope_for(settings, headers={"Content-Length": "20000000"}))
        )
        await asyncio.sleep(0.01)
        assert admission.in_flight == 1
        held.release.set()
        assert status_of(await only)[0] == 200

    asyncio.run(scenario())


def test_waiting_requests_are_admitted_in_arrival_order_or_refused_at_their_deadline() -> None:
    async def scenario() -> None:
        order: list[str] = []

        class Recording(Held):
            async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
                order.append(scope.get("name", "?"))
                await super().__call__(scope, receive, send)

        held = Recording()
        admission = AdmissionMiddleware(held)
        settings = Settings(max_requests_in_flight=1, admission_wait_s=5.0, max_requests_waiting=2)

        def named(name: str) -> Scope:
            return scope_for(settings) | {"name": name}

        first = asyncio.create_task(call(admission, named("first")))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(call(admission, named("second")))
        await asyncio.sleep(0.01)
        third = asyncio.create_task(call(admission, named("third")))
        await asyncio.sleep(0.01)
        # A fourth finds two already waiting: refused at once, without waiting.
        status, body = status_of(await call(admission, named("fourth")))
        assert status == 429 and "2 requests already waiting" in body["detail"], body
        assert order == ["first"]
        held.release.set()  # each request, once admitted, finishes at once: the line moves in order
        assert [status_of(await t)[0] for t in (first, second, third)] == [200, 200, 200]
        assert order == ["first", "second", "third"]

        # A request that cannot be admitted within admission_wait_s is refused when it passes.
        held.release.clear()
        short = Settings(max_requests_in_flight=1, admission_wait_s=0.2)
        blocker = asyncio.create_task(call(admission, scope_for(short)))
        await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        status, body = status_of(await call(admission, scope_for(short)))
        waited = asyncio.get_running_loop().time() - started
        assert status == 429 and body["error"] == "overloaded" and 0.15 < waited < 5, (body, waited)
        held.release.set()
        await blocker
        assert admission.in_flight == 0 and not admission._waiters

    asyncio.run(scenario())


class Reader:
    """An inner app that reads its whole body, as a route does."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(
    ("path", "content_type", "limit"),
    [
        ("/score", "image/png", 5000),
        ("/score", "application/json", 3 * 1024),
        ("/flagged/1/review", "application/json", 1000),
    ],
)
def test_each_route_has_its_body_limit_while_streaming(path: str, content_type: str, limit: int) -> None:
    settings = Settings(
        max_body_bytes=5000, max_other_body_bytes=1000, json_bytes_per_frame=1024, max_frames_per_request=3
    )
    assert settings.max_json_body_bytes == 3 * 1024
    limits = BodyLimitMiddleware(Reader())
    headers = {"Content-Type": content_type}
    # Declared too large: refused before anything is read.
    declared = scope_for(settings, path, headers | {"Content-Length": str(limit + 1)})
    status, body = status_of(asyncio.run(call(limits, declared, [])))
    assert status == 413 and body["error"] == "too_large"
    # Streamed: fine up to the limit, refused one byte past it.
    chunks = [{"type": "http.request", "body": b"x" * (limit // 2), "more_body": True}] * 2
    done = [{"type": "http.request", "body": b"", "more_body": False}]
    assert status_of(asyncio.run(call(limits, scope_for(settings, path, headers), chunks + done)))[0] == 200
    over = chunks + [{"type": "http.request", "body": b"x", "more_body": False}]
    with pytest.raises(HTTPException) as raised:
        asyncio.run(call(limits, scope_for(settings, path, headers), over))
    assert raised.value.status_code == 413


def test_a_disconnect_or_a_stall_while_streaming_is_a_4xx() -> None:
    settings = Settings(body_timeout_s=0.2)
    limits = BodyLimitMiddleware(Reader())
    part = {"type": "http.request", "body": b"x", "more_body": True}
    with pytest.raises(HTTPException) as raised:
        asyncio.run(call(limits, scope_for(settings), [part, {"type": "http.disconnect"}]))
    assert raised.value.status_code == 499
    with pytest.raises(HTTPException) as raised:
        asyncio.run(call(limits, scope_for(settings), [part]))  # then nothing: the body stalls
    assert raised.value.status_code == 408
