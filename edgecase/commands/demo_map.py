"""The demo's picture: one flagged pedestrian frame beside its full-resolution anomaly map.

A table says *that* a pedestrian was flagged; the map says *where* the model saw it, which is what a
reviewer checks first. The map comes from the service (``POST /score?maps=true``), so the picture
shows what a client gets, at the model input's full resolution (fit-pad bars included).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SCALE = 3  # a 256x144 frame is small on a screen: nearest-neighbour x3


def heat(grey: np.ndarray) -> np.ndarray:
    """[H, W] uint8 (0 = least anomalous) -> [H, W, 3] uint8, black -> red -> yellow -> white."""
    g = grey.astype(np.float32) / 255.0
    rgb = np.stack([np.clip(3 * g, 0, 1), np.clip(3 * g - 1, 0, 1), np.clip(3 * g - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def map_figure(frame_png: bytes, result: dict[str, Any], out: Path) -> Path | None:
    """Write ``frame | map`` side by side (the frame resized to the map's size) to ``out``.

    ``result`` is one item of a ``/score?maps=true`` response; returns None when the head has no map.
    """
    encoded = result.get("anomaly_map")
    if not encoded:
        return None
    grey = np.array(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("L"))
    h, w = grey.shape
    frame = np.array(
        Image.open(io.BytesIO(frame_png)).convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    )
    gap = np.full((h, 4, 3), 255, dtype=np.uint8)
    panel = np.concatenate([frame, gap, heat(grey)], axis=1)
    image = Image.fromarray(panel).resize((panel.shape[1] * SCALE, h * SCALE), Image.Resampling.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
