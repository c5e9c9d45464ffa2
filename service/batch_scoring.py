"""Batch scoring of data sets without a server: shards in, one scored Parquet file per shard out.

The same pieces as the HTTP path, minus HTTP: ``contract.shards`` lists and reads the shards
(folders, tar, Parquet; local paths or fsspec URLs), ``service.batch_pipeline`` reads and decodes
ahead (``decode_resized`` at the manifest's H x W by its resize rule, the service's decode) in a
pool while this module runs the one onnxruntime session on whole batches, p-values come from the
manifest's calibration scores, and a frame is an edge case by ``contract.manifest.is_edge_case``.
``service.batch_output`` writes each shard's file atomically and ``_summary.json`` at the end.

Order of a shard's writes, so that a kill at any point is harmless: its flags first (idempotent: each
carries the key ``batch_flag_key`` makes from model, version, shard and frame key, which the store
keeps once), then its output file (atomic rename). A rerun with ``resume``
keeps every shard whose file is whole and made by this model version, redoes the rest, and
offers the same flags again, which the store ignores. A shard whose file cannot be read to the
end (truncated tar, unreadable Parquet) gets no output file and is listed as failed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from contract.frames import probe_frame
from contract.readers import Record
from contract.shards import Shard
from contract.storage import RemotePath, make_dirs
from service.batch_output import (
    ShardRows,
    is_complete,
    model_metadata,
    read_counts,
    shard_path,
    write_shard,
    write_summary,
)
from service.batch_pipeline import StageTimes, decoded_batches, make_pool
from service.batch_summary import BatchOptions, RunSummary, ShardResult
from service.flag_store import FlagStore, NewFlag
from service.registry import LoadedModel

log = logging.getLogger(__name__)

_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def score_images(model: LoadedModel, images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float64]:
    """Score decoded model inputs in one session.run (empty in, empty out)."""
    if not images:
        return np.zeros(0, dtype=np.float64)
    return np.asarray(model.score(np.stack(images))["score"], dtype=np.float64)


def rows_of_batch(
    model: LoadedModel,
    records: Sequence[Record],
    images: Sequence[npt.NDArray[np.uint8] | None],
    errors: Sequence[str | None],
) -> ShardRows:
    """One batch's rows in record order: scores for decoded frames, the reason for the others."""
    ok = [i for i, image in enumerate(images) if image is not None]
    scores = score_images(model, [images[i] for i in ok])  # type: ignore[misc]
    p_values, flags = model.manifest.verdicts(scores)
    rows = ShardRows.empty()
    position = {i: j for j, i in enumerate(ok)}
    for i, record in enumerate(records):
        rows.key.append(record.key)
        rows.source.append(record.source)
        j = position.get(i)
        if j is None:
            rows.score.append(None)
            rows.p_value.append(None)
            rows.is_edge_case.append(None)
            rows.error.append(record.error or errors[i] or "not decoded")
        else:
            rows.score.append(float(scores[j]))
            rows.p_value.append(float(p_values[j]))
            rows.is_edge_case.append(bool(flags[j]))
            rows.error.append(None)
    return rows


def flags_of(model: LoadedModel, records: Sequence[Record], rows: ShardRows) -> list[NewFlag]:
    """The edge cases among a batch's rows as flags: the frame's bytes as stored, its metadata."""
    flags = []
    for record, score, p_value, flag in zip(
        records, rows.score, rows.p_value, rows.is_edge_case, strict=True
    ):
        if not flag or record.data is None or score is None or p_value is None:
            continue
        ext = _EXTENSIONS.get(probe_frame(record.data).format, "png")
        meta = {"source": record.source, "via": "edgecase score", **json_safe(record.meta)}
        flags.append(NewFlag(record.data, model.name, model.version, score, p_value, record.key, meta, ext))
    return flags


@dataclass
class OpenShard:
    """A shard being scored: rows and flags so far, or the error that ended it."""

    rows: ShardRows = field(default_factory=ShardRows.empty)
    flags: list[NewFlag] = field(default_factory=list)
    failure: str | None = None


def score_shards(
    model: LoadedModel,
    shards: Sequence[Shard],
    out_dir: Path | RemotePath,
    *,
    options: BatchOptions | None = None,
    store: FlagStore | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> RunSummary:
    """Score ``shards`` into ``out_dir`` (a ``Path`` or ``RemotePath``) with the local engine."""
    options = options or BatchOptions()
    options.check()
    meta = model_metadata(model)
    summary = RunSummary(meta, "local", options.max_frame_errors)
    started, cpu_started = time.perf_counter(), time.process_time()
    make_dirs(out_dir)
    todo = shards_to_score(shards, out_dir, meta, options.resume, summary)
    times = StageTimes()
    results: dict[str, ShardResult] = {}
    with make_pool(options.pool, options.workers) as pool:
        open_shards: dict[str, OpenShard] = {}
        for item in decoded_batches(
            todo, size=model.input_size, rule=model.resize_rule, batch_size=options.batch_size, pool=pool,
            depth=2 * options.workers + 2, times=times,
        ):  # fmt: skip
            state = open_shards.setdefault(item.shard.name, OpenShard())
            if item.records is None:  # the shard is read: flags, then its file
                t0 = time.perf_counter()
                results[item.shard.name] = finish_shard(
                    model, item.shard, state, out_dir, meta, store, summary
                )
                times.add("write", time.perf_counter() - t0)
                del open_shards[item.shard.name]
                continue
            assert item.decoded is not None
            records = [r for r in item.records if not r.whole_source]
            if len(records) < len(item.records):
                state.failure = next(r.error for r in item.records if r.whole_source) or "unreadable"
            t0 = time.perf_counter()
            rows = rows_of_batch(model, records, item.decoded.images[: len(records)], item.decoded.errors)
            times.add("score", time.perf_counter() - t0)
            state.rows.extend(rows)
            if store is not None:
                state.flags.extend(flags_of(model, records, rows))
            if on_progress is not None:
                on_progress(len(item.records))
    summary.shards = [results.get(s.name) or skipped_shard(summary, s) for s in shards]
    summary.seconds = time.perf_counter() - started
    summary.cpu_seconds = time.process_time() - cpu_started
    summary.stage_seconds = dict(times.seconds)
    write_summary(out_dir, summary.as_dict())
    return summary


def shards_to_score(
    shards: Sequence[Shard],
    out_dir: Path | RemotePath,
    meta: Mapping[str, str],
    resume: bool,
    summary: RunSummary,
) -> list[Shard]:
    """The shards still to score; with ``resume``, finished ones are counted from their files."""
    if not resume:
        return list(shards)
    todo = []
    for shard in shards:
        path = shard_path(out_dir, shard.name)
        if is_complete(path, shard.source, meta):
            frames, edge_cases, errors = read_counts(path)
            summary.shards.append(
                ShardResult(shard.name, shard.source, frames, edge_cases, errors, "skipped")
            )
        else:
            todo.append(shard)
    return todo


def skipped_shard(summary: RunSummary, shard: Shard) -> ShardResult:
    """The summary line ``shards_to_score`` made for a shard it found finished."""
    return next(s for s in summary.shards if s.shard == shard.name)


def finish_shard(
    model: LoadedModel,
    shard: Shard,
    state: OpenShard,
    out_dir: Path | RemotePath,
    meta: Mapping[str, str],
    store: FlagStore | None,
    summary: RunSummary,
) -> ShardResult:
    """A shard is read: its failures into the summary, then its flags, then its file (module docstring)."""
    rows = state.rows
    result = ShardResult(shard.name, shard.source, len(rows), rows.edge_cases, rows.errors)
    for key, source, error in zip(rows.key, rows.source, rows.error, strict=True):
        if error is not None:
            summary.failures.append({"source": source, "key": key, "error": error})
    if state.failure is not None:
        # Not written: --resume tries it again. Its frames so far are not counted, nor flagged.
        result.status = "failed"
        summary.failures.append({"source": shard.source, "key": "", "error": state.failure})
        log.error("shard %s failed: %s", shard.source, state.failure)
        return result
    if store is not None and state.flags:
        flags = [
            replace(flag, idempotency_key=batch_flag_key(model, shard.source, flag.key))
            for flag in state.flags
        ]
        before = store.count()
        store.add_many(flags)
        summary.stored += store.count() - before  # new flags: a rerun's are already there
    write_shard(out_dir, shard.name, shard.source, rows, meta)
    return result


def batch_flag_key(model: LoadedModel, source: str, key: str | None) -> str:
    """The idempotency key of a batch flag: one flag per model, version, source shard and frame key."""
    return json.dumps(["edgecase score", model.name, model.version, source, key])


def json_safe(meta: dict[str, Any]) -> dict[str, Any]:
    """Frame metadata that JSON can hold (tar/Parquet metadata is usually plain already)."""
    safe: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON has no NaN
        safe[key] = value if isinstance(value, str | int | float | bool) or value is None else str(value)
    return safe


def load_model(repo: str, name: str, version: int | None = None) -> LoadedModel:
    """Load ``name`` from a repository path or fsspec URL (``s3://bucket/models``).

    A remote repository's ``<name>/`` folder is copied to a temporary folder first and loaded from
    there by the usual registry (sha256 and signature checks included); onnxruntime holds the graph
    in memory, so the copy is removed at once.
    """
    import tempfile

    from contract.storage import as_location, copy_tree_to_local
    from service.registry import ModelLoadError, ModelRegistry

    location = as_location(repo)
    if not isinstance(location, RemotePath):
        return ModelRegistry(location).load(name, version)
    remote = location / name
    if not remote.is_dir():
        raise ModelLoadError(f"{remote}: no such model in the repository")
    with tempfile.TemporaryDirectory(prefix="edgecase-model-") as tmp:
        copy_tree_to_local(remote, Path(tmp) / name)
        return ModelRegistry(tmp).load(name, version)
