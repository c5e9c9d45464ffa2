"""Frame writers for the three on-disk formats: a folder of PNGs, WebDataset tar shards, Parquet.

``open_writer`` is what ``edgecase synth`` (and anything else that writes frames) uses, so the
readers in ``contract.readers`` get back exactly the same keys and pixels (docs/architecture.md,
"Data on disk"). Every file is written under a temporary name in its final folder and moved into
place with ``os.replace``: a crash leaves at most a ``.tmp`` file, never a half-written shard or PNG
under its real name (no fsync: this guards against a killed process, not a power cut). PNGs use
compress level 1 because generation must reach thousands of frames/s and zlib at higher levels
would dominate the cost. On this machine the ``dir`` format is bound by file creation (roughly
1,000-1,700 files/s whatever the writer does); tar and Parquet write 6,000+ frames/s at 64x64.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from contract.frames import encode_png

WriterFormat = Literal["dir", "tar", "parquet"]
FORMATS: tuple[str, ...] = ("dir", "tar", "parquet")
RESERVED_COLUMNS = frozenset({"key", "image"})
PARQUET_ROW_GROUP_SIZE = 256
"""Rows per Parquet row group: readers decode one group at a time, so this bounds their memory."""


class FrameWriter(Protocol):
    """What ``open_writer`` yields."""

    def write(self, key: str, image: npt.NDArray[np.uint8] | bytes, meta: Mapping[str, Any]) -> str:
        """Store one frame; return the path (relative to ``out_dir``) of the file that holds it."""
        ...


def validate_key(key: str) -> str:
    """Refuse keys that cannot round-trip through all three formats (or escape ``out_dir``)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a frame key is a non-empty string, got {key!r}")
    if "\\" in key or key.startswith("/"):
        raise ValueError(f"key {key!r} must be a relative path with '/' separators")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"key {key!r} has an empty, '.' or '..' component")
    if "." in parts[-1]:
        # WebDataset groups tar members by the basename up to its first '.'.
        raise ValueError(f"key {key!r}: the last component must not contain '.'")
    return key


def _png_bytes(image: npt.NDArray[np.uint8] | bytes) -> bytes:
    """Accept a frame, or PNG bytes a caller already encoded (e.g. in a worker process)."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError("image bytes given to a writer must be PNG-encoded")
        return data
    return encode_png(image, compress_level=1)


def _tmp_name(final: Path) -> Path:
    """Temporary sibling of ``final``: same folder, so ``os.replace`` is an atomic rename."""
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


class DirWriter:
    """``out_dir/<key>.png``; metadata is not stored here (it lives in labels.csv)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._made_dirs: set[Path] = set()

    def write(self, key: str, image: npt.NDArray[np.uint8] | bytes, meta: Mapping[str, Any]) -> str:
        """Write ``<key>.png`` atomically; ``meta`` is accepted for interface parity and ignored."""
        validate_key(key)
        data = _png_bytes(image)
        final = self.out_dir / f"{key}.png"
        if final.parent not in self._made_dirs:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(final.parent)
        tmp = _tmp_name(final)
        # Raw os.open/os.write: per-file overhead dominates small PNGs, and file objects add to it.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return f"{key}.png"

    def close(self) -> None:
        """Nothing is buffered."""

    def abort(self) -> None:
        """Every PNG is already complete or absent."""


class _ShardWriter:
    """Common shard bookkeeping: numbering, rollover after ``shard_size`` frames, atomic close."""

    suffix = ""

    def __init__(self, out_dir: Path, split: str, shard_size: int) -> None:
        self.out_dir = out_dir
        self.split = split
        self.shard_size = shard_size
        self.shard_index = 0
        self.in_shard = 0
        self.shards: list[str] = []

    @property
    def shard_name(self) -> str:
        return f"{self.split}-{self.shard_index:05d}{self.suffix}"

    def write(self, key: str, image: npt.NDArray[np.uint8] | bytes, meta: Mapping[str, Any]) -> str:
        """Append a frame to the open shard, starting a new shard when the current one is full."""
        validate_key(key)
        data = _png_bytes(image)
        if self.in_shard == 0:
            self._start(self.out_dir / self.shard_name)
        name = self.shard_name
        self._add(key, data, meta)
        self.in_shard += 1
        if self.in_shard >= self.shard_size:
            self._finish_shard()
        return name

    def _finish_shard(self) -> None:
        final = self.out_dir / self.shard_name
        self._finish(final)
        self.shards.append(final.name)
        self.shard_index += 1
        self.in_shard = 0

    def close(self) -> None:
        """Finalise the last, partly filled shard (if any)."""
        if self.in_shard:
            self._finish_shard()

    def _start(self, final: Path) -> None:
        raise NotImplementedError

    def _add(self, key: str, data: bytes, meta: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _finish(self, final: Path) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class TarWriter(_ShardWriter):
    """WebDataset shards ``<split>-<n:05d>.tar`` with members ``<key>.png`` and ``<key>.json``."""

    suffix = ".tar"

    def __init__(self, out_dir: Path, split: str, shard_size: int) -> None:
        super().__init__(out_dir, split, shard_size)
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None

    def _start(self, final: Path) -> None:
        self._tmp = _tmp_name(final)
        # Kept open across write() calls and closed in _finish/abort, so no `with` block here.
        self._tar = tarfile.open(self._tmp, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def _add(self, key: str, data: bytes, meta: Mapping[str, Any]) -> None:
        assert self._tar is not None
        payload = json.dumps(dict(meta), sort_keys=True).encode()
        for name, blob in ((f"{key}.png", data), (f"{key}.json", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            info.mode = 0o644
            info.mtime = 0  # fixed, so a seeded run writes byte-identical shards
            self._tar.addfile(info, io.BytesIO(blob))

    def _finish(self, final: Path) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        os.replace(self._tmp, final)
        self._tar, self._tmp = None, None

    def abort(self) -> None:
        """Drop the open shard's temporary file."""
        if self._tar is not None:
            self._tar.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar, self._tmp = None, None


class ParquetWriter(_ShardWriter):
    """Parquet shards ``<split>-<n:05d>.parquet``: columns key, image (PNG bytes), then meta fields.

    A shard's rows are buffered and written at once so that column types are inferred over the
    whole shard (an int ``0`` and a float ``0.4`` in one column become float64). Memory is one
    shard of PNG bytes; row groups of ``PARQUET_ROW_GROUP_SIZE`` keep reading cheap.
    """

    suffix = ".parquet"

    def __init__(self, out_dir: Path, split: str, shard_size: int) -> None:
        super().__init__(out_dir, split, shard_size)
        self._columns: dict[str, list[Any]] = {}
        self._meta_fields: tuple[str, ...] | None = None

    def _start(self, final: Path) -> None:
        self._columns = {"key": [], "image": []}
        self._meta_fields = None

    def _add(self, key: str, data: bytes, meta: Mapping[str, Any]) -> None:
        fields = tuple(meta)
        if self._meta_fields is None:
            clash = RESERVED_COLUMNS.intersection(fields)
            if clash:
                raise ValueError(f"meta fields {sorted(clash)} clash with the key/image columns")
            self._meta_fields = fields
            for field in fields:
                self._columns[field] = []
        elif set(fields) != set(self._meta_fields):
            raise ValueError(
                f"frame {key!r}: meta fields {sorted(fields)} differ from the shard's "
                f"{sorted(self._meta_fields)}; every frame in a Parquet shard needs the same fields"
            )
        self._columns["key"].append(key)
        self._columns["image"].append(data)
        for field in self._meta_fields:
            self._columns[field].append(meta[field])

    def _finish(self, final: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = {"key": pa.array(self._columns["key"], pa.string())}
        arrays["image"] = pa.array(self._columns["image"], pa.binary())
        for field in self._meta_fields or ():
            try:
                arrays[field] = pa.array(self._columns[field])
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise ValueError(f"meta field {field!r} has values Parquet cannot store: {exc}") from exc
        table = pa.table(arrays)
        tmp = _tmp_name(final)
        try:
            # PNG bytes do not compress further; skip codec work on the image column.
            pq.write_table(
                table,
                tmp,
                row_group_size=PARQUET_ROW_GROUP_SIZE,
                compression={name: ("none" if name == "image" else "snappy") for name in table.column_names},
            )
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._columns = {}

    def abort(self) -> None:
        """Nothing is on disk until a shard is finished; drop the buffer."""
        self._columns = {}


@contextlib.contextmanager
def open_writer(
    out_dir: Path | str, fmt: WriterFormat, split: str, shard_size: int = 2000
) -> Iterator[FrameWriter]:
    """Open a writer for one split; shards are finalised on exit, or discarded if the block raises.

    ``writer.write(key, image, meta)`` takes a uint8 ``(H, W, 3)`` frame (or ready PNG bytes) and
    returns the file holding it relative to ``out_dir`` (``<key>.png`` or ``<split>-<n:05d>.tar``).
    """
    out = Path(out_dir)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not split or "/" in split or "\\" in split or split.startswith("."):
        raise ValueError(f"split {split!r} must be a plain name such as 'train'")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    out.mkdir(parents=True, exist_ok=True)
    writer: DirWriter | TarWriter | ParquetWriter
    if fmt == "dir":
        writer = DirWriter(out)
    elif fmt == "tar":
        writer = TarWriter(out, split, shard_size)
    else:
        writer = ParquetWriter(out, split, shard_size)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    writer.close()
