"""``write_dataset``: the splits ``edgecase synth`` writes, in any of the three on-disk formats.

Layout and file names follow docs/architecture.md ("Data on disk"): keys
``<split>/<family>/<family>_<index:06d>``, ``labels.csv``, ``synth.json`` and ``contact_sheet.png``.
Frames are written through ``contract.writers.open_writer``. PNG encoding (the slow part) runs in
a small thread pool while the next chunk renders; Pillow releases the GIL while it compresses, and
the bytes are the same whichever thread made them, so output stays deterministic.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from training.synth.api import chunk_frames
from training.synth.contact_sheet import write_contact_sheet
from training.synth.draws import frame_generators
from training.synth.families import FAMILIES, FAMILY_BY_NAME, NORMAL, family_id
from training.synth.pinhole import (
    CAMERA_HEIGHT_M,
    HFOV_DEG,
    LANE_WIDTH_M,
    OBJECT_DISTANCE_M,
    distance_range,
    is_pinhole,
)
from training.synth.render import STRENGTH_RANGE, check_size, render_frames

SPLITS = ("train", "val", "test")
FORMATS = ("dir", "tar", "parquet")
SYNTH_VERSION = 1
"""Bumped whenever the same seed and arguments would render different pixels."""
LABEL_FIELDS = ("key", "path", "split", "family", "strength", "distance_m")
"""``distance_m``: metres to the pedestrian, animal or first cone in a wide (pinhole) frame; empty
for frames without one and for square frames (whose objects are sized in pixels, not metres)."""
DEFAULT_SIZE = "256x144"


def frame_key(split: str, family: str, index: int) -> str:
    """The key of a frame in every format, e.g. ``test/fog/fog_000012``."""
    return f"{split}/{family}/{family}_{index:06d}"


def plan_jobs(
    n_normal: int, n_val: int, n_test_normal: int, n_per_family: int, families: Sequence[str]
) -> list[tuple[str, str, int]]:
    """``(split, family, count)`` in write order: train and val normals, then the test split."""
    jobs = [("train", NORMAL, n_normal), ("val", NORMAL, n_val), ("test", NORMAL, n_test_normal)]
    jobs += [("test", family, n_per_family) for family in families]
    return [job for job in jobs if job[2] > 0]


def resolve_families(families: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, a comma list or a sequence of names -> family names in canonical order."""
    if isinstance(families, str):
        names = (
            list(FAMILIES)
            if families.strip() == "all"
            else [f.strip() for f in families.split(",") if f.strip()]
        )
    else:
        names = list(families)
    if isinstance(families, str) and not names:
        raise ValueError(f"no families given; use 'all' or a comma list of: {', '.join(FAMILIES)}")
    unknown = [name for name in names if name not in FAMILY_BY_NAME]
    if unknown:
        raise ValueError(f"unknown families {', '.join(unknown)}; valid: all, {', '.join(FAMILIES)}")
    return tuple(name for name in FAMILIES if name in names)


def clear_previous_output(out: Path) -> None:
    """Remove what an earlier ``edgecase synth`` wrote into ``out``; leave anything else alone."""
    for name in ("labels.csv", "synth.json", "contact_sheet.png"):
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        if (out / split).is_dir():
            shutil.rmtree(out / split)
        for suffix in ("tar", "parquet"):
            for shard in out.glob(f"{split}-*.{suffix}"):
                shard.unlink()


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


ENCODE_GROUP = 64
"""Frames per encoding task: few enough tasks that thread hand-offs cost nothing next to zlib."""


def _encode(frames: npt.NDArray[np.uint8]) -> list[bytes]:
    from contract.frames import encode_png

    return [encode_png(frame, compress_level=1) for frame in frames]


def write_dataset(
    out: Path | str,
    size: int | str | tuple[int, int] = DEFAULT_SIZE,
    n_normal: int = 8000,
    families: str | Sequence[str] = "all",
    seed: int = 0,
    fmt: str = "dir",
    n_val: int = 1000,
    n_test_normal: int = 1000,
    n_per_family: int = 200,
    *,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    shard_size: int = 2000,
    object_distance: tuple[float, float] | str = OBJECT_DISTANCE_M,
) -> dict[str, Any]:
    """Render and write the train/val/test splits, labels.csv, synth.json and the contact sheet.

    ``size`` is a side (square), ``"WxH"`` or ``(height, width)``; ``object_distance`` (metres,
    ``(near, far)`` or ``"15-60"``) is where wide frames place pedestrians, animals and cones.
    Returns a summary: counts per split and family, paths, seconds and frames/s (render+write).
    Refuses a non-empty ``out`` unless ``overwrite``, which removes only earlier synth output.
    """
    from contract.writers import open_writer

    out = Path(out)
    frame = check_size(size)
    near_far = distance_range(object_distance)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    given = {
        "n_normal": n_normal,
        "n_val": n_val,
        "n_test_normal": n_test_normal,
        "n_per_family": n_per_family,
    }
    counts = {name: _check_count(name, value) for name, value in given.items()}
    names = resolve_families(families)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} is not empty; pass overwrite=True (--overwrite) to replace earlier output"
            )
        clear_previous_output(out)
    out.mkdir(parents=True, exist_ok=True)

    jobs = plan_jobs(
        counts["n_normal"], counts["n_val"], counts["n_test_normal"], counts["n_per_family"], names
    )
    total = sum(count for _, _, count in jobs)
    rows: list[tuple[str, ...]] = []
    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers or min(2, os.cpu_count() or 1))
    bar = tqdm(total=total, unit="frame", desc="synth", disable=not progress)
    try:
        for split in SPLITS:
            split_jobs = [job for job in jobs if job[0] == split]
            if not split_jobs:
                continue
            with open_writer(out, fmt, split, shard_size=shard_size) as writer:  # type: ignore[arg-type]
                pending: list[tuple[list[str], list[dict[str, Any]], list[Future[list[bytes]]]]] = []
                for _, family, count in split_jobs:
                    stream = (SPLITS.index(split), family_id(family))
                    fam = None if family == NORMAL else FAMILY_BY_NAME[family]
                    chunk = chunk_frames(frame)
                    for start in range(0, count, chunk):
                        stop = min(count, start + chunk)
                        rendered = render_frames(
                            frame_generators(int(seed), stream, range(start, stop)),
                            frame,
                            fam,
                            object_distance=near_far,
                        )
                        frames = rendered.frames
                        keys = [frame_key(split, family, i) for i in range(start, stop)]
                        metas = [
                            {
                                "family": family,
                                "split": split,
                                "strength": round(float(s), 4),
                                "distance_m": None if np.isnan(d) else round(float(d), 2),
                            }
                            for s, d in zip(rendered.strength, rendered.distance, strict=True)
                        ]
                        groups = range(0, len(frames), ENCODE_GROUP)
                        futures = [pool.submit(_encode, frames[g : g + ENCODE_GROUP]) for g in groups]
                        pending.append((keys, metas, futures))
                        if len(pending) > 1:  # keep one chunk encoding while the next renders
                            _flush(writer, pending.pop(0), rows, bar)
                while pending:
                    _flush(writer, pending.pop(0), rows, bar)
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - started

    with open(out / "labels.csv", "w", newline="") as handle:
        writer_csv = csv.writer(handle)
        writer_csv.writerow(LABEL_FIELDS)
        writer_csv.writerows(rows)
    by_split: dict[str, dict[str, int]] = {}
    for split, family, count in jobs:
        by_split.setdefault(split, {})[family] = count
    pinhole = is_pinhole(*frame)
    config = {
        "generator": "training.synth",
        "version": SYNTH_VERSION,
        # As --size takes it back: a side for square frames (as before), "WxH" otherwise.
        "size": frame.height if frame.height == frame.width else str(frame),
        "height": frame.height,
        "width": frame.width,
        "seed": int(seed),
        "format": fmt,
        **counts,
        "families": list(names),
        "strength_range": list(STRENGTH_RANGE),
        # Where objects stand in wide frames; square frames size them in pixels (figures.py).
        "object_size_rule": "pinhole" if pinhole else "pixels-at-64",
        "object_distance_m": list(near_far),
        "camera": (
            {"hfov_deg": HFOV_DEG, "height_m": list(CAMERA_HEIGHT_M), "lane_width_m": LANE_WIDTH_M}
            if pinhole
            else None
        ),
        "shard_size": shard_size,
        "splits": by_split,
        "frames": total,
    }
    (out / "synth.json").write_text(json.dumps(config, indent=2) + "\n")
    sheet = write_contact_sheet(out / "contact_sheet.png", frame, int(seed), names, near_far)
    return {
        **config,
        "out": str(out),
        "labels": str(out / "labels.csv"),
        "contact_sheet": str(sheet),
        "seconds": seconds,
        "frames_per_s": total / seconds if seconds > 0 else float("inf"),
    }


def _flush(
    writer: Any,
    chunk: tuple[list[str], list[dict[str, Any]], list[Future[list[bytes]]]],
    rows: list[tuple[str, ...]],
    bar: tqdm,
) -> None:
    """Write one encoded chunk (in key order) and record its labels."""
    keys, metas, futures = chunk
    encoded = [data for future in futures for data in future.result()]
    for key, meta, data in zip(keys, metas, encoded, strict=True):
        path = writer.write(key, data, meta)
        distance = "" if meta["distance_m"] is None else f"{meta['distance_m']:.2f}"
        rows.append((key, path, meta["split"], meta["family"], f"{meta['strength']:.4f}", distance))
    bar.update(len(keys))
