"""One scoring request: decode, resize, batch, score, flag, observe.

The math is the exported graph's (the batcher runs the model's onnxruntime session); this module adds
what a request needs around it: the p-value against the calibration scores, the one flag rule
(`contract.manifest.is_edge_case`), a durable write of every edge case to the flagged store *before*
the response says it was flagged, and the score metrics.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydantic import BaseModel, Field

from contract.frames import encode_png
from service.batcher import BatcherClosedError
from service.decoding import Payload, decode_frames, to_batch
from service.errors import InferenceError, NotReadyError, StoreError
from service.metrics import Metrics
from service.pool import ModelPool
from service.registry import LoadedModel

log = logging.getLogger(__name__)

INLINE_DECODE_BYTES = 32 * 1024
"""Requests whose images add up to at most this many bytes are decoded on the event loop."""


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
        description="with ?maps=true, for heads that have one: base64 8-bit grey PNG, min-max scaled per "
        "frame; value = anomaly_map_min + pixel / 255 * (anomaly_map_max - anomaly_map_min)",
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
    source: str = "json"


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
    serving = await pool.resolve(options.model, options.version)
    h, w, _ = serving.model.frame_shape
    if sum(len(p.data) for p in payloads) <= INLINE_DECODE_BYTES:
        # A few small frames decode in tens of microseconds, less than a hop to a worker thread costs.
        frames, batch = _prepare(payloads, h, w, options.max_pixels)
    else:
        with serving.batcher.incoming():
            frames, batch = await asyncio.to_thread(_prepare, payloads, h, w, options.max_pixels)
    for _attempt in range(3):
        try:
            outputs = await serving.batcher.submit(batch)
            break
        except BatcherClosedError:  # swapped while we were resizing: go to the new version
            serving = await pool.resolve(options.model, options.version)
            if serving.model.frame_shape != batch.shape[1:]:
                h, w, _ = serving.model.frame_shape
                batch = await asyncio.to_thread(to_batch, frames, h, w)
    else:
        raise NotReadyError("model versions are being swapped; retry")
    model = serving.model
    scores = outputs["score"].astype(np.float64)
    bad = [payloads[i].key for i in np.flatnonzero(~np.isfinite(scores))]
    if bad:
        raise InferenceError(f"model {model.name}/{model.version} returned a non-finite score for {bad}")
    p_values, edge = model.manifest.verdicts(scores)
    threshold = model.threshold
    flagged = await _flag(store, model, payloads, frames, scores, p_values, edge, options.source)
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


def _prepare(
    payloads: list[Payload], h: int, w: int, max_pixels: int
) -> tuple[list[npt.NDArray[np.uint8]], npt.NDArray[np.uint8]]:
    frames = decode_frames(payloads, max_pixels=max_pixels)
    return frames, to_batch(frames, h, w)


async def _flag(
    store: Any,
    model: LoadedModel,
    payloads: list[Payload],
    frames: list[npt.NDArray[np.uint8]],
    scores: npt.NDArray[np.float64],
    p_values: npt.NDArray[np.float64],
    edge: npt.NDArray[np.bool_],
    source: str,
) -> dict[int, int]:
    """Write every edge case to the flagged store in one commit; index -> flag id."""
    indices = [int(i) for i in np.flatnonzero(edge)]
    if not indices or store is None:
        return {}
    from service.flagged import NewFlag  # the store's module, loaded only when a store exists

    def build_and_add() -> list[Any]:
        flags = []
        for i in indices:
            ext = payloads[i].image_ext
            # Kept as sent when PNG/JPEG/WebP (identical frames dedupe); other formats as decoded PNG.
            data = payloads[i].data if ext else encode_png(frames[i])
            flags.append(
                NewFlag(
                    image=data,
                    model=model.name,
                    version=model.version,
                    score=float(scores[i]),
                    p_value=float(p_values[i]),
                    key=payloads[i].key,
                    metadata={"source": source, "threshold": model.threshold},
                    ext=ext or "png",
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
