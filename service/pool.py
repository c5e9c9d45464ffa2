"""Which model version answers a request, and how a version comes to serve (load, warm, swap).

`ModelPool` sits between the registry (which verifies versions and builds sessions) and the routes:
it holds one warmed-up `Batcher` per serving version. A new version is loaded and warmed *before* it
replaces the old one in the table; the swap is a dictionary assignment on the event loop, and the old
batcher is then closed, which finishes every request already queued on it. A version that fails to load
or to warm is refused (logged, counted in `edgecase_model_loads_total{outcome="refused"}`) and the old
one keeps serving. Versions asked for explicitly (`?version=N`) are loaded on first use and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from service.batcher import Batcher
from service.errors import NotReadyError, UnknownModelError
from service.metrics import Metrics
from service.registry import LoadedModel, ModelLoadError, ModelRegistry
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Serving:
    """A loaded, warmed model version and the batcher that feeds it."""

    model: LoadedModel
    batcher: Batcher

    @property
    def key(self) -> str:
        return f"{self.model.name}/{self.model.version}"


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


@dataclass
class ReloadReport:
    """What one reload did (the body of POST /admin/reload)."""

    loaded: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    serving: dict[str, int] = field(default_factory=dict)


def warm_up(model: LoadedModel, batch_sizes: list[int]) -> None:
    """Run dummy batches so the first real request does not pay for allocation and kernel selection.

    Also a last check that the graph really runs: a version that loads but fails here is refused.
    """
    for size in sorted(set(batch_sizes)) or [1]:
        outputs = model.score(np.zeros((size, *model.frame_shape), dtype=np.uint8))
        if outputs["score"].shape != (size,):
            raise ModelLoadError(
                f"{model.path}: score output has shape {list(outputs['score'].shape)} for a batch of {size}"
            )


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

    @property
    def default_name(self) -> str | None:
        if self.settings.default_model is not None:
            return self.settings.default_model if self.settings.default_model in self._serving else None
        return min(self._serving) if self._serving else None

    def serving(self) -> dict[str, Serving]:
        return dict(self._serving)

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

    async def refresh(self) -> ReloadReport:
        """Pick up new models and versions: load, warm, then swap; refuse what fails."""
        report = ReloadReport()
        async with self._lock:
            outcome = await asyncio.to_thread(self.registry.refresh)
            for key, reason in outcome.failed.items():
                self._refuse(key, reason, report)
            for key in outcome.loaded:
                name = key.split("/")[0]
                model = self.registry.get(name)
                pinned = self._pinned.pop((name, model.version), None)
                new = pinned or await self._prepare(model, report)
                if new is not None:
                    await self._swap(new)
                    report.loaded.append(new.key)
            report.serving = {name: s.model.version for name, s in sorted(self._serving.items())}
            self.ready = self.default_name is not None
        return report

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
        if version is None or version == serving.model.version:
            return serving
        pinned = self._pinned.get((name, version))
        if pinned is not None and not pinned.batcher.closed:
            return pinned
        return await self._load_pinned(name, version)

    async def close(self) -> None:
        """Finish queued requests on every version and stop their worker threads."""
        self.ready = False
        everything = [*self._serving.values(), *self._pinned.values()]
        self._serving.clear()
        self._pinned.clear()
        await asyncio.gather(*(s.batcher.close() for s in everything))

    def describe(self) -> list[ModelDescription]:
        on_disk = self.registry.scan()
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
                )
            )
        return described

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
                await asyncio.to_thread(warm_up, model, self.settings.warmup_batch_sizes)
            except ModelLoadError as exc:
                raise UnknownModelError(f"model {name!r} version {version} cannot be served: {exc}") from exc
            serving = self._start(model)
            self._pinned[(name, version)] = serving
            log.info("loaded %s on request (%s)", serving.key, ", ".join(model.providers))
            return serving

    async def _prepare(self, model: LoadedModel, report: ReloadReport) -> Serving | None:
        key = f"{model.name}/{model.version}"
        try:
            await asyncio.to_thread(warm_up, model, self.settings.warmup_batch_sizes)
        except Exception as exc:  # a graph that loads but cannot run: refuse it like a load failure
            self._refuse(key, f"warm-up failed: {exc}", report)
            return None
        return self._start(model)

    def _start(self, model: LoadedModel) -> Serving:
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
        )
        batcher.start()
        return Serving(model, batcher)

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
            await old.batcher.close()  # requests already queued on the old version finish there
            self._info(old.model, 0)
            log.info("retired %s", old.key)

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
