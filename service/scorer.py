"""One scoring request: decode, resize, batch, score, flag, observe.

Frames are checked against the pixel limits from their headers, then decoded and resized one at a time
(`service.decoding.prepare_batch`) on the app's decode threads, or on the event loop when the request
decodes to only a few pixels. Everything up to the model's answer (the wait for startup, the decode
threads, the batcher queue, inference) must end within `request_deadline_s`: a 503 otherwise.

The math is the exported graph's (the batcher runs the model's onnxruntime session); this module adds
what a request needs around it: the p-value against the calibration scores, the one flag rule
(`contract.manifest.is_edge_case`), a durable write of every edge case to the flagged store *before*
the response says it was flagged, and the score metrics.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydantic import BaseModel, Field

from service.batcher import Outputs
from service.decoding import (
    INLINE_DECODE_PIXELS,
    INLINE_PROBE_FRAMES,
    Payload,
    PixelLimits,
    decode_batch,
    prepare_batch,
    probe_payloads,
)
from service.errors import DeadlineExceededError, InferenceError, StoreError
from service.metrics import Metrics
from service.pool import ModelPool, Serving
from service.registry import LoadedModel
from service.request_context import note_model

log = logging.getLogger(__name__)


class FrameResult(BaseModel):
    """The verdict on one frame."""

    key: str = Field(description="the client's key, the multipart filename, or the frame's index")
    score: float = Field(description="anomaly score in the model's units (higher = more anomalous)")
    p_value: float = Field(ge=0.0, le=1.0, description="(1 + #calibration scores >= score) / (n + 1)")
    threshold: float
    is_edge_case: bool = Field(description="score > threshold (strictly)")
    model: str
    version: int
    flagged_id: int | None = Field(None, description="id in the flagged store (edge cases only)")
    anomaly_map: str | None = Field(
        None,
        description="with ?maps=true, for heads that have one: base64 8-bit grey PNG of the model input's "
        "full H x W (the frame as resized by the model's resize rule; with fit-pad-bilinear the padding "
        "bars are part of the map), min-max scaled per frame; "
        "value = anomaly_map_min + pixel / 255 * (anomaly_map_max - anomaly_map_min)",
    )
    anomaly_map_min: float | None = None
    anomaly_map_max: float | None = None


class ScoreResponse(BaseModel):
    model: str
    version: int
    results: list[FrameResult] = Field(description="one per frame, in request order")


@dataclass
class ScoreOptions:
    """Per-request choices and limits."""

    model: str | None = None
    version: int | None = None
    maps: bool = False
    max_pixels: int = 16_000_000
    max_request_pixels: int = 128_000_000
    source: str = "json"
    deadline_s: float = 30.0
    decoder: Executor | None = None  # the app's decode threads; None = asyncio's default pool


def encode_map(values: npt.NDArray[np.float32]) -> tuple[str, float, float]:
    """An [H, W] float map as base64 grey PNG, min-max scaled to 0..255 (constant maps become 0)."""
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo
    scaled = np.zeros(values.shape, np.uint8) if span <= 0 else np.round((values - lo) * (255.0 / span))
    buffer = io.BytesIO()
    Image.fromarray(scaled.astype(np.uint8), mode="L").save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii"), lo, hi


async def score_payloads(
    pool: ModelPool, payloads: list[Payload], options: ScoreOptions, store: Any = None
) -> ScoreResponse:
    """Decode, resize, batch, score; write edge cases to the store before returning (durable ack)."""
    deadline = asyncio.timeout(options.deadline_s)
    try:
        async with deadline:
            serving, outputs = await _infer(pool, payloads, options)
    except TimeoutError as exc:
        if not deadline.expired():
            raise
        raise DeadlineExceededError(
            f"{len(payloads)} frame(s) not scored within the deadline of {options.deadline_s:g} s "
            "(the service is overloaded); retry later",
            retry_after_s=max(1, round(options.deadline_s / 10)),
        ) from exc
    model = serving.model
    scores = outputs["score"].astype(np.float64)
    bad = [payloads[i].key for i in np.flatnonzero(~np.isfinite(scores))]
    if bad:
        raise InferenceError(f"model {model.name}/{model.version} returned a non-finite score for {bad}")
    p_values, edge = model.manifest.verdicts(scores)
    threshold = model.threshold
    flagged = await _flag(store, model, payloads, scores, p_values, edge, options.source)
    maps = outputs.get("anomaly_map") if options.maps else None
    encoded = await asyncio.to_thread(lambda: [encode_map(m) for m in maps]) if maps is not None else None
    _observe(pool.metrics, model, scores, p_values, int(edge.sum()))
    results = []
    for i, payload in enumerate(payloads):
        result = FrameResult(
            key=payload.key,
            score=float(scores[i]),
            p_value=float(p_values[i]),
            threshold=threshold,
            is_edge_case=bool(edge[i]),
            model=model.name,
            version=model.version,
            flagged_id=flagged.get(i),
        )
        if encoded is not None:
            result.anomaly_map, result.anomaly_map_min, result.anomaly_map_max = encoded[i]
        results.append(result)
    return ScoreResponse(model=model.name, version=model.version, results=results)


async def _infer(pool: ModelPool, payloads: list[Payload], options: ScoreOptions) -> tuple[Serving, Outputs]:
    """Resolve the model, turn the payloads into its input batch, and wait for the batcher's answer."""
    # The lease keeps this version's batcher open until we have submitted, even if a newer version
    # takes over meanwhile: frames are resized for, and scored by, the same version.
    async with pool.lease(options.model, options.version) as serving:
        note_model(serving.model.name, serving.model.version)
        limits = PixelLimits(per_frame=options.max_pixels, per_request=options.max_request_pixels)
        # The model's H x W and the rule it was trained with, both from its manifest.
        size, rule = serving.model.input_size, serving.model.resize_rule
        # A few frames' headers are read here (~30 us each), the rest's in a decode thread; either way
        # all of them before any decode. The pixel count, not the bytes, then decides where decoding runs.
        few = len(payloads) <= INLINE_PROBE_FRAMES
        pixels = probe_payloads(payloads, size, limits, rule=rule) if few else None
        if pixels is not None and pixels <= INLINE_DECODE_PIXELS:
            # A few small frames decode in a fraction of a millisecond, less than a hop to a thread costs.
            batch = decode_batch(payloads, size, limits.per_frame, rule=rule)
        else:
            with serving.batcher.incoming():
                if pixels is None:
                    job = functools.partial(prepare_batch, payloads, size, limits, rule=rule)
                else:
                    job = functools.partial(decode_batch, payloads, size, limits.per_frame, rule=rule)
                batch = await _in_decoder(options, job)
        return serving, await serving.batcher.submit(batch)


async def _in_decoder(options: ScoreOptions, job: Callable[[], Any]) -> Any:
    """Run blocking decode work on the app's decode threads (bounded: memory is one frame per thread)."""
    return await asyncio.get_running_loop().run_in_executor(options.decoder, job)


async def _flag(
    store: Any,
    model: LoadedModel,
    payloads: list[Payload],
    scores: npt.NDArray[np.float64],
    p_values: npt.NDArray[np.float64],
    edge: npt.NDArray[np.bool_],
    source: str,
) -> dict[int, int]:
    """Write every edge case to the flagged store in one commit; index -> flag id."""
    indices = [int(i) for i in np.flatnonzero(edge)]
    if not indices or store is None:
        return {}
    from service.flag_rules import bounded_image  # loaded only when a store exists
    from service.flag_store import NewFlag

    # Kept as sent when within the store's size cap (identical frames dedupe); otherwise the frame is
    # decoded again and re-encoded as PNG, shrunk to fit the cap.
    cap = int(getattr(store, "max_image_bytes", 0))

    def build_and_add() -> list[Any]:
        flags = []
        for i in indices:
            data, ext = bounded_image(payloads[i].data, payloads[i].image_ext, cap)
            flags.append(
                NewFlag(
                    image=data,
                    model=model.name,
                    version=model.version,
                    score=float(scores[i]),
                    p_value=float(p_values[i]),
                    key=payloads[i].key,
                    metadata={"source": source, "threshold": model.threshold},
                    ext=ext,
                )
            )
        return list(store.add_many(flags))

    try:
        records = await asyncio.to_thread(build_and_add)
    except Exception as exc:
        raise StoreError(f"could not store {len(indices)} flagged frame(s): {exc}") from exc
    return {i: int(record.id) for i, record in zip(indices, records, strict=True)}


def _observe(
    metrics: Metrics,
    model: LoadedModel,
    scores: npt.NDArray[np.float64],
    p_values: npt.NDArray[np.float64],
    flagged: int,
) -> None:
    labels = {"model": model.name, "version": str(model.version)}
    metrics.frames_scored.labels(**labels).inc(len(scores))
    if flagged:
        metrics.frames_flagged.labels(**labels).inc(flagged)
    p_hist = metrics.p_value.labels(**labels)
    for p in p_values:
        p_hist.observe(float(p))
    if model.threshold > 0:
        ratio_hist = metrics.threshold_ratio.labels(**labels)
        for s in scores:
            ratio_hist.observe(float(s) / model.threshold)
