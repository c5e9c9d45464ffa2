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

from contract.frames import (
    DEFAULT_MAX_PIXELS,
    RESIZE_RULE,
    RESIZE_RULES,
    SUPPORTED_IMAGE_EXTENSIONS,
    FrameSize,
    decode_frame,
    decode_resized,
    frame_size,
)
from contract.labels import LABELS_FILENAME, LabelsError, read_labels
from contract.storage import RemotePath, as_location, file_size, open_binary

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


def _as_locations(sources: Source | Sequence[Source]) -> list[Path | RemotePath]:
    if isinstance(sources, str | os.PathLike):
        return [as_location(sources)]
    if isinstance(sources, bytes):
        raise TypeError("sources must be paths (str or Path), not bytes")
    return [as_location(source) for source in sources]


def _kind(path: Path | RemotePath) -> str | None:
    name = path.name.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(SUPPORTED_IMAGE_EXTENSIONS):
        return "image"
    return None


def _walk_folder(root: Path | RemotePath) -> list[tuple[str, Path | RemotePath, str]]:
    """Every readable file under ``root`` as (relative posix path, location, kind), sorted."""
    found: list[tuple[str, Path | RemotePath, str]] = []
    if isinstance(root, RemotePath):
        for relative, location in root.files():
            if any(part.startswith(".") for part in relative.split("/")):
                continue  # hidden files, including writers' in-progress .tmp files
            kind = _kind(location)
            if kind is not None:
                found.append((relative, location, kind))
        found.sort(key=lambda item: item[0])
        return found
    # Symbolic links to folders are followed (a data folder is often a link to a mounted disk), each
    # real folder once, so a link cycle ends.
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for name in dirnames:
            real = os.path.realpath(os.path.join(dirpath, name))
            if not name.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith("."):
                continue  # hidden files, including writers' in-progress .tmp files
            path = Path(dirpath) / name
            kind = _kind(path)
            if kind is not None:
                found.append((path.relative_to(root).as_posix(), path, kind))
    found.sort(key=lambda item: item[0])
    return found


def _folder_labels(root: Path | RemotePath, report: ReadReport) -> dict[str, dict[str, Any]] | None:
    """Metadata for loose images from ``root/labels.csv``; None if absent or unusable.

    Only local folders: an object-store folder's loose images are read without labels.
    """
    if isinstance(root, RemotePath) or not (root / LABELS_FILENAME).is_file():
        return None
    try:
        rows = read_labels(root)
    except (LabelsError, OSError, UnicodeDecodeError) as exc:
        report.add_source_error(str(root / LABELS_FILENAME), f"labels ignored: {exc}")
        return None
    return {row.key: {"family": row.family, "split": row.split, "strength": row.strength} for row in rows}


@dataclass(frozen=True)
class Record:
    """One frame as stored, before decoding: its bytes, or (``error`` set) why it has none.

    ``whole_source`` marks an error of the file itself (a truncated tar, an unreadable Parquet
    file): nothing after it in that file could be read. Such records have key "".
    """

    key: str
    data: bytes | None
    meta: dict[str, Any]
    source: str
    error: str | None = None
    whole_source: bool = False


class _RecordReader:
    """Raw records (bytes + metadata, or an error) of folders, tar shards and Parquet files, in order."""

    def __init__(
        self,
        report: ReadReport,
        keys: Container[str] | None = None,
        key_column: str = "key",
        image_column: str = "image",
    ) -> None:
        self.report = report  # only for labels.csv problems; frame errors are records
        self.keys = keys
        self.key_column = key_column
        self.image_column = image_column

    def wanted(self, key: str) -> bool:
        return self.keys is None or key in self.keys

    def read_image_file(self, path: Path | RemotePath, key: str, meta: dict[str, Any]) -> Iterator[Record]:
        if not self.wanted(key):
            return
        try:
            data = path.read_bytes()
        except OSError as exc:
            yield Record(key, None, meta, str(path), f"cannot read file: {exc}")
            return
        yield Record(key, data, meta, str(path))

    def loose_images(
        self, root: Path | RemotePath, entries: Sequence[tuple[str, Path | RemotePath]]
    ) -> Iterator[Record]:
        """Loose images of a folder (relative path, location), keyed relative to ``root``."""
        labels = _folder_labels(root, self.report) if entries else None
        for relative, path in entries:
            key = relative.rsplit(".", 1)[0]
            if labels is not None and key not in labels:
                logger.debug("skipping %s: not listed in %s", path, root / LABELS_FILENAME)
                continue
            meta = dict(labels[key]) if labels is not None else {}
            yield from self.read_image_file(path, key, meta)

    def read_folder(self, root: Path | RemotePath) -> Iterator[Record]:
        entries = _walk_folder(root)
        # Files in sorted order, loose images where they sort among the shards.
        labels: dict[str, dict[str, Any]] | None = None
        labels_loaded = False
        for relative, path, kind in entries:
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

    def read_tar(self, path: Path | RemotePath) -> Iterator[Record]:
        source = str(path)
        groups = _tar_groups(path)
        seen: set[str] = set()
        while True:
            try:
                group = next(groups)
            except StopIteration:
                return
            except _TAR_ERRORS as exc:
                yield Record("", None, {}, source, f"truncated or corrupt tar: {exc}", whole_source=True)
                return
            key, members = group
            if key in seen:
                yield Record(key, None, {}, source, "key appears twice in the shard (members not adjacent)")
                continue
            seen.add(key)
            if not self.wanted(key):
                continue
            image_ext = next((ext for ext in _TAR_IMAGE_EXTENSIONS if ext in members), None)
            if image_ext is None:
                found = ", ".join(sorted(members)) or "none"
                yield Record(key, None, {}, source, f"no image member (found: {found})")
                continue
            meta: dict[str, Any] = {}
            if "json" in members:
                try:
                    loaded = json.loads(members["json"])
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    yield Record(key, None, {}, source, f"bad {key}.json: {exc}")
                    continue
                if not isinstance(loaded, dict):
                    yield Record(key, None, {}, source, f"{key}.json is not a JSON object")
                    continue
                meta = loaded
            yield Record(key, members[image_ext], meta, source)

    def read_parquet(self, path: Path | RemotePath) -> Iterator[Record]:
        source = str(path)
        batches = _parquet_batches(path, self.key_column, self.image_column)
        while True:
            try:
                columns = next(batches)
            except StopIteration:
                return
            except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
                yield Record("", None, {}, source, f"unreadable Parquet file: {exc}", whole_source=True)
                return
            keys = columns.pop(self.key_column)
            images = columns.pop(self.image_column)
            for row, key in enumerate(keys):
                if key is None:
                    yield Record(f"<row {row}>", None, {}, source, "missing key")
                    continue
                key = str(key)
                if not self.wanted(key):
                    continue
                data = images[row]
                if isinstance(data, dict):  # Hugging Face datasets' Image(): {"bytes", "path"}
                    data = data.get("bytes")
                meta = {name: values[row] for name, values in columns.items()}
                if not isinstance(data, bytes):
                    yield Record(key, None, meta, source, "no image bytes in this row")
                    continue
                yield Record(key, data, meta, source)

    def read_all(self, paths: list[Path | RemotePath]) -> Iterator[Record]:
        for path in paths:
            yield from self.read_source(path)

    def read_source(self, path: Path | RemotePath) -> Iterator[Record]:
        if path.is_dir():
            yield from self.read_folder(path)
            return
        kind = _kind(path)
        if kind == "tar":
            yield from self.read_tar(path)
        elif kind == "parquet":
            yield from self.read_parquet(path)
        elif kind == "image":
            yield from self.read_image_file(path, _stem(path), {})
        else:
            raise ValueError(f"{path}: not a folder, .tar, .parquet or image file")


def _stem(path: Path | RemotePath) -> str:
    return path.stem if isinstance(path, Path) else path.name.rsplit(".", 1)[0]


def _split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset: key = path up to the first '.' of the basename; the rest is the extension."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_groups(path: Path | RemotePath) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for runs of adjacent members sharing a key.

    Shards are plain (uncompressed) tar, as WebDataset writes them, which keeps the offsets below
    meaningful. The tar is read as a stream (no seeks), so an object store is read front to back.
    Only image and json members are read. Raises ``tarfile.ReadError`` when the
    archive is cut short, including a cut exactly on a member boundary (no end-of-archive blocks).
    """
    wanted = (*_TAR_IMAGE_EXTENSIONS, "json")
    file_size_ = file_size(path)
    with open_binary(path) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
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
                member = tar.extractfile(info)
                assert member is not None  # regular files always have data
                data = member.read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"unexpected end of data in member {info.name}")
                members[ext] = data
        if current is not None:
            yield current, members
        # tarfile stops silently when the file ends on a header boundary; a complete archive
        # ends with two zero blocks, so compare offsets to tell "ended" from "cut short".
        if tar.offset + 2 * tarfile.BLOCKSIZE > file_size_:
            raise tarfile.ReadError("archive ends without its end-of-archive blocks (truncated)")


def _parquet_batches(
    path: Path | RemotePath, key_column: str, image_column: str
) -> Iterator[dict[str, list[Any]]]:
    """Yield column -> Python values for ``PARQUET_BATCH_ROWS`` rows at a time."""
    import pyarrow.parquet as pq

    with open_binary(path) as handle, pq.ParquetFile(handle) as parquet:
        names = parquet.schema_arrow.names
        missing = [column for column in (key_column, image_column) if column not in names]
        if missing:
            raise ValueError(f"missing column(s) {', '.join(missing)} (found: {', '.join(names)})")
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield {name: batch.column(name).to_pylist() for name in batch.schema.names}


def _check_sources(sources: Source | Sequence[Source]) -> list[Path | RemotePath]:
    """Locations of ``sources``; a missing source or an unknown file type stops the run here."""
    paths = _as_locations(sources)
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"frame source not found: {path}")
        if not path.is_dir() and _kind(path) is None:
            raise ValueError(f"{path}: not a folder, .tar, .parquet or image file")
    return paths


def iter_records(
    sources: Source | Sequence[Source],
    *,
    report: ReadReport | None = None,
    keys: Container[str] | None = None,
    key_column: str = "key",
    image_column: str = "image",
) -> Iterator[Record]:
    """Every frame of ``sources`` as stored (bytes, not pixels), errors included, in reading order.

    What ``iter_frames`` decodes, for callers that decode elsewhere (batch scoring's worker pool).
    Sources are paths or fsspec URLs (``s3://bucket/shards/``).
    """
    paths = _check_sources(sources)
    reader = _RecordReader(report if report is not None else ReadReport(), keys, key_column, image_column)
    return reader.read_all(paths)


def iter_frames(
    sources: Source | Sequence[Source],
    *,
    size: int | str | tuple[int, int] | None = None,
    rule: str = RESIZE_RULE,
    report: ReadReport | None = None,
    keys: Container[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    key_column: str = "key",
    image_column: str = "image",
) -> Iterator[Frame]:
    """Iterate over every decodable frame of ``sources`` in a deterministic order.

    ``sources``: a folder, ``.tar``, ``.parquet`` or image file, or a list of them (read in the
    order given); paths or fsspec URLs. ``size`` (``64``, ``"256x144"`` or ``(h, w)``) resizes by
    ``rule`` (``contract.frames.decode_resized``; fit-pad by default); ``keys`` keeps only frames
    whose key is in it (e.g. one split from labels.csv); ``report`` collects counts and errors.
    Arguments are checked at the call, not at the first ``next``: raises ``FileNotFoundError`` for a
    source that does not exist (a typo should stop a run; bad data inside a source should not).
    """
    target = None if size is None else frame_size(size)
    if rule not in RESIZE_RULES:
        raise ValueError(f"unknown resize rule {rule!r}; known: {', '.join(RESIZE_RULES)}")
    report = report if report is not None else ReadReport()
    records = iter_records(
        sources, report=report, keys=keys, key_column=key_column, image_column=image_column
    )
    return _decode_records(records, target, rule, max_pixels, report)


def _decode_records(
    records: Iterator[Record], size: FrameSize | None, rule: str, max_pixels: int, report: ReadReport
) -> Iterator[Frame]:
    for record in records:
        if record.whole_source:
            report.add_source_error(record.source, record.error or "unreadable")
            continue
        if record.error is not None or record.data is None:
            report.add_frame_error(record.source, record.key, record.error or "no image bytes")
            continue
        try:
            if size is None:
                image = decode_frame(record.data, max_pixels=max_pixels)
            else:
                image = decode_resized(record.data, size, rule=rule, max_pixels=max_pixels)
        except ValueError as exc:  # FrameDecodeError, and anything else ValueError-shaped
            report.add_frame_error(record.source, record.key, str(exc))
            continue
        report.ok += 1
        yield Frame(key=record.key, image=image, meta=record.meta, source=record.source)


def count_frames(sources: Source | Sequence[Source]) -> int:
    """Number of candidate frames (before decoding), for progress-bar totals.

    Cheap for folders (file names) and Parquet (file metadata); a tar shard's headers are scanned
    without reading image data. Unreadable files count as 0.
    """
    import pyarrow.parquet as pq

    total = 0
    for path in _as_locations(sources):
        entries = _walk_folder(path) if path.is_dir() else [(path.name, path, _kind(path) or "")]
        for _, file, kind in entries:
            try:
                if kind == "image":
                    total += 1
                elif kind == "parquet":
                    with open_binary(file) as handle:
                        total += pq.ParquetFile(handle).metadata.num_rows
                elif kind == "tar":
                    total += _count_tar_keys(file)
            except (*_TAR_ERRORS, ValueError):
                continue
    return total


def _count_tar_keys(path: Path | RemotePath) -> int:
    keys: set[str] = set()
    with open_binary(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        for info in tar:
            parsed = _split_member_name(info.name) if info.isfile() else None
            if parsed is not None and parsed[1] in _TAR_IMAGE_EXTENSIONS:
                keys.add(parsed[0])
    return len(keys)
