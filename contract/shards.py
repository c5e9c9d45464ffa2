"""Data sets as a list of shards: the unit batch scoring writes, resumes and distributes.

A tar or Parquet file is one shard. The loose images of a folder are cut into chunks of
``chunk_size`` files in sorted order, each chunk a shard, so a folder of a million JPEGs resumes in
pieces too. Each shard has a name, unique across the run, that becomes its output file
(``OUT_DIR/<name>.parquet``): the file's path relative to the folder given as a source, without
its extension, with ``/`` written as ``__``; a chunk of loose images is ``<folder>.images-00000``.

A ``Shard`` holds only strings (paths or fsspec URLs), so it pickles to a Ray task or a worker
process, which reads it with :func:`shard_records` (the same reader as ``iter_frames``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from contract.readers import (
    PARQUET_SUFFIXES,
    TAR_SUFFIXES,
    ReadReport,
    Record,
    _check_sources,
    _kind,
    _RecordReader,
    _walk_folder,
)
from contract.storage import as_location

DEFAULT_CHUNK_SIZE = 1000
"""Loose images per shard: small enough to resume cheaply, large enough for few output files."""

ShardKind = str  # "tar" | "parquet" | "images"


@dataclass(frozen=True)
class Shard:
    """One unit of work: a tar or Parquet file, or a chunk of a folder's loose images."""

    name: str
    kind: ShardKind
    source: str  # the file, or the folder an image chunk comes from
    images: tuple[str, ...] = ()  # image chunks: paths relative to ``source``, in order


def _shard_name(relative: str) -> str:
    """``sub/dir/shard-0001.tar`` -> ``sub__dir__shard-0001``."""
    folder, _, base = relative.rpartition("/")
    lower = base.lower()
    for suffix in (*TAR_SUFFIXES, *PARQUET_SUFFIXES):
        if lower.endswith(suffix):
            base = base[: -len(suffix)]
            break
    else:
        base = base.rsplit(".", 1)[0]
    return f"{folder.replace('/', '__')}__{base}" if folder else base


def list_shards(
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[Shard]:
    """The shards of ``sources`` (paths or fsspec URLs) in reading order.

    Raises ``FileNotFoundError`` for a missing source and ``ValueError`` for an unknown file type
    or two shards that would write the same output name.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    shards: list[Shard] = []
    for location in _check_sources(sources):
        if not location.is_dir():
            kind = _kind(location)
            if kind == "image":
                shards.append(
                    Shard(_shard_name(location.name), "images", str(location.parent), (location.name,))
                )
            else:
                shards.append(Shard(_shard_name(location.name), str(kind), str(location)))
            continue
        images: list[str] = []
        for relative, path, kind in _walk_folder(location):
            if kind == "image":
                images.append(relative)
            else:
                shards.append(Shard(_shard_name(relative), kind, str(path)))
        folder = location.name or "root"
        for start in range(0, len(images), chunk_size):
            chunk = tuple(images[start : start + chunk_size])
            shards.append(Shard(f"{folder}.images-{start // chunk_size:05d}", "images", str(location), chunk))
    seen: dict[str, Shard] = {}
    for shard in shards:
        if shard.name in seen:
            raise ValueError(
                f"two shards would both write {shard.name}.parquet: {seen[shard.name].source} and "
                f"{shard.source} (score them in separate runs or rename one)"
            )
        seen[shard.name] = shard
    return shards


def shard_records(
    shard: Shard,
    *,
    report: ReadReport | None = None,
    key_column: str = "key",
    image_column: str = "image",
) -> Iterator[Record]:
    """Every record of one shard, errors included (a file-level error as one ``whole_source`` record)."""
    reader = _RecordReader(report if report is not None else ReadReport(), None, key_column, image_column)
    if shard.kind == "tar":
        return reader.read_tar(as_location(shard.source))
    if shard.kind == "parquet":
        return reader.read_parquet(as_location(shard.source))
    root = as_location(shard.source)
    return reader.loose_images(root, [(relative, root / relative) for relative in shard.images])
