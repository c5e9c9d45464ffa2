"""The contact sheet: one row per family (normal first), eight frames of rising strength.

It is written with every ``edgecase synth`` run so a person can check at a glance that the frames
look like road scenes and that the families are told apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.synth.draws import frame_generators
from training.synth.families import NORMAL, family_id
from training.synth.pinhole import OBJECT_DISTANCE_M
from training.synth.render import STRENGTH_RANGE, check_size, render_with_generators

PER_ROW = 8
SHEET_STREAM = 3
"""Seed stream of the contact sheet (splits use 0..2), so its frames are not dataset frames."""
LABEL_W, PAD, HEADER_H = 104, 2, 18


def contact_sheet_image(
    size: int | str | tuple[int, int],
    seed: int,
    families: Sequence[str],
    object_distance: tuple[float, float] = OBJECT_DISTANCE_M,
) -> Image.Image:
    """Render the sheet: rows ``normal, *families``, cells upscaled to about 128 pixels tall (frames
    taller than 256 pixels are shown, and rendered, about 144 tall: a 1080p sheet stays small)."""
    from training.synth.families import FAMILY_BY_NAME

    rows = [NORMAL, *[f for f in families if f != NORMAL]]
    frame_h, frame_w = check_size(size)
    scale = max(1, round(128 / frame_h))
    shrink = 1 if frame_h <= 256 else math.ceil(frame_h / 144)
    cell_h, cell_w = frame_h * scale // shrink, frame_w * scale // shrink
    width = LABEL_W + PER_ROW * (cell_w + PAD) + PAD
    height = HEADER_H + len(rows) * (cell_h + PAD) + PAD
    sheet = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(sheet)
    lo, hi = STRENGTH_RANGE
    strengths = np.linspace(lo, hi, PER_ROW).astype(np.float32)
    label = frame_h if frame_h == frame_w else f"{frame_w}x{frame_h}"
    title = f"edgecase synth  size {label}  seed {seed}  strength {lo:.2f} -> {hi:.2f} (left to right)"
    draw.text((PAD + 2, 3), title, fill=(220, 220, 220))
    for r, name in enumerate(rows):
        generators = frame_generators(seed, (SHEET_STREAM, family_id(name)), range(PER_ROW))
        family = None if name == NORMAL else FAMILY_BY_NAME[name]
        # Frames larger than their cells are rendered at the cell's size: the same scenes (same
        # seeds, same aspect, hence the same camera), without rendering 96 full-HD frames for a
        # picture that shows them 144 pixels tall.
        frames, _ = render_with_generators(
            generators,
            (frame_h, frame_w) if shrink == 1 else (cell_h, cell_w),
            family,
            None if family is None else strengths,
            object_distance=object_distance,
        )
        top = HEADER_H + r * (cell_h + PAD) + PAD
        draw.text((PAD + 2, top + cell_h // 2 - 6), name, fill=(240, 240, 240))
        for c, frame in enumerate(frames):
            tile = Image.fromarray(frame).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            sheet.paste(tile, (LABEL_W + c * (cell_w + PAD), top))
    return sheet


def write_contact_sheet(
    path: Path | str,
    size: int | str | tuple[int, int],
    seed: int,
    families: Sequence[str],
    object_distance: tuple[float, float] = OBJECT_DISTANCE_M,
) -> Path:
    """Write the contact sheet PNG to ``path`` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet_image(size, seed, families, object_distance).save(path, format="PNG", compress_level=6)
    return path
