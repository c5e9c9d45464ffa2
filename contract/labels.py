"""The labels file: which frames are normal, which are edge cases, and how strong.

``edgecase synth`` writes ``OUT/labels.csv`` next to its frames, and a user labels their own folder
with the same file. Format (UTF-8 CSV with a header row; column order and case do not matter,
extra columns are ignored)::

    key,path,split,family,strength
    test/fog/fog_000012,test-00000.tar,test,fog,0.73
    train/normal/normal_000001,train/normal/normal_000001.png,train,normal,0

- ``key``: the frame's key as ``contract.readers.iter_frames`` yields it. Optional when ``path``
  names a loose image: the key is then that path without its extension (``cam1/0001.jpg`` ->
  ``cam1/0001``), which is exactly the key the folder reader gives the file.
- ``path``: the file that holds the frame, relative to the folder (an image, or the tar/Parquet
  shard). Optional when ``key`` is given (left empty then). At least one of ``key``/``path``.
- ``family``: required. ``normal`` for normal frames (any case), otherwise the edge-case family
  (``fog``, ``pedestrian``, or your own name).
- ``split``: ``train``, ``val`` or ``test``; empty or missing means ``test``.
- ``strength``: a number in [0, 1], how pronounced the edge case is; empty or missing means 0.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

LABELS_FILENAME = "labels.csv"
COLUMNS: tuple[str, ...] = ("key", "path", "split", "family", "strength")
SPLITS: tuple[str, ...] = ("train", "val", "test")
NORMAL_FAMILY = "normal"
DEFAULT_SPLIT = "test"
_SHARD_SUFFIXES = (".tar", ".parquet", ".tgz", ".gz")


class LabelsError(ValueError):
    """A labels file that cannot be used; the message names the file (and line) to fix."""


@dataclass(frozen=True)
class LabelRow:
    """One labelled frame. ``path`` is "" when the labels file gave only a key."""

    key: str
    path: str
    split: str
    family: str
    strength: float

    @property
    def normal(self) -> bool:
        """True for frames of the ``normal`` family."""
        return is_normal(self.family)


def is_normal(family: str) -> bool:
    """Whether a family name means a normal frame (case and surrounding spaces ignored)."""
    return family.strip().lower() == NORMAL_FAMILY


def _labels_file(folder: Path | str) -> Path:
    """Accept the folder holding ``labels.csv`` or the CSV file itself."""
    path = Path(folder)
    return path if path.suffix.lower() == ".csv" else path / LABELS_FILENAME


def _clean_path(raw: str) -> str:
    """Normalise a user's relative path to '/' separators without a leading './'."""
    text = raw.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text


def _key_from_path(path: str) -> str:
    pure = PurePosixPath(path)
    return str(pure.with_suffix("")) if pure.suffix else str(pure)


def read_labels(folder: Path | str) -> list[LabelRow]:
    """Read ``folder/labels.csv`` (or a CSV path) into rows, filling defaults for split/strength.

    Raises ``FileNotFoundError`` if the file is missing and ``LabelsError`` naming the file, line
    and column for a missing column, an empty family, a bad split or strength, or a duplicate key.
    """
    csv_path = _labels_file(folder)
    if not csv_path.is_file():
        raise FileNotFoundError(f"no labels file at {csv_path} (expected columns: {', '.join(COLUMNS)})")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise LabelsError(f"{csv_path}: empty file, expected a header row ({', '.join(COLUMNS)})")
        names = {name.strip().lower(): name for name in reader.fieldnames if name is not None}
        if "family" not in names:
            raise LabelsError(f"{csv_path}: missing column 'family' (found: {', '.join(reader.fieldnames)})")
        if "key" not in names and "path" not in names:
            raise LabelsError(
                f"{csv_path}: needs a 'key' or a 'path' column (found: {', '.join(reader.fieldnames)})"
            )
        rows: list[LabelRow] = []
        seen: dict[str, int] = {}
        for line, record in enumerate(reader, start=2):
            cells = {column: (record.get(original) or "").strip() for column, original in names.items()}
            rows.append(_parse_row(f"{csv_path}:{line}", cells))
            key = rows[-1].key
            if key in seen:
                raise LabelsError(f"{csv_path}:{line}: key {key!r} already labelled on line {seen[key]}")
            seen[key] = line
    return rows


def _parse_row(where: str, cells: dict[str, str]) -> LabelRow:
    """Turn one CSV record (lower-cased column -> stripped text) into a row; ``where`` is file:line."""
    path = _clean_path(cells.get("path", ""))
    key = _clean_path(cells.get("key", ""))
    if not key:
        if not path:
            raise LabelsError(f"{where}: both 'key' and 'path' are empty")
        if path.lower().endswith(_SHARD_SUFFIXES):
            raise LabelsError(f"{where}: path {path!r} is a shard; give the frame's 'key' as well")
        key = _key_from_path(path)
    family = cells.get("family", "")
    if not family:
        raise LabelsError(f"{where}: empty 'family' (use 'normal' for normal frames)")
    split = cells.get("split", "").lower() or DEFAULT_SPLIT
    if split not in SPLITS:
        raise LabelsError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    strength_text = cells.get("strength", "")
    try:
        strength = float(strength_text) if strength_text else 0.0
    except ValueError as exc:
        raise LabelsError(f"{where}: strength {strength_text!r} is not a number") from exc
    if not math.isfinite(strength) or not 0.0 <= strength <= 1.0:
        raise LabelsError(f"{where}: strength {strength_text!r} is outside [0, 1]")
    return LabelRow(key=key, path=path, split=split, family=family, strength=strength)


def write_labels(folder: Path | str, rows: Iterable[LabelRow]) -> Path:
    """Write ``folder/labels.csv`` atomically (temp file, then rename) and return its path."""
    csv_path = _labels_file(folder)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(COLUMNS)
            for row in rows:
                # repr(float) round-trips exactly through float().
                writer.writerow([row.key, row.path, row.split, row.family, repr(float(row.strength))])
        os.replace(tmp, csv_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return csv_path
