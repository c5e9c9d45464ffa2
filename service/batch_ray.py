"""The Ray Data engine of ``edgecase score --engine ray``: the same scoring, spread over a cluster.

The dataset is the list of shards; a task per shard reads its records (``flat_map`` over
``contract.shards.shard_records``, so every worker reads paths or fsspec URLs the same way), a
decode step (``batch_pipeline.decode_batch``: ``decode_resized``, the service's decode) makes model
inputs, and ``map_batches`` with an actor class that holds one onnxruntime session scores them
through ``batch_scoring.rows_of_batch``, the local engine's function. Actors ask for a GPU each
(``num_gpus=1``) when the cluster has GPUs and a CPU otherwise; ``concurrency`` sets how many. Ray
fuses decoding into CPU actors (same resources); next to GPU actors it stays in CPU tasks.

The driver receives only the score rows (about 100 bytes a frame; frame bytes only for edge cases)
in reading order (``preserve_order``) and finishes each shard exactly as the local engine does:
flags once, then ``batch_output.write_shard``. So both engines write byte-identical files.
Workers load the model themselves from ``--repo``, which must be reachable from every node (an
object-store URL, or a path on a shared filesystem).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from contract.frames import FrameSize
from contract.readers import Record
from contract.shards import Shard, shard_records
from contract.storage import RemotePath, make_dirs
from service.batch_output import SCHEMA, ShardRows, model_metadata, write_summary
from service.batch_pipeline import decode_batch
from service.batch_scoring import (
    OpenShard,
    finish_shard,
    flags_of,
    json_safe,
    load_model,
    rows_of_batch,
    shards_to_score,
    skipped_shard,
)
from service.batch_summary import BatchOptions, RunSummary, ShardResult
from service.flag_store import FlagStore
from service.registry import LoadedModel

_SCORED = pa.schema(
    [
        ("shard", pa.int64()),
        *SCHEMA,  # the output file's columns, then what the driver needs to finish a shard
        ("whole", pa.bool_()),
        ("data", pa.binary()),  # edge cases only: the frame as stored, for the flagged store
        ("meta", pa.string()),
    ]
)


def _read_shard(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """All records of one shard (a Ray task), file-level errors included."""
    shard = Shard(row["name"], row["kind"], row["source"], tuple(json.loads(row["images"])))
    for record in shard_records(shard):
        yield {
            "shard": row["index"],
            "key": record.key,
            "source": record.source,
            "data": record.data,
            "error": record.error,
            "whole": record.whole_source,
            "meta": json.dumps(json_safe(record.meta), sort_keys=True),
        }


def _decode(batch: dict[str, npt.NDArray[Any]], size: FrameSize, rule: str) -> dict[str, npt.NDArray[Any]]:
    """Decode a batch in a CPU task; failed frames get zeros and their reason in ``decode_error``."""
    pairs = zip(batch["data"], batch["error"], strict=True)
    datas = [data if isinstance(data, bytes) and _text(error) is None else None for data, error in pairs]
    decoded = decode_batch(datas, size, rule=rule)
    images = np.zeros((len(datas), size.height, size.width, 3), dtype=np.uint8)
    for i, image in enumerate(decoded.images):
        if image is not None:
            images[i] = image
    batch["image"] = images
    batch["decoded"] = np.array([image is not None for image in decoded.images], dtype=bool)
    batch["decode_error"] = np.array(decoded.errors, dtype=object)
    return batch


def _text(value: Any) -> str | None:
    """A string column's value; Ray's numpy batches turn an all-null column into NaNs."""
    return value if isinstance(value, str) else None


class _Scorer:
    """A Ray actor holding one onnxruntime session; scores decoded batches into score rows."""

    def __init__(self, repo: str, name: str, version: int) -> None:
        self.model = load_model(repo, name, version)

    def __call__(self, batch: dict[str, npt.NDArray[Any]]) -> pa.Table:
        n = len(batch["key"])
        records = [
            Record(
                str(batch["key"][i]),
                batch["data"][i] if isinstance(batch["data"][i], bytes) else None,
                json.loads(str(batch["meta"][i])),
                str(batch["source"][i]),
                _text(batch["error"][i]),
                bool(batch["whole"][i]),
            )
            for i in range(n)
        ]
        usable = [i for i, record in enumerate(records) if not record.whole_source]
        images = [batch["image"][i] if batch["decoded"][i] else None for i in usable]
        errors = [_text(batch["decode_error"][i]) for i in usable]
        kept = [records[i] for i in usable]
        rows = rows_of_batch(self.model, kept, images, errors)
        out: dict[str, list[Any]] = {name: [] for name in _SCORED.names}
        j = 0
        for i, record in enumerate(records):
            out["shard"].append(int(batch["shard"][i]))
            out["key"].append(record.key)
            out["source"].append(record.source)
            out["whole"].append(record.whole_source)
            out["meta"].append(batch["meta"][i])
            if record.whole_source:
                for name in ("score", "p_value", "is_edge_case", "data"):
                    out[name].append(None)
                out["error"].append(record.error)
                continue
            out["score"].append(rows.score[j])
            out["p_value"].append(rows.p_value[j])
            out["is_edge_case"].append(rows.is_edge_case[j])
            out["error"].append(rows.error[j])
            out["data"].append(record.data if rows.is_edge_case[j] else None)
            j += 1
        return pa.table(out, schema=_SCORED)


def score_shards_ray(
    repo: str,
    model: LoadedModel,
    shards: Sequence[Shard],
    out_dir: Path | RemotePath,
    *,
    options: BatchOptions | None = None,
    store: FlagStore | None = None,
    address: str | None = None,
    concurrency: int = 1,
) -> RunSummary:
    """Score ``shards`` on a Ray cluster (``address``; a local one when None and none is running).

    ``model`` is the driver's copy (for the output metadata and the flags); workers load the same
    name and version from ``repo``.
    """
    import ray
    import ray.data

    options = options or BatchOptions()
    options.check()
    meta = model_metadata(model)
    summary = RunSummary(meta, "ray", options.max_frame_errors)
    started, cpu_started = time.perf_counter(), time.process_time()
    make_dirs(out_dir)
    todo = shards_to_score(shards, out_dir, meta, options.resume, summary)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows arrive shard by shard, in reading order
    context.enable_progress_bars = options.progress
    gpus = ray.cluster_resources().get("GPU", 0) > 0  # type: ignore[no-untyped-call]
    items = [
        {"index": i, "name": s.name, "kind": s.kind, "source": s.source, "images": json.dumps(s.images)}
        for i, s in enumerate(todo)
    ]
    results: dict[str, ShardResult] = {}
    seconds = {"ray": 0.0, "write": 0.0}
    if items:
        dataset = (
            ray.data.from_items(items)
            .flat_map(_read_shard)
            .map_batches(
                partial(_decode, size=model.input_size, rule=model.resize_rule),
                batch_size=options.batch_size,
                batch_format="numpy",
            )
            .map_batches(
                _Scorer,
                fn_constructor_kwargs={"repo": repo, "name": model.name, "version": model.version},
                batch_size=options.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=concurrency),
                num_gpus=1 if gpus else 0,
            )
        )
        state: tuple[int, OpenShard] | None = None
        done = -1

        def finish(index: int, shard_state: OpenShard) -> None:
            t0 = time.perf_counter()
            shard = todo[index]
            results[shard.name] = finish_shard(model, shard, shard_state, out_dir, meta, store, summary)
            seconds["write"] += time.perf_counter() - t0

        t_ray = time.perf_counter()
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            assert isinstance(batch, pa.Table)
            for row in batch.to_pylist():
                index = int(row["shard"])
                if state is None or state[0] != index:
                    if state is not None:
                        finish(*state)
                        done = state[0]
                    for empty in range(done + 1, index):  # shards with no records at all
                        finish(empty, OpenShard())
                    state = (index, OpenShard())
                _add_row(model, state[1], row, store is not None)
        if state is not None:
            finish(*state)
            done = state[0]
        for empty in range(done + 1, len(todo)):
            finish(empty, OpenShard())
        seconds["ray"] = time.perf_counter() - t_ray - seconds["write"]
    summary.shards = [results.get(s.name) or skipped_shard(summary, s) for s in shards]
    summary.seconds = time.perf_counter() - started
    summary.cpu_seconds = time.process_time() - cpu_started  # the driver's only
    summary.stage_seconds = seconds
    write_summary(out_dir, summary.as_dict())
    return summary


def _add_row(model: LoadedModel, state: OpenShard, row: dict[str, Any], keep_flags: bool) -> None:
    """Append one score row to its shard (the local engine's ``OpenShard``), and its flag if it is one."""
    if row["whole"]:
        state.failure = row["error"] or "unreadable"
        return
    one = ShardRows([row["key"]], [row["source"]], [row["score"]], [row["p_value"]], [row["is_edge_case"]],
                    [row["error"]])  # fmt: skip
    state.rows.extend(one)
    if keep_flags and row["is_edge_case"] and row["data"] is not None:
        record = Record(row["key"], row["data"], json.loads(row["meta"]), row["source"])
        state.flags.extend(flags_of(model, [record], one))
