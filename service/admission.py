"""Admission control: an overloaded service says 429 at the start of a request, before reading its body.

Under overload the expensive part of a refused request used to be paid before the refusal: the body
read, parsed and every frame decoded, then the batcher's full queue said 429. Here POST /score is
admitted or refused as soon as its headers are in, by two cheap facts:

- requests already in flight in this worker (admitted, not yet answered) against
  `max_requests_in_flight`, and their bodies' declared sizes (a chunked body counts as the largest
  allowed) against `max_body_bytes_in_flight`: with decoding bounded by the decode threads, this is
  what bounds the worker's memory under any number of clients (docs/security.md, "Limits");
- the frames already queued in the target model's batcher (`Batcher.queued_frames`): when less than one
  batch of room is left, a new request would only wait, then most likely be refused after decoding.

A request that cannot be admitted at once waits, in arrival order and without its body being read
(uvicorn stops reading a connection after 64 KiB), for at most `admission_wait_s`; then it is refused.
The wait is what keeps a storm of clients that retry at once (ignoring Retry-After) from turning the
worker into a machine that only refuses: each waiting request costs nothing, and refusals come at most
once per client per `admission_wait_s`, instead of as fast as the event loop can answer them. At most
`max_requests_waiting` wait; beyond that a request is refused at once.

A refusal is `ErrorBody` `overloaded` (in-flight or waiting limit) or `queue_full`, with
`Retry-After: 1`; the request counter labels it with the `/score` route so the load-shedding alert
(`edgecase:http_429:ratio_rate5m`) sees it. Probes, metrics and the other routes are never refused
here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import OverloadedError, QueueFullError
from service.limits import body_limit, send_error

log = logging.getLogger(__name__)

SCORE_PATH = "/score"


class AdmissionMiddleware:
    """Counts POST /score requests in flight and refuses new ones early when the worker is saturated."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0
        self.body_bytes_in_flight = 0  # declared (or, when chunked, the largest allowed) body sizes
        self._waiters: deque[asyncio.Event] = deque()  # arrival order; the head is admitted next
        self._route: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != SCORE_PATH:
            await self.app(scope, receive, send)
            return
        settings = scope["app"].state.settings
        declared = _content_length(scope)
        reserved = declared if declared is not None else body_limit(settings, scope)
        refusal = self._refusal(scope, reserved)
        if refusal is not None or self._waiters:  # nobody overtakes a waiting request
            refusal = await self._wait_turn(scope, reserved, settings)
        if refusal is not None:
            scope.setdefault("route", self._score_route(scope))  # the request counter's route label
            code, detail = refusal
            await send_error(send, 429, code, detail, retry_after_s=1)
            return
        self.in_flight += 1
        self.body_bytes_in_flight += reserved
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.body_bytes_in_flight -= reserved
            if self._waiters:
                self._waiters[0].set()  # a slot is free: the first in line checks again

    async def _wait_turn(self, scope: Scope, reserved: int, settings: Any) -> tuple[str, str] | None:
        """Wait in line, at most `admission_wait_s`, until admitted (None) or refused (the reason)."""
        if settings.admission_wait_s <= 0:
            return self._refusal(scope, reserved) or _too_many_waiting(len(self._waiters))
        if len(self._waiters) >= settings.max_requests_waiting:
            return _too_many_waiting(len(self._waiters))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.admission_wait_s
        turn = asyncio.Event()
        self._waiters.append(turn)
        refusal: tuple[str, str] | None = None
        try:
            while True:
                at_head = self._waiters[0] is turn
                if at_head:
                    refusal = self._refusal(scope, reserved)
                    if refusal is None:
                        return None
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return refusal or _too_many_waiting(len(self._waiters) - 1)
                turn.clear()
                # Woken when a request finishes (the head) or when the head leaves; the head also looks
                # again every 10 ms, since queue room frees up without any request finishing.
                try:
                    async with asyncio.timeout(min(remaining, 0.01) if at_head else remaining):
                        await turn.wait()
                except TimeoutError:
                    pass
        finally:
            was_head = self._waiters[0] is turn
            self._waiters.remove(turn)
            if was_head and self._waiters:
                self._waiters[0].set()

    def _refusal(self, scope: Scope, reserved: int) -> tuple[str, str] | None:
        """(error code, reason) when the request must be refused now, else None."""
        app_state = scope["app"].state
        limit = app_state.settings.max_requests_in_flight
        if self.in_flight >= limit:
            detail = f"{self.in_flight} requests in flight, the limit is {limit}; retry later"
            return OverloadedError.code, detail
        budget = app_state.settings.max_body_bytes_in_flight
        if self.in_flight and self.body_bytes_in_flight + reserved > budget:
            detail = (
                f"{self.body_bytes_in_flight:,} body bytes in flight, {reserved:,} more would pass the limit "
                f"of {budget:,}; retry later"
            )
            return OverloadedError.code, detail
        pool = getattr(app_state, "pool", None)
        if pool is None or not pool.ready:
            return None  # /score answers 503 itself while models load
        name = _query_model(scope) or pool.default_name
        serving = pool.serving().get(name) if name else None
        if serving is None:
            return None  # unknown model: the route answers 404
        batcher = serving.batcher
        if batcher.max_queue_frames - batcher.queued_frames < batcher.max_batch_size:
            return (
                QueueFullError.code,
                f"model {batcher.name} version {batcher.version}: {batcher.queued_frames} frames queued, "
                f"less than a batch of room under the limit of {batcher.max_queue_frames}; retry later",
            )
        return None

    def _score_route(self, scope: Scope) -> Any:
        if self._route is None:
            router = scope["app"].router
            self._route = next((r for r in router.routes if getattr(r, "path", None) == SCORE_PATH), None)
        return self._route


def _too_many_waiting(waiting: int) -> tuple[str, str]:
    return OverloadedError.code, f"{waiting} requests already waiting for admission; retry later"


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _query_model(scope: Scope) -> str | None:
    """`?model=` from the raw query string (the route has not parsed it yet)."""
    query = scope.get("query_string", b"")
    if b"model=" not in query:
        return None
    values = parse_qs(query.decode("latin-1")).get("model")
    return values[0] if values else None
