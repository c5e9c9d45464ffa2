"""Batch scoring of data sets without a server: frames from folders, tar shards or Parquet -> scores file.

The same pieces as the HTTP path, minus HTTP: ``contract.readers.iter_frames`` decodes (bad frames are
reported with their shard and key, then skipped), ``contract.frames.resize_frame`` applies the
manifest's resize rule, the registry's ``LoadedModel`` scores whole batches in one
``session.run``, p-values come from the manifest's calibration scores, and a frame is an edge case
when ``score > threshold`` (strictly, as calibrated in ``training/calibrate.py``). Optionally every
edge case also lands in a ``FlaggedStore`` for review, exactly as the service would keep it.

The output (CSV or Parquet, chosen by extension) is streamed to a temporary file beside the target
and renamed into place at the end, so a crashed run never leaves a half-written scores file.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from contract.frames import encode_png, resize_frame
from contract.readers import Frame, ReadReport, count_frames, iter_frames
from service.flagged import FlaggedStore, NewFlag
from service.registry import LoadedModel

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = ("key", "source", "score", "p_value", "is_edge_case")
OUTPUT_SUFFIXES: tuple[str, ...] = (".csv", ".parquet")


class _Rows(Protocol):
    def write(self, rows: dict[str, list[Any]]) -> None: ...

    def close(self) -> None: ...


class _CsvRows:
    """Rows appended to an open CSV file (floats with repr precision, so they round-trip)."""

    def __init__(self, path: Path) -> None:
        self._handle = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self._writer = csv.writer(self._handle, lineterminator="\n")
        self._writer.writerow(COLUMNS)

    def write(self, rows: dict[str, list[Any]]) -> None:
        for key, source, score, p_value, flag in zip(*(rows[c] for c in COLUMNS), strict=True):
            self._writer.writerow([key, source, repr(float(score)), repr(float(p_value)), str(bool(flag))])

    def close(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()


class _ParquetRows:
    """Rows appended to a Parquet file, one row group per batch of rows written."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        self._schema = pa.schema(
            [
                ("key", pa.string()),
                ("source", pa.string()),
                ("score", pa.float64()),
                ("p_value", pa.float64()),
                ("is_edge_case", pa.bool_()),
            ]
        )
        self._writer = pq.ParquetWriter(path, self._schema)

    def write(self, rows: dict[str, list[Any]]) -> None:
        self._writer.write_table(self._pa.table(rows, schema=self._schema))

    def close(self) -> None:
        self._writer.close()


def _open_rows(path: Path, fmt: str) -> _Rows:
    return _ParquetRows(path) if fmt == ".parquet" else _CsvRows(path)


@dataclass
class ScoreSummary:
    """What one batch-scoring run did; ``text()`` is the line the CLI prints."""

    out: Path
    model: str
    version: int
    frames: int = 0
    edge_cases: int = 0
    stored: int = 0
    failed: int = 0
    failed_sources: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        line = (
            f"scored {self.frames:,} frames with {self.model}/{self.version} in {self.seconds:.1f} s "
            f"({self.frames_per_s:,.1f} frames/s): {self.edge_cases:,} flagged as edge cases, "
            f"{self.failed:,} failed"
        )
        if self.failed_sources:
            line += f", {self.failed_sources:,} unreadable file(s)"
        if self.stored:
            line += f"; {self.stored:,} added to the flagged store"
        return line + f" -> {self.out}"


def check_output_path(out: Path) -> Path:
    """Refuse an output whose extension says neither CSV nor Parquet, before any work is done."""
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {out} must end in {' or '.join(OUTPUT_SUFFIXES)} (the format follows it)")
    return out


def _batches(frames: Iterator[Frame], batch_size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_batch(model: LoadedModel, images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float64]:
    """Resize frames by the manifest's rule, stack them NHWC and score them in one session.run."""
    height, width, _ = model.frame_shape
    if height != width:
        raise ValueError(
            f"{model.name}/{model.version}: the resize rule needs a square input, got {height}x{width}"
        )
    stacked = np.stack([resize_frame(image, height) for image in images])
    return np.asarray(model.score(stacked)["score"], dtype=np.float64)


def score_dataset(
    model: LoadedModel,
    sources: Path | str | Sequence[Path | str],
    out: Path | str,
    *,
    batch_size: int = 64,
    store: FlaggedStore | None = None,
    progress: bool = True,
) -> ScoreSummary:
    """Score every readable frame in ``sources`` and write one row per frame to ``out`` (CSV/Parquet).

    Edge cases (``score > threshold``) are added to ``store`` when one is given, as PNG of the frame
    as read (before resizing) with the frame key as client key and its source in the metadata.
    """
    from tqdm import tqdm

    out = check_output_path(Path(out))
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = ScoreSummary(out=out, model=model.name, version=model.version)
    report = ReadReport()
    started = time.perf_counter()
    total = count_frames(sources) if progress else None
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    rows = _open_rows(tmp, out.suffix.lower())
    try:
        with tqdm(
            total=total, unit="frame", desc=f"score {model.name}/{model.version}", disable=not progress
        ) as bar:
            # Frames are read at full size and resized here, so flagged frames are kept as they were.
            for batch in _batches(iter_frames(sources, report=report), batch_size):
                scores = score_batch(model, [frame.image for frame in batch])
                p_values, flags = model.manifest.verdicts(scores)
                rows.write(
                    {
                        "key": [frame.key for frame in batch],
                        "source": [frame.source for frame in batch],
                        "score": scores.tolist(),
                        "p_value": p_values.tolist(),
                        "is_edge_case": flags.tolist(),
                    }
                )
                summary.frames += len(batch)
                summary.edge_cases += int(flags.sum())
                if store is not None and flags.any():
                    summary.stored += len(_store_flags(store, model, batch, scores, p_values, flags))
                bar.update(summary.frames + report.failed - bar.n)  # skipped frames count as done
                bar.set_postfix(flagged=summary.edge_cases, failed=report.failed)
        rows.close()
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(Exception):
            rows.close()
        tmp.unlink(missing_ok=True)
        raise
    summary.seconds = time.perf_counter() - started
    summary.failed, summary.failed_sources, summary.errors = (
        report.failed,
        report.failed_sources,
        report.errors,
    )
    return summary


def _store_flags(
    store: FlaggedStore,
    model: LoadedModel,
    batch: Sequence[Frame],
    scores: npt.NDArray[np.float64],
    p_values: npt.NDArray[np.float64],
    flags: npt.NDArray[np.bool_],
) -> list[int]:
    """Keep a batch's edge cases in the flagged store (one commit for the batch)."""
    new = [
        NewFlag(
            image=encode_png(frame.image),
            model=model.name,
            version=model.version,
            score=float(scores[i]),
            p_value=float(p_values[i]),
            key=frame.key,
            metadata={"source": frame.source, "via": "edgecase score", **_json_safe(frame.meta)},
        )
        for i, frame in enumerate(batch)
        if flags[i]
    ]
    return [record.id for record in store.add_many(new)]


def _json_safe(meta: dict[str, Any]) -> dict[str, Any]:
    """Frame metadata that JSON can hold (tar/Parquet metadata is usually plain already)."""
    safe: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not np.isfinite(value):
            value = None  # JSON has no NaN
        safe[key] = value if isinstance(value, str | int | float | bool) or value is None else str(value)
    return safe
