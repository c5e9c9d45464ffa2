"""What batch scoring writes: one Parquet file per shard, and ``_summary.json`` for the run.

``OUT_DIR/<shard>.parquet`` has one row per frame of the shard, in reading order, with columns
key, source, score, p_value, is_edge_case and error (score, p_value and is_edge_case are null
when the frame could not be decoded, error is null when it scored). Its schema metadata says
what made it (model, version, head, threshold, target FPR, the model file's sha256, the edgecase
version, and the shard's source), so ``--resume`` can tell a finished shard from one made by
another model, and a reader never needs the run's logs.

Files are written whole to a hidden temporary name and renamed (``contract.storage.write_atomic``);
nothing in them depends on the clock, so a rerun writes byte-identical files. Both engines
(local and Ray) write through :func:`write_shard`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from contract.manifest import MODEL_FILE
from contract.storage import RemotePath, open_binary, write_atomic
from edgecase import __version__
from service.registry import LoadedModel

log = logging.getLogger(__name__)

SUMMARY_FILE = "_summary.json"
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("score", pa.float64()),
        ("p_value", pa.float64()),
        ("is_edge_case", pa.bool_()),
        ("error", pa.string()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
RUN_KEYS: tuple[str, ...] = ("model", "version", "head", "threshold", "target_fpr", "model_sha256")
"""Metadata that must match for ``--resume`` to keep a shard (plus its ``source``)."""


def model_metadata(model: LoadedModel) -> dict[str, str]:
    """The model half of every output file's metadata (numbers as decimal text)."""
    manifest = model.manifest
    return {
        "model": model.name,
        "version": str(model.version),
        "head": manifest.model.head,
        "threshold": repr(float(manifest.threshold.value)),
        "target_fpr": repr(float(manifest.threshold.target_fpr)),
        "model_sha256": manifest.files[MODEL_FILE].sha256,
        "edgecase_version": __version__,
    }


@dataclass
class ShardRows:
    """One shard's rows, in reading order, as columns."""

    key: list[str]
    source: list[str]
    score: list[float | None]
    p_value: list[float | None]
    is_edge_case: list[bool | None]
    error: list[str | None]

    @classmethod
    def empty(cls) -> ShardRows:
        return cls([], [], [], [], [], [])

    def extend(self, other: ShardRows) -> None:
        for name in COLUMNS:
            getattr(self, name).extend(getattr(other, name))

    def __len__(self) -> int:
        return len(self.key)

    @property
    def edge_cases(self) -> int:
        return sum(1 for flag in self.is_edge_case if flag)

    @property
    def errors(self) -> int:
        return sum(1 for error in self.error if error is not None)


def shard_path(out_dir: Path | RemotePath, shard: str) -> Path | RemotePath:
    return out_dir / f"{shard}.parquet"


def encode_shard(rows: ShardRows, metadata: Mapping[str, str]) -> bytes:
    """The Parquet bytes of one shard: deterministic for the same rows and metadata."""
    table = pa.table({name: getattr(rows, name) for name in COLUMNS}, schema=SCHEMA)
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in sorted(metadata.items())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return bytes(sink.getvalue().to_pybytes())


def write_shard(
    out_dir: Path | RemotePath, shard: str, source: str, rows: ShardRows, model_meta: Mapping[str, str]
) -> None:
    """Write ``OUT_DIR/<shard>.parquet`` atomically (the one writer of both engines)."""
    write_atomic(shard_path(out_dir, shard), encode_shard(rows, {**model_meta, "source": source}))


def read_metadata(path: Path | RemotePath) -> dict[str, str] | None:
    """A finished output file's metadata, or None when it is missing or not a whole Parquet file."""
    try:
        if not path.exists():
            return None
        with open_binary(path) as handle:
            raw = pq.ParquetFile(handle).schema_arrow.metadata or {}
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError: a cut or foreign file
        log.warning("%s is not a complete output file (%s); scoring its shard again", path, exc)
        return None
    return {k.decode(): v.decode() for k, v in raw.items()}


def is_complete(path: Path | RemotePath, source: str, model_meta: Mapping[str, str]) -> bool:
    """True when ``path`` is a whole output of this shard by this model version (``--resume`` keeps it)."""
    found = read_metadata(path)
    if found is None:
        return False
    wanted = {key: model_meta[key] for key in RUN_KEYS} | {"source": source}
    stale = {key: found.get(key) for key in wanted if found.get(key) != wanted[key]}
    if stale:
        log.info("%s was made with %s; scoring its shard again", path, stale)
    return not stale


def read_counts(path: Path | RemotePath) -> tuple[int, int, int]:
    """(frames, edge cases, errors) of a finished output file, for a resumed run's summary."""
    with open_binary(path) as handle:
        table = pq.read_table(handle, columns=["is_edge_case", "error"])
    flags = table.column("is_edge_case").to_pylist()
    errors = table.num_rows - table.column("error").null_count
    return table.num_rows, sum(1 for flag in flags if flag), errors


def write_summary(out_dir: Path | RemotePath, summary: Mapping[str, Any]) -> None:
    write_atomic(out_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())


def failures_of(shards: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for shard in shards if shard["status"] == "failed")
