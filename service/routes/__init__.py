"""HTTP routes, kept thin: parse, call the pool/scorer, answer. State comes through these dependencies.

Each dependency reads what the lifespan put on `app.state`, so tests can swap any of them with
`app.dependency_overrides` and nothing is created at import time. They are `async def` although they
never await: FastAPI runs plain `def` dependencies in its thread pool, a hop per dependency per request.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from service.errors import NotReadyError
from service.metrics import Metrics
from service.pool import ModelPool
from service.settings import Settings


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_pool(request: Request) -> ModelPool:
    pool = getattr(request.app.state, "pool", None)
    if pool is None:
        raise NotReadyError("the service is starting")
    return pool  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> Metrics:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is None:
        raise NotReadyError("the service is starting")
    return metrics  # type: ignore[no-any-return]


async def get_store(request: Request) -> Any:
    """The flagged-frame store (a FlagStore), or None when service.flag_store is not installed."""
    return getattr(request.app.state, "store", None)
