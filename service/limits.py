"""Every request body is bounded in size and in time while it streams in: one pure-ASGI middleware.

Limits (all in `Settings`): POST /score may send `max_body_bytes` (`max_json_body_bytes` when it is
JSON), every other route `max_other_body_bytes`; the whole body must arrive within `body_timeout_s` of
the request's start. A declared Content-Length over the limit is answered 413 at once, before the app
(or its API-key check) runs and before a byte of the body is read; a chunked or lying body is cut off
as soon as the bytes received cross the limit, so memory never holds more than the limit.

Errors raised while the body streams are Starlette `HTTPException`s, because FastAPI re-raises those
from its own body parsing (anything else there becomes "400 error parsing the body"); the app's error
handlers render them as `ErrorBody` (`too_large`, `request_timeout`). A client that disconnects before
its body is complete is logged at info and answered 499 (nginx's "client closed request"): uvicorn
drops a response to a closed connection, but the request counter sees a 4xx, so a flaky uplink does
not page anyone through the high-5xx alert.

Pure ASGI (not `BaseHTTPMiddleware`): the body is never buffered here, only counted and timed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLargeError
from service.request_context import current_request_id
from service.settings import Settings

log = logging.getLogger(__name__)

SCORE_PATH = "/score"
JSON = b"application/json"
CLIENT_CLOSED_REQUEST = 499


def body_limit(settings: Settings, scope: Scope) -> int:
    """The body limit in bytes for this request: scoring gets the large one, JSON scoring its own."""
    if scope["method"] != "POST" or scope["path"] != SCORE_PATH:
        return settings.max_other_body_bytes
    content_type = _header(scope, b"content-type") or b""
    if content_type.split(b";")[0].strip().lower() == JSON:
        return settings.max_json_body_bytes
    return settings.max_body_bytes


async def send_error(
    send: Send, status: int, code: str, detail: str, *, retry_after_s: int | None = None
) -> None:
    """An `ErrorBody` answer (error, detail) as two raw ASGI messages: refusals under overload must be
    cheap, and this takes a third of the time `JSONResponse` + pydantic take (10 us against 30). The
    request id (set by the outer `RequestContextMiddleware`) is in the body, as in every other error."""
    fields = {"error": code, "detail": detail}
    request_id = current_request_id()
    if request_id is not None:
        fields["request_id"] = request_id
    body = json.dumps(fields).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


class BodyLimitMiddleware:
    """Size and time limits on every request body, enforced while it streams (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings: Settings = scope["app"].state.settings
        limit = body_limit(settings, scope)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            detail = f"body is {int(declared):,} bytes; the limit for {scope['path']} is {limit:,}"
            await send_error(send, 413, PayloadTooLargeError.code, detail)
            return
        deadline = time.monotonic() + settings.body_timeout_s
        received = 0
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body: waiting for a disconnect is the app's business, no deadline
                return await receive()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    message = await receive()
            except TimeoutError:
                log.info("%s: body not received within %g s", scope["path"], settings.body_timeout_s)
                raise HTTPException(
                    408, f"the request body did not arrive within {settings.body_timeout_s:g} s"
                ) from None
            if message["type"] == "http.disconnect":
                complete = True
                log.info(
                    "%s %s: client disconnected after %d body bytes", scope["method"], scope["path"], received
                )
                raise HTTPException(CLIENT_CLOSED_REQUEST, "client disconnected before its body was received")
            received += len(message.get("body", b""))
            if received > limit:
                complete = True
                raise HTTPException(
                    413, f"body exceeds the limit of {limit:,} bytes for {scope['method']} {scope['path']}"
                )
            complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)
