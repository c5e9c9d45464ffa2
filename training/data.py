"""Frames for training and evaluation, read once into uint8 NHWC arrays.

Training sets here are small (8,000 frames of 256x144 is 885 MB, of 64x64 98 MB), so frames are decoded
once into memory and the loops index arrays; no DataLoader workers are needed on a 2-core machine.
Every frame is brought to the model's H x W by contract's one resize rule (``RESIZE_RULE``: resize to
fit keeping the aspect, pad black), the rule the exported manifest names and the service applies.

Sources (``--data``, several allowed; they concatenate, so frames reviewed as normal join a later run):
- a *labelled folder* (has ``labels.csv``, e.g. written by ``edgecase synth``): normal frames of its
  ``train`` split train, normal frames of its ``val`` split validate (early stopping, calibration);
  without a ``val`` split a seeded share of ``train`` is held out for that (never trained on).
  Frames of other families and of the ``test`` split are never used for training. A labelled folder
  without train/val rows contributes all its normal frames, split by seed like an unlabelled source;
- anything else (image folder, ``.tar`` shard, ``.parquet`` file): every frame, split deterministically
  by ``seed`` into train and val.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from contract.frames import RESIZE_RULE, FrameSize
from contract.labels import is_normal, read_labels
from contract.readers import ReadReport, iter_frames
from training.shapes import parse_size

log = logging.getLogger(__name__)

Frames = npt.NDArray[np.uint8]


@dataclass
class TrainingData:
    """Normal frames a model learns from, plus where they came from.

    ``fingerprint`` is a sha256 over the pixel arrays: two runs with the same fingerprint saw the same
    frames in the same order. ``labels`` are per-frame families of ``val`` (``normal`` for a labelled
    source, ``unlabelled`` otherwise), or None when no source carried labels.
    """

    train: Frames
    val: Frames
    sources: list[str]
    fingerprint: str
    labels: list[str] | None = None


def is_labelled_folder(source: str | Path) -> bool:
    """A folder with a ``labels.csv`` (what ``edgecase synth`` writes, or a user's labelled frames)."""
    path = Path(source)
    return path.is_dir() and (path / "labels.csv").is_file()


def _read(
    source: str | Path, size: FrameSize, keys: Sequence[str] | None, limit: int | None, desc: str
) -> tuple[list[str], list[Frames]]:
    """Read frames of one source (optionally only ``keys``), stopping after ``limit`` frames."""
    report = ReadReport()
    total = len(keys) if keys is not None else None
    if limit is not None and total is not None:
        total = min(total, limit)
    got_keys: list[str] = []
    frames: list[Frames] = []
    key_set = set(keys) if keys is not None else None
    it: Iterable = iter_frames(source, size=size, rule=RESIZE_RULE, report=report, keys=key_set)
    with tqdm(it, total=total, desc=desc, unit="frame", leave=False) as bar:
        for frame in bar:
            got_keys.append(frame.key)
            frames.append(frame.image)
            if limit is not None and len(frames) >= limit:
                break
    if report.failed:
        log.warning("%s: %d frame(s) failed to decode and were skipped", source, report.failed)
    return got_keys, frames


def _stack(frames: list[Frames], size: FrameSize) -> Frames:
    if not frames:
        return np.zeros((0, size.height, size.width, 3), dtype=np.uint8)
    return np.stack(frames).astype(np.uint8, copy=False)


def _seeded_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/val index split; at least one frame each when n >= 2."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, math.ceil(n * val_fraction)), n - 1) if n >= 2 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _load_labelled_source(
    folder: Path, size: FrameSize, seed: int, val_fraction: float, limit: int | None
) -> tuple[Frames, Frames, bool]:
    rows = [r for r in read_labels(folder) if is_normal(r.family)]
    train_keys = sorted(r.key for r in rows if r.split == "train")
    val_keys = sorted(r.key for r in rows if r.split == "val")
    if not train_keys:
        # A user's labelled folder without splits: its normal frames split by seed.
        keys = sorted(r.key for r in rows)
        got, frames = _read(folder, size, keys, None, f"read {folder.name}")
        arr = _stack(frames, size)
        tr, va = _seeded_split(len(arr), val_fraction, seed)
        return arr[tr], arr[va], True
    n_val = None if limit is None else max(1, math.ceil(limit * val_fraction))
    if not val_keys:
        # A train split and no val split: validating and calibrating on the training frames would set
        # the threshold too low, so a seeded share of the train split is held out instead.
        budget = None if limit is None or n_val is None else limit + n_val
        _, frames = _read(folder, size, train_keys, budget, f"read {folder.name} train")
        arr = _stack(frames, size)
        tr, va = _seeded_split(len(arr), val_fraction, seed)
        log.warning(
            "%s has a train split and no val split: %d of its %d train frames (seed %d) are held out "
            "for validation and calibration, not trained on",
            folder, len(va), len(arr), seed,
        )  # fmt: skip
        return arr[tr], arr[va], True
    # Two filtered passes keep the early stop per split simple; readers skip unwanted keys undecoded.
    _, train = _read(folder, size, train_keys, limit, f"read {folder.name} train")
    _, val = _read(folder, size, val_keys, n_val, f"read {folder.name} val")
    return _stack(train, size), _stack(val, size), True


def load_training_frames(
    sources: Sequence[str | Path],
    size: int | str | tuple[int, int],
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    max_frames: int | None = None,
) -> TrainingData:
    """Read normal frames from every source at ``size`` (``64``, ``"256x144"`` or ``(h, w)``) into
    train and val arrays [N, H, W, 3].

    ``max_frames`` caps the training frames per source (val gets ``val_fraction`` of that), for dry
    runs and quick experiments; reading stops early instead of decoding everything.
    Raises ValueError (clear message) for a missing source or when no frames are found.

    The last couple of results are cached in-process (keyed by the arguments and the sources'
    modification times): training, its plots and the calibration of local heads all ask for the
    same frames in one command. Callers get their own copies of the arrays.
    """
    frame = parse_size(size)
    key = _cache_key(sources, frame, seed, val_fraction, max_frames)
    cached = _CACHE.get(key) if key is not None else None
    if cached is None:
        cached = _load_training_frames(sources, frame, seed, val_fraction, max_frames)
        if key is not None:
            _CACHE[key] = cached
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
    return dataclasses.replace(
        cached,
        train=cached.train.copy(),
        val=cached.val.copy(),
        sources=list(cached.sources),
        labels=None if cached.labels is None else list(cached.labels),
    )


_CACHE_SIZE = 2
_CACHE: dict[tuple[Any, ...], TrainingData] = {}


def _cache_key(
    sources: Sequence[str | Path], size: FrameSize, seed: int, val_fraction: float, max_frames: int | None
) -> tuple[Any, ...] | None:
    """Arguments plus, per source, the newest mtime of its folders and files at the top levels a write
    touches (a folder's mtime changes when an entry is added, removed or renamed in it; shards and
    labels.csv are replaced atomically); None (no caching) when a source is missing."""
    stamps = []
    for source in sources:
        path = Path(source)
        try:
            newest = path.stat().st_mtime_ns
            if path.is_dir():
                for root, _, files in os.walk(path):
                    newest = max(newest, os.stat(root).st_mtime_ns)
                    for name in files:
                        if name.endswith((".tar", ".parquet", ".csv")):
                            newest = max(newest, os.stat(os.path.join(root, name)).st_mtime_ns)
            stamps.append((str(path.resolve()), newest))
        except OSError:
            return None
    return (tuple(stamps), tuple(size), RESIZE_RULE, seed, val_fraction, max_frames)


def _load_training_frames(
    sources: Sequence[str | Path], size: FrameSize, seed: int, val_fraction: float, max_frames: int | None
) -> TrainingData:
    if not sources:
        raise ValueError("no data sources given (use --data DIR_OR_SHARDS)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    trains: list[Frames] = []
    vals: list[Frames] = []
    labels: list[str] = []
    any_labelled = False
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise ValueError(f"data source not found: {path}")
        if is_labelled_folder(path):
            train, val, labelled = _load_labelled_source(path, size, seed, val_fraction, max_frames)
        else:
            labelled = False
            limit = None if max_frames is None else max_frames + max(1, math.ceil(max_frames * val_fraction))
            _, frames = _read(path, size, None, limit, f"read {path.name}")
            arr = _stack(frames, size)
            tr, va = _seeded_split(len(arr), val_fraction, seed)
            train, val = arr[tr], arr[va]
        if len(train) == 0 and len(val) == 0:
            raise ValueError(f"no frames found in {path} (image folders, .tar shards and .parquet files)")
        log.info("%s: %d train + %d val frames", path, len(train), len(val))
        any_labelled |= labelled
        trains.append(train)
        vals.append(val)
        labels += ["normal" if labelled else "unlabelled"] * len(val)
    train = np.concatenate(trains)
    val = np.concatenate(vals)
    if len(train) == 0:
        raise ValueError(f"no training frames found in {', '.join(map(str, sources))}")
    if len(val) == 0:
        # One frame in all: validate on it too rather than refuse (dry runs on a single image).
        log.warning("no validation frames: validating on the training frames")
        val = train.copy()
        labels = ["normal" if any_labelled else "unlabelled"] * len(val)
    return TrainingData(
        train=train,
        val=val,
        sources=[str(Path(s)) for s in sources],
        fingerprint=fingerprint_frames(train, val),
        labels=labels if any_labelled else None,
    )


def fingerprint_frames(*arrays: Frames) -> str:
    """sha256 over shapes and pixels: identifies exactly which frames (in which order) a run saw."""
    digest = hashlib.sha256()
    for arr in arrays:
        digest.update(repr(arr.shape).encode())
        digest.update(np.ascontiguousarray(arr).data)
    return digest.hexdigest()


def load_labelled_frames(
    folder: str | Path, size: int | str | tuple[int, int], *, max_per_family: int | None = None
) -> tuple[Frames, list[str], list[str], npt.NDArray[np.float32]]:
    """Frames of a labelled folder for evaluation: ``(frames, families, keys, strengths)``.

    Uses the ``test`` split when the labels have one (a synth folder), else every labelled row (a
    user's folder; missing split reads as ``test`` anyway). ``max_per_family`` keeps the first N keys
    (sorted) of each family, so a quick evaluation stays balanced and deterministic.
    """
    path = Path(folder)
    if not is_labelled_folder(path):
        raise ValueError(f"{path} has no labels.csv (columns: key or path, family; 'normal' = normal)")
    rows = read_labels(path)
    test_rows = [r for r in rows if r.split == "test"]
    rows = sorted(test_rows or rows, key=lambda r: r.key)
    if max_per_family is not None:
        kept: dict[str, int] = {}
        picked = []
        for row in rows:
            if kept.get(row.family, 0) < max_per_family:
                kept[row.family] = kept.get(row.family, 0) + 1
                picked.append(row)
        rows = picked
    by_key = {r.key: r for r in rows}
    frame = parse_size(size)
    keys, frames = _read(path, frame, list(by_key), None, f"read {path.name} labelled")
    if not frames:
        raise ValueError(f"none of the {len(by_key)} labelled frames in {path} could be read")
    if len(frames) < len(by_key):
        log.warning("%s: %d labelled frame(s) not found or unreadable", path, len(by_key) - len(frames))
    families = [by_key[k].family for k in keys]
    strengths = np.array([by_key[k].strength for k in keys], dtype=np.float32)
    return _stack(frames, frame), families, keys, strengths
