"""One iterator over frames stored as image folders, WebDataset tar shards or Parquet files.

Training and batch scoring both read data through ``iter_frames`` so they agree on keys, pixels
and the resize rule (docs/architecture.md, "Readers"). Keys are the same in every format:

- image folders (searched recursively, sorted, hidden entries skipped): the path relative to the
  folder given as a source, without extension and with '/' separators;
- tar shards (the WebDataset convention): the member path up to the first '.' of its basename;
  the image is the first of ``png``/``jpg``/``jpeg``/``webp`` found for the key, metadata is
  ``<key>.json``;
- Parquet: the ``key`` column; the image is the ``image`` column (raw bytes, or a
  ``{"bytes": ...}`` struct as Hugging Face datasets store it); other columns become metadata.

A folder source also yields the ``*.tar`` and ``*.parquet`` files inside it, and when it holds a
``labels.csv`` its loose images get ``family``/``split``/``strength`` metadata from it, so a
``dir`` data set carries the same metadata as a tar or Parquet one. In such a labelled folder the
labels define the data set: a loose image it does not list (``edgecase synth``'s contact sheet, a
plot) is not a frame and is skipped with a debug log line.

Bad data never ends a run: a frame that fails to decode is logged with its source and key,
counted in a ``ReadReport`` and skipped; a truncated tar or unreadable Parquet file is reported
by file name and reading goes on with the next source.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import zlib
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from contract.frames import DEFAULT_MAX_PIXELS, SUPPORTED_IMAGE_EXTENSIONS, decode_frame, decode_resized
from contract.labels import LABELS_FILENAME, LabelsError, read_labels

logger = logging.getLogger(__name__)

TAR_SUFFIXES: tuple[str, ...] = (".tar",)
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet",)
PARQUET_BATCH_ROWS = 256
"""Rows decoded per Parquet batch: bounds memory to one batch of image bytes."""
_TAR_IMAGE_EXTENSIONS = tuple(ext.lstrip(".") for ext in SUPPORTED_IMAGE_EXTENSIONS)
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)

Source = str | os.PathLike[str]


@dataclass
class Frame:
    """One decoded frame: ``image`` is uint8 ``(H, W, 3)`` RGB; ``source`` is the file it came from."""

    key: str
    image: npt.NDArray[np.uint8]
    meta: dict[str, Any]
    source: str


@dataclass
class ReadReport:
    """What a read did: frames yielded, frames skipped, and why (source, key, reason).

    Errors of a whole file (a truncated tar, an unreadable Parquet file) have key "" and are also
    counted in ``failed_sources``.
    """

    ok: int = 0
    failed: int = 0
    failed_sources: int = 0
    errors: list[tuple[str, str, str]] = field(default_factory=list)

    def add_frame_error(self, source: str, key: str, reason: str) -> None:
        """Record (and log) a frame that was skipped."""
        self.failed += 1
        self.errors.append((source, key, reason))
        logger.warning("skipped frame %r in %s: %s", key, source, reason)

    def add_source_error(self, source: str, reason: str) -> None:
        """Record (and log) a file whose remaining frames could not be read."""
        self.failed_sources += 1
        self.errors.append((source, "", reason))
        logger.warning("stopped reading %s: %s", source, reason)

    def summary(self) -> str:
        """One line for logs and CLI output."""
        text = f"read {self.ok:,} frames, skipped {self.failed:,}"
        if self.failed_sources:
            text += f", {self.failed_sources:,} unreadable file(s)"
        if self.errors:
            source, key, reason = self.errors[0]
            where = f"{source} [{key}]" if key else source
            text += f" (first error: {where}: {reason})"
        return text


def _as_paths(sources: Source | Sequence[Source]) -> list[Path]:
    if isinstance(sources, str | os.PathLike):
        return [Path(sources)]
    if isinstance(sources, bytes):
        raise TypeError("sources must be paths (str or Path), not bytes")
    return [Path(source) for source in sources]


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(SUPPORTED_IMAGE_EXTENSIONS):
        return "image"
    return None


def _walk_folder(root: Path) -> list[tuple[str, Path, str]]:
    """Every readable file under ``root`` as (relative posix path, path, kind), sorted."""
    found: list[tuple[str, Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue  # hidden files, including writers' in-progress .tmp files
            path = Path(dirpath) / name
            kind = _kind(path)
            if kind is not None:
                found.append((path.relative_to(root).as_posix(), path, kind))
    found.sort(key=lambda item: item[0])
    return found


def _folder_labels(root: Path, report: ReadReport) -> dict[str, dict[str, Any]] | None:
    """Metadata for loose images from ``root/labels.csv``; None if absent or unusable."""
    if not (root / LABELS_FILENAME).is_file():
        return None
    try:
        rows = read_labels(root)
    except (LabelsError, OSError, UnicodeDecodeError) as exc:
        report.add_source_error(str(root / LABELS_FILENAME), f"labels ignored: {exc}")
        return None
    return {row.key: {"family": row.family, "split": row.split, "strength": row.strength} for row in rows}


class _Reader:
    """Shared state of one ``iter_frames`` call."""

    def __init__(
        self,
        size: int | None,
        report: ReadReport,
        keys: Container[str] | None,
        max_pixels: int,
        key_column: str,
        image_column: str,
    ) -> None:
        self.size = size
        self.report = report
        self.keys = keys
        self.max_pixels = max_pixels
        self.key_column = key_column
        self.image_column = image_column

    def wanted(self, key: str) -> bool:
        return self.keys is None or key in self.keys

    def make_frame(self, key: str, data: bytes, meta: dict[str, Any], source: str) -> Frame | None:
        """Decode (and resize) one frame, or record why not."""
        try:
            if self.size is None:
                image = decode_frame(data, max_pixels=self.max_pixels)
            else:
                image = decode_resized(data, self.size, max_pixels=self.max_pixels)
        except ValueError as exc:  # FrameDecodeError, and anything else ValueError-shaped
            self.report.add_frame_error(source, key, str(exc))
            return None
        self.report.ok += 1
        return Frame(key=key, image=image, meta=meta, source=source)

    def read_image_file(self, path: Path, key: str, meta: dict[str, Any]) -> Iterator[Frame]:
        if not self.wanted(key):
            return
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.report.add_frame_error(str(path), key, f"cannot read file: {exc}")
            return
        frame = self.make_frame(key, data, meta, str(path))
        if frame is not None:
            yield frame

    def read_folder(self, root: Path) -> Iterator[Frame]:
        labels: dict[str, dict[str, Any]] | None = None
        labels_loaded = False  # at the first loose image
        for relative, path, kind in _walk_folder(root):
            if kind == "image":
                if not labels_loaded:
                    labels, labels_loaded = _folder_labels(root, self.report), True
                key = relative.rsplit(".", 1)[0]
                if labels is not None and key not in labels:
                    logger.debug("skipping %s: not listed in %s", path, root / LABELS_FILENAME)
                    continue
                meta = dict(labels[key]) if labels is not None else {}
                yield from self.read_image_file(path, key, meta)
            elif kind == "tar":
                yield from self.read_tar(path)
            else:
                yield from self.read_parquet(path)

    def read_tar(self, path: Path) -> Iterator[Frame]:
        source = str(path)
        groups = _tar_groups(path)
        seen: set[str] = set()
        while True:
            try:
                group = next(groups)
            except StopIteration:
                return
            except _TAR_ERRORS as exc:
                self.report.add_source_error(source, f"truncated or corrupt tar: {exc}")
                return
            key, members = group
            if key in seen:
                reason = "key appears twice in the shard (members not adjacent)"
                self.report.add_frame_error(source, key, reason)
                continue
            seen.add(key)
            if not self.wanted(key):
                continue
            image_ext = next((ext for ext in _TAR_IMAGE_EXTENSIONS if ext in members), None)
            if image_ext is None:
                found = ", ".join(sorted(members)) or "none"
                self.report.add_frame_error(source, key, f"no image member (found: {found})")
                continue
            meta: dict[str, Any] = {}
            if "json" in members:
                try:
                    loaded = json.loads(members["json"])
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    self.report.add_frame_error(source, key, f"bad {key}.json: {exc}")
                    continue
                if not isinstance(loaded, dict):
                    self.report.add_frame_error(source, key, f"{key}.json is not a JSON object")
                    continue
                meta = loaded
            frame = self.make_frame(key, members[image_ext], meta, source)
            if frame is not None:
                yield frame

    def read_parquet(self, path: Path) -> Iterator[Frame]:
        source = str(path)
        batches = _parquet_batches(path, self.key_column, self.image_column)
        while True:
            try:
                columns = next(batches)
            except StopIteration:
                return
            except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
                self.report.add_source_error(source, f"unreadable Parquet file: {exc}")
                return
            keys = columns.pop(self.key_column)
            images = columns.pop(self.image_column)
            for row, key in enumerate(keys):
                if key is None:
                    self.report.add_frame_error(source, f"<row {row}>", "missing key")
                    continue
                key = str(key)
                if not self.wanted(key):
                    continue
                data = images[row]
                if isinstance(data, dict):  # Hugging Face datasets' Image(): {"bytes", "path"}
                    data = data.get("bytes")
                if not isinstance(data, bytes):
                    self.report.add_frame_error(source, key, "no image bytes in this row")
                    continue
                meta = {name: values[row] for name, values in columns.items()}
                frame = self.make_frame(key, data, meta, source)
                if frame is not None:
                    yield frame

    def read_all(self, paths: list[Path]) -> Iterator[Frame]:
        for path in paths:
            yield from self.read_source(path)

    def read_source(self, path: Path) -> Iterator[Frame]:
        if path.is_dir():
            yield from self.read_folder(path)
            return
        kind = _kind(path)
        if kind == "tar":
            yield from self.read_tar(path)
        elif kind == "parquet":
            yield from self.read_parquet(path)
        elif kind == "image":
            yield from self.read_image_file(path, path.stem, {})
        else:
            raise ValueError(f"{path}: not a folder, .tar, .parquet or image file")


def _split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset: key = path up to the first '.' of the basename; the rest is the extension."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_groups(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for runs of adjacent members sharing a key.

    Shards are plain (uncompressed) tar, as WebDataset writes them, which keeps the offsets below
    meaningful. Only image and json members are read. Raises ``tarfile.ReadError`` when the
    archive is cut short, including a cut exactly on a member boundary (no end-of-archive blocks).
    """
    wanted = (*_TAR_IMAGE_EXTENSIONS, "json")
    file_size = path.stat().st_size
    with tarfile.open(path, mode="r:") as tar:
        current: str | None = None
        members: dict[str, bytes] = {}
        for info in tar:
            parsed = _split_member_name(info.name) if info.isfile() else None
            if parsed is None:
                continue
            key, ext = parsed
            if key != current:
                if current is not None:
                    yield current, members
                current, members = key, {}
            if ext in wanted and ext not in members:
                handle = tar.extractfile(info)
                assert handle is not None  # regular files always have data
                data = handle.read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"unexpected end of data in member {info.name}")
                members[ext] = data
        if current is not None:
            yield current, members
        # tarfile stops silently when the file ends on a header boundary; a complete archive
        # ends with two zero blocks, so compare offsets to tell "ended" from "cut short".
        if tar.offset + 2 * tarfile.BLOCKSIZE > file_size:
            raise tarfile.ReadError("archive ends without its end-of-archive blocks (truncated)")


def _parquet_batches(path: Path, key_column: str, image_column: str) -> Iterator[dict[str, list[Any]]]:
    """Yield column -> Python values for ``PARQUET_BATCH_ROWS`` rows at a time."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        names = parquet.schema_arrow.names
        missing = [column for column in (key_column, image_column) if column not in names]
        if missing:
            raise ValueError(f"missing column(s) {', '.join(missing)} (found: {', '.join(names)})")
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield {name: batch.column(name).to_pylist() for name in batch.schema.names}


def iter_frames(
    sources: Source | Sequence[Source],
    *,
    size: int | None = None,
    report: ReadReport | None = None,
    keys: Container[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    key_column: str = "key",
    image_column: str = "image",
) -> Iterator[Frame]:
    """Iterate over every decodable frame of ``sources`` in a deterministic order.

    ``sources``: a folder, ``.tar``, ``.parquet`` or image file, or a list of them (read in the
    order given). ``size`` resizes by the one rule (``contract.frames.decode_resized``); ``keys``
    keeps only frames whose key is in it (e.g. one split from labels.csv); ``report`` collects
    counts and errors. Arguments are checked at the call, not at the first ``next``: raises
    ``FileNotFoundError`` for a source that does not exist (a typo should stop a run; bad data
    inside a source should not).
    """
    paths = _as_paths(sources)
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"frame source not found: {path}")
        if not path.is_dir() and _kind(path) is None:
            raise ValueError(f"{path}: not a folder, .tar, .parquet or image file")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive integer or None, got {size!r}")
    reader = _Reader(
        size, report if report is not None else ReadReport(), keys, max_pixels, key_column, image_column
    )
    return reader.read_all(paths)


def count_frames(sources: Source | Sequence[Source]) -> int:
    """Number of candidate frames (before decoding), for progress-bar totals.

    Cheap for folders (file names) and Parquet (file metadata); a tar shard's headers are scanned
    without reading image data. Unreadable files count as 0.
    """
    import pyarrow.parquet as pq

    total = 0
    for path in _as_paths(sources):
        entries = _walk_folder(path) if path.is_dir() else [(path.name, path, _kind(path) or "")]
        for _, file, kind in entries:
            try:
                if kind == "image":
                    total += 1
                elif kind == "parquet":
                    total += pq.ParquetFile(file).metadata.num_rows
                elif kind == "tar":
                    total += _count_tar_keys(file)
            except (*_TAR_ERRORS, ValueError):
                continue
    return total


def _count_tar_keys(path: Path) -> int:
    keys: set[str] = set()
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            parsed = _split_member_name(info.name) if info.isfile() else None
            if parsed is not None and parsed[1] in _TAR_IMAGE_EXTENSIONS:
                keys.add(parsed[0])
    return len(keys)
