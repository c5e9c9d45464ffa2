"""Keeping the flagged store bounded and measured while the service runs.

Every ``flagged_retention_poll_s`` seconds each worker applies the store's retention
(:meth:`service.flag_store.FlagStore.prune`, safe to run from every worker and replica at once) and
sets the store-size gauges. The first round runs at startup, so the gauges exist from the first
scrape. Store calls block (SQLite, PostgreSQL, object store), so they run in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging

from service.flag_store import FlagStore
from service.metrics import Metrics

log = logging.getLogger(__name__)


def tend_once(store: FlagStore, metrics: Metrics) -> int:
    """Prune to the retention, then measure; returns the flags deleted."""
    deleted = store.prune()
    if deleted:
        metrics.flagged_pruned.inc(deleted)
        log.info("flagged store retention deleted %d flag(s) (%s)", deleted, store.location)
    stats = store.stats()
    metrics.flagged_store_frames.set(stats.frames)
    metrics.flagged_store_bytes.set(stats.bytes)
    return deleted


async def tend_store(store: FlagStore, metrics: Metrics, every_s: float) -> None:
    """Run :func:`tend_once` now and then every ``every_s`` seconds (once only when 0), forever."""
    while True:
        try:
            await asyncio.to_thread(tend_once, store, metrics)
        except Exception:  # a failed round must never end the loop; the next one retries
            log.exception("flagged store upkeep failed (%s); retrying in %.0f s", store.location, every_s)
        if every_s <= 0:
            return
        await asyncio.sleep(every_s)
