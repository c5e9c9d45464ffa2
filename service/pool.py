"""Which model version answers a request, and how a version comes to serve (load, warm, swap).

`ModelPool` is the one table of serving models. It sits between the registry (which finds and
verifies versions and builds sessions, and keeps no serving state) and the routes: it holds one
warmed-up `Batcher` per serving version. A new version is loaded and warmed *before* it replaces the
old one in the table; the swap is a dictionary assignment on the event loop. A request holds a
*lease* on the version it resolved (`async with pool.lease(...)`) from lookup to submit, so it is
scored by the version whose input size it resized to; the old batcher is closed once its leases are
returned (at most `swap_drain_s`), which finishes every request already queued on it. So no caller
ever sees a swap half-done, and none retries one.

A version that fails to load or to warm is refused (logged, counted in
`edgecase_model_loads_total{outcome="refused"}`) and the old one keeps serving; the registry tries it
again when its files change, and on `POST /admin/reload`. A batcher whose loop ends on its own marks
its version not ready (`/readyz` 503, `/models` says why) and is restarted, with a growing pause if
it keeps dying. Versions asked for explicitly (`?version=N`) are loaded on first use and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from service.batcher import Batcher
from service.errors import NotReadyError, UnknownModelError
from service.metrics import Metrics
from service.registry import LoadedModel, ModelLoadError, ModelRegistry
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Serving:
    """A loaded, warmed model version and the batcher that feeds it (replaced if its loop dies)."""

    model: LoadedModel
    batcher: Batcher
    leases: int = 0  # requests between lookup and submit
    returned: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever leases drops to 0
    restarts: int = 0  # batcher restarts in a row, for the back-off
    started_at: float = field(default_factory=time.monotonic)  # when the current batcher started

    @property
    def key(self) -> str:
        return f"{self.model.name}/{self.model.version}"

    @property
    def not_ready(self) -> str | None:
        """Why this version cannot take requests now (its batcher is being restarted), else None."""
        return self.batcher.stopped


class InputDescription(BaseModel):
    height: int
    width: int
    channels: int
    dtype: str
    layout: str
    resize_rule: str


class ModelDescription(BaseModel):
    """What /models says about one model."""

    name: str
    default: bool = Field(description="served when a request gives no ?model=")
    version: int = Field(description="the version serving requests without ?version=")
    loaded_versions: list[int]
    available_versions: list[int] = Field(description="versions published in the repository")
    providers: list[str] = Field(description="onnxruntime execution providers the session really uses")
    threshold: float
    target_fpr: float
    calibration_n: int
    head: str
    units: str
    definition: str
    input: InputDescription
    outputs: list[str]
    has_anomaly_map: bool
    not_ready: str | None = Field(None, description="why this model cannot serve right now, if it cannot")
    refused_versions: dict[str, str] = Field(
        default_factory=dict, description="version -> why it was refused (retried when its files change)"
    )


@dataclass
class ReloadReport:
    """What one reload did (the body of POST /admin/reload)."""

    loaded: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    serving: dict[str, int] = field(default_factory=dict)


class ModelPool:
    """Serving table: model name -> serving version, plus explicitly requested older versions."""

    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self._serving: dict[str, Serving] = {}
        self._pinned: dict[tuple[str, int], Serving] = {}
        self._lock = asyncio.Lock()  # one load/swap at a time (poller, admin endpoint, ?version=)
        self.ready = False
        self._starting: asyncio.Event | None = None  # None: not started; set once start()'s load ends
        self._closing = False
        self._restarts: set[asyncio.Task[None]] = set()

    @property
    def default_name(self) -> str | None:
        if self.settings.default_model is not None:
            return self.settings.default_model if self.settings.default_model in self._serving else None
        return min(self._serving) if self._serving else None

    def serving(self) -> dict[str, Serving]:
        return dict(self._serving)

    def not_ready(self) -> dict[str, str]:
        """Every loaded version that cannot take requests right now, as "name/version" -> why."""
        return {s.key: reason for s in self._loaded() if (reason := s.not_ready) is not None}

    async def start(self) -> ReloadReport:
        """Load and warm the highest good version of every model; ready once the default one serves."""
        self._starting = asyncio.Event()
        try:
            report = await self.refresh()
        finally:
            self._starting.set()
        if not self.ready:
            log.warning(
                "not ready: no servable %s in %s (refused: %s); polling continues",
                f"model {self.settings.default_model!r}" if self.settings.default_model else "model",
                self.settings.repo,
                report.refused or "none",
            )
        return report

    async def refresh(self, *, retry_refused: bool = False) -> ReloadReport:
        """Pick up new models and versions: load, warm, then swap; refuse what fails.

        A refused version is tried again when its files have changed since, or always with
        `retry_refused` (POST /admin/reload).
        """
        report = ReloadReport()
        async with self._lock:
            on_disk = await asyncio.to_thread(self.registry.scan)
            for name in on_disk:
                new = await self._newest_servable(name, report, retry_refused)
                if new is not None:
                    await self._swap(new)
                    report.loaded.append(new.key)
            for name in sorted(set(self._serving) - set(on_disk)):
                # The folder is gone: keep serving what is in memory, but say so.
                log.warning(
                    "model %s is no longer in %s; still serving version %d from memory",
                    name,
                    self.registry.repo,
                    self._serving[name].model.version,
                )
            report.serving = {name: s.model.version for name, s in sorted(self._serving.items())}
            self.ready = self.default_name is not None
        return report

    @contextlib.asynccontextmanager
    async def lease(self, name: str | None, version: int | None) -> AsyncIterator[Serving]:
        """The version that answers `?model=name&version=version`, held until the block ends.

        While a lease is held the version's batcher stays open even if a newer version takes over,
        so a request decodes, resizes and submits to one version. 404/503 as `resolve`.
        """
        serving = await self.resolve(name, version)
        serving.leases += 1
        serving.returned.clear()
        try:
            yield serving
        finally:
            serving.leases -= 1
            if serving.leases == 0:
                serving.returned.set()

    async def resolve(self, name: str | None, version: int | None) -> Serving:
        """The version that answers `?model=name&version=version` (None = defaults); 404/503 otherwise."""
        if not self.ready and self._starting is not None and not self._starting.is_set():
            # Startup load in progress: wait for it rather than fail a request the next second would serve.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._starting.wait(), self.settings.startup_wait_s)
        if not self.ready:
            raise NotReadyError("models are still loading and warming up", retry_after_s=2)
        name = name or self.default_name
        if name is None:  # pragma: no cover - ready implies a default
            raise NotReadyError("no default model is serving")
        serving = self._serving.get(name)
        if serving is None:
            known = ", ".join(sorted(self._serving)) or "none"
            raise UnknownModelError(f"unknown model {name!r}; serving: {known}")
        if version is not None and version != serving.model.version:
            pinned = self._pinned.get((name, version))
            serving = pinned if pinned is not None else await self._load_pinned(name, version)
        if serving.not_ready is not None:
            raise NotReadyError(f"model {serving.key} is not ready: {serving.not_ready}; restarting")
        return serving

    async def close(self) -> None:
        """Finish queued requests on every version and stop their worker threads."""
        self.ready = False
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        everything = self._loaded()
        self._serving.clear()
        self._pinned.clear()
        await asyncio.gather(*(s.batcher.close() for s in everything))

    def describe(self) -> list[ModelDescription]:
        on_disk = self.registry.scan()
        refused = self.registry.failures
        described = []
        for name, serving in sorted(self._serving.items()):
            m = serving.model.manifest
            loaded = {serving.model.version} | {v for (n, v) in self._pinned if n == name}
            described.append(
                ModelDescription(
                    name=name,
                    default=name == self.default_name,
                    version=serving.model.version,
                    loaded_versions=sorted(loaded),
                    available_versions=on_disk.get(name, []),
                    providers=serving.model.providers,
                    threshold=m.threshold.value,
                    target_fpr=m.threshold.target_fpr,
                    calibration_n=m.calibration.n,
                    head=m.model.head,
                    units=m.model.units,
                    definition=m.model.definition,
                    input=InputDescription(**m.input.model_dump(include=set(InputDescription.model_fields))),
                    outputs=m.output_names,
                    has_anomaly_map="anomaly_map" in m.output_names,
                    not_ready=serving.not_ready,
                    refused_versions={
                        key.split("/", 1)[1]: why for key, why in refused.items() if key.split("/")[0] == name
                    },
                )
            )
        return described

    async def _newest_servable(self, name: str, report: ReloadReport, retry_refused: bool) -> Serving | None:
        """The newest version above the serving one, loaded, verified and warmed by the registry."""
        current = self._serving.get(name)
        newer_than = current.model.version if current is not None else 0
        model, refused = await asyncio.to_thread(
            self.registry.load_newest, name, newer_than, retry_refused=retry_refused
        )
        for key, reason in refused.items():
            self._refuse(key, reason, report)
        if model is None:
            return None
        pinned = self._pinned.pop((name, model.version), None)
        return pinned if pinned is not None else self._start(model)

    async def _load_pinned(self, name: str, version: int) -> Serving:
        async with self._lock:
            pinned = self._pinned.get((name, version))
            if pinned is not None:
                return pinned
            available = self.registry.scan().get(name, [])
            if version not in available:
                raise UnknownModelError(f"model {name!r} has no version {version} (published: {available})")
            try:
                model = await asyncio.to_thread(self.registry.load_version, name, version)
            except ModelLoadError as exc:
                raise UnknownModelError(f"model {name!r} version {version} cannot be served: {exc}") from exc
            serving = self._start(model)
            self._pinned[(name, version)] = serving
            log.info("loaded %s on request (%s)", serving.key, ", ".join(model.providers))
            return serving

    def _start(self, model: LoadedModel) -> Serving:
        return Serving(model, self._new_batcher(model))

    def _new_batcher(self, model: LoadedModel) -> Batcher:
        s = self.settings
        batcher = Batcher(
            model.score,
            name=model.name,
            version=model.version,
            max_batch_size=s.max_batch_size,
            max_queue_delay_ms=s.max_queue_delay_ms,
            max_queue_frames=s.max_queue_frames,
            eager=s.eager_dispatch,
            metrics=self.metrics,
            on_stop=self._batcher_stopped,
        )
        batcher.start()
        return batcher

    def _batcher_stopped(self, batcher: Batcher, reason: str) -> None:
        """A batcher's loop ended on its own: its version is not ready until a new batcher runs."""
        if self._closing:
            return
        for serving in self._loaded():
            if serving.batcher is batcher:
                if time.monotonic() - serving.started_at > self.settings.batcher_restart_max_s:
                    serving.restarts = 0  # it had run fine for a while: not a crash loop
                task = asyncio.get_running_loop().create_task(
                    self._restart(serving), name=f"restart-{serving.key}"
                )
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)
                return

    async def _restart(self, serving: Serving) -> None:
        """Give the version a new batcher (same session) after a pause that doubles while it keeps dying."""
        s = self.settings
        pause = min(s.batcher_restart_max_s, s.batcher_restart_s * 2**serving.restarts)
        serving.restarts += 1
        log.error("model %s is not ready; restarting its batcher in %.1f s", serving.key, pause)
        await asyncio.sleep(pause)
        if self._closing or not any(loaded is serving for loaded in self._loaded()):
            return  # shut down, or swapped out meanwhile
        serving.batcher = self._new_batcher(serving.model)
        serving.started_at = time.monotonic()
        log.warning("model %s: batcher restarted (restart %d in a row)", serving.key, serving.restarts)

    def _loaded(self) -> list[Serving]:
        return [*self._serving.values(), *self._pinned.values()]

    async def _swap(self, new: Serving) -> None:
        name = new.model.name
        old = self._serving.get(name)
        self._serving[name] = new  # from here on, new requests go to the new version
        self._info(new.model, 1)
        self.metrics.model_loads.labels(model=name, outcome="loaded").inc()
        log.info(
            "serving %s on %s (threshold %g)",
            new.key,
            ", ".join(new.model.providers),
            new.model.threshold,
        )
        if old is not None:
            await self._retire(old)
            self._info(old.model, 0)
            log.info("retired %s", old.key)

    async def _retire(self, old: Serving) -> None:
        """Close the old version's batcher once the requests holding it have submitted (or the drain
        deadline passes: a late one then gets a 503 to retry), finishing everything queued on it."""
        if old.leases:
            try:
                await asyncio.wait_for(old.returned.wait(), self.settings.swap_drain_s)
            except TimeoutError:
                log.warning("retiring %s with %d request(s) still holding it", old.key, old.leases)
        await old.batcher.close()

    def _refuse(self, key: str, reason: str, report: ReloadReport) -> None:
        report.refused[key] = reason
        self.metrics.model_loads.labels(model=key.split("/")[0], outcome="refused").inc()
        log.error("refused %s, keeping the current version: %s", key, reason)

    def _info(self, model: LoadedModel, value: int) -> None:
        labels = {"model": model.name, "version": str(model.version)}
        self.metrics.model_info.labels(
            **labels,
            head=model.manifest.model.head,
            units=model.manifest.model.units,
            provider=model.providers[0],
        ).set(value)
        threshold = model.manifest.threshold
        self.metrics.model_threshold.labels(**labels).set(threshold.value if value else 0)
        self.metrics.model_target_fpr.labels(**labels).set(threshold.target_fpr if value else 0)
