"""The FastAPI app factory: `create_app(settings)` builds routes; the lifespan builds every resource.

Nothing is created at import. At startup the lifespan makes the metrics, the model registry and pool,
and the flagged store, then loads and warms the models *in the background*: `/healthz` answers at once,
`/readyz` answers 503 until the default model is warm; `/score` waits for that startup load (at most
`startup_wait_s`, then 503), since with several workers a ready worker may have answered the readiness
probe while this one still warms up. A poller then looks for new versions
every `reload_poll_s` seconds (`POST /admin/reload` does the same on demand). On shutdown, queued
requests finish before the worker threads stop.

Run it with `edgecase serve` or `uvicorn service.app:create_app --factory`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgecase import __version__
from service.admission import AdmissionMiddleware
from service.decoding import ScoreJSONRequest
from service.errors import install_error_handlers
from service.keys import ApiKey, check_exposure, is_loopback, load_keys
from service.limits import BodyLimitMiddleware
from service.logs import configure_service_logging
from service.metrics import Metrics, mark_process_dead
from service.pool import ModelPool
from service.registry import ModelRegistry
from service.request_context import RequestContextMiddleware
from service.routes import ops, score
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; resources come later, in the lifespan. Settings default to the environment."""
    settings = settings or get_settings()
    app = FastAPI(
        title="edgecase scoring service",
        version=__version__,
        summary="Score driving frames with generative models; keep the rare ones.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    # Fail closed at startup, not per request: bad key settings, or no keys on a network address.
    app.state.api_keys = load_keys(settings)
    check_exposure(settings, app.state.api_keys)
    install_error_handlers(app)
    # Starlette runs the last added first: metrics see every answer, then body limits, then admission.
    app.add_middleware(AdmissionMiddleware)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(RequestMetricsMiddleware)
    # Added last, so outermost of ours: every response, rejections by inner middlewares included,
    # carries X-Request-ID and every log line of the request has its id.
    app.add_middleware(RequestContextMiddleware)
    app.include_router(ops.router)
    app.include_router(score.router)
    _include_flagged_routes(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _include_flagged_routes(app: FastAPI) -> None:
    try:
        from service.routes import flagged
    except ModuleNotFoundError as exc:
        if exc.name != "service.routes.flagged":
            raise
        log.warning("service.routes.flagged is not installed: no /flagged routes")
        return
    app.include_router(flagged.router)  # the router carries its `review` scope (service/routes/flagged.py)


def _open_store(settings: Settings) -> Any:
    try:
        from service.flag_store import open_flag_store
    except ModuleNotFoundError as exc:
        if exc.name != "service.flag_store":
            raise
        log.warning("service.flag_store is not installed: edge cases are scored but not stored")
        return None
    store = open_flag_store(settings)  # SQLite + files, or PostgreSQL + object store (flagged_url)
    log.info("flagged store: %s", store.location)
    return store


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    configure_service_logging(settings.log_format, settings.log_level)
    _log_access(settings, app.state.api_keys)
    metrics = Metrics()
    registry = ModelRegistry(
        settings.repo,
        providers=settings.providers,
        intra_op_threads=settings.intra_op_threads,
        warmup_batch_sizes=settings.warmup_batch_sizes,
    )
    log.info("onnxruntime execution providers: %s (repo %s)", ", ".join(registry.providers), settings.repo)
    pool = ModelPool(registry, settings, metrics)
    store = _open_store(settings)
    app.state.metrics, app.state.pool, app.state.store = metrics, pool, store
    # Frames decode here, not in asyncio's default pool: memory is one full-size frame per thread.
    app.state.decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
    background = asyncio.create_task(_load_then_poll(pool, settings.reload_poll_s), name="model-loader")
    upkeep = None
    if store is not None:
        from service.store_upkeep import tend_store

        upkeep = asyncio.create_task(
            tend_store(store, metrics, settings.flagged_retention_poll_s), name="flagged-store-upkeep"
        )
    try:
        yield
    finally:
        for task in (background, upkeep):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await pool.close()
        app.state.decoder.shutdown(wait=True)
        if store is not None:
            store.close()
        mark_process_dead()


async def _load_then_poll(pool: ModelPool, every_s: float) -> None:
    """Load and warm at startup (off the critical path of /healthz), then poll for new versions."""
    try:
        await pool.start()
    except Exception:
        log.exception("loading models failed; will retry on the next poll")
    if every_s <= 0:
        return
    while True:
        await asyncio.sleep(every_s)
        try:
            await pool.refresh()
        except Exception:  # a poll must never kill the poller
            log.exception("model refresh failed; the current versions keep serving")


def _log_access(settings: Settings, keys: tuple[ApiKey, ...]) -> None:
    """Say at startup who may call what: the keys' scopes (never the tokens), or that it is open."""
    if keys:
        log.info("API keys: %d (%s)", len(keys), ", ".join(key.describe() for key in keys))
    elif is_loopback(settings.host):
        log.info("no API keys: open to clients on this machine only (%s)", settings.host)
    else:
        log.warning("no API keys, --insecure: anyone who can reach %s may score and relabel", settings.host)


class RequestMetricsMiddleware:
    """Counts requests by route template and status and times them (pure ASGI: streams untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            metrics: Metrics | None = getattr(scope["app"].state, "metrics", None)
            if metrics is not None:
                # The route template (/flagged/{id}/image), never the raw path: labels stay few.
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                method = scope["method"]
                metrics.requests.labels(route=route, method=method, status=str(status)).inc()
                metrics.request_latency.labels(route=route, method=method).observe(
                    time.perf_counter() - started
                )


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's spec plus the JSON request schema, which /score declares by hand (three body types)."""
    if app.openapi_schema is None:
        spec = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
        )
        schema = ScoreJSONRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        components.update(schema.pop("$defs", {}))
        components["ScoreJSONRequest"] = schema
        if not app.state.api_keys:
            _drop_security(spec)  # keys off: no route needs a token, so the spec must not demand one
        app.openapi_schema = spec
    return app.openapi_schema


def _drop_security(spec: dict[str, Any]) -> None:
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict):
                operation.pop("security", None)
                operation.get("responses", {}).pop("401", None)
                operation.get("responses", {}).pop("403", None)
    spec.get("components", {}).pop("securitySchemes", None)
