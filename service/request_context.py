"""The request id: read from `X-Request-ID` (or made), returned on every response, in every log line.

`RequestContextMiddleware` is a pure ASGI middleware, not Starlette's `BaseHTTPMiddleware`, which
would buffer streaming responses and add a task hop to every request. It puts a `RequestContext`
in a context variable for the request's task; `service.logs` copies it into every log record, the
scorer notes the model and version that answered, the batcher records the id of each request in a
batch, and `service.errors.error_response` puts it in error bodies and headers. It also writes the
access log line (method, route template, status, duration), which is why `edgecase serve` turns
uvicorn's own access log off.

The context variable is reset when the request completes, except when an exception leaves the app:
Starlette's outermost `ServerErrorMiddleware` answers it only after it has left this middleware and
must still see the id (uvicorn runs each request in its own task, so nothing leaks to the next one).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is kept when it is short and plain (no spaces, quotes or newlines: it goes into log
# lines and headers verbatim); anything else is replaced by a fresh one.
_ACCEPTABLE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# Probes and scrapes arrive every few seconds; their access lines are DEBUG, traffic is INFO.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})

access_log = logging.getLogger("service.access")


@dataclass
class RequestContext:
    """What log lines of one request share; model and version are known once the scorer resolves."""

    request_id: str
    model: str | None = None
    version: int | None = None


_current: ContextVar[RequestContext | None] = ContextVar("edgecase_request", default=None)


def current_context() -> RequestContext | None:
    """The request being served by this task (None outside a request, e.g. in the batcher's loop)."""
    return _current.get()


def current_request_id() -> str | None:
    context = _current.get()
    return context.request_id if context is not None else None


def note_model(model: str, version: int) -> None:
    """Record which model version answers the current request (shows in its later log lines)."""
    context = _current.get()
    if context is not None:
        context.model, context.version = model, version


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when acceptable, else a new random one (32 hex digits)."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1").strip()
            if _ACCEPTABLE_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Sets the request context, adds X-Request-ID to the response, logs one access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = RequestContext(request_id_from(scope.get("headers", [])))
        token = _current.set(context)
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in headers:  # error_response may have set it already
                    headers.append(REQUEST_ID_HEADER, context.request_id)
            await send(message)

        completed = False
        try:
            await self.app(scope, receive, send_with_id)
            completed = True
        finally:
            duration = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            level = logging.DEBUG if route in QUIET_ROUTES and status < 500 else logging.INFO
            access_log.log(
                level,
                '"%s %s" %d %.1f ms',
                scope["method"],
                scope["path"],
                status,
                duration * 1000,
                extra={"method": scope["method"], "route": route, "status": status, "duration": duration},
            )
            if completed:
                _current.reset(token)
