"""What one batch-scoring run is asked to do and what it did: its options, each shard's line and the
run's summary (``_summary.json`` and the command's exit status, as ``edgecase score --help`` states it).

Kept apart from the scoring loop (``service.batch_scoring``) and the Ray engine (``service.batch_ray``),
which both fill a ``RunSummary`` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contract.shards import DEFAULT_CHUNK_SIZE
from service.batch_pipeline import PoolKind


@dataclass
class BatchOptions:
    """How to run; the defaults are what ``edgecase score`` uses."""

    batch_size: int = 64
    workers: int = 2
    pool: PoolKind = "thread"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    resume: bool = False
    max_frame_errors: float = 0.001
    progress: bool = True

    def check(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk size must be >= 1, got {self.chunk_size}")
        if not 0.0 <= self.max_frame_errors <= 1.0:
            raise ValueError(f"max frame errors is a fraction in [0, 1], got {self.max_frame_errors}")


@dataclass
class ShardResult:
    """One shard's line in the summary; status is scored, skipped (resumed) or failed."""

    shard: str
    source: str
    frames: int = 0
    edge_cases: int = 0
    errors: int = 0
    status: str = "scored"

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "source": self.source,
            "frames": self.frames,
            "edge_cases": self.edge_cases,
            "errors": self.errors,
            "status": self.status,
        }


@dataclass
class RunSummary:
    """What one run did; ``as_dict`` is ``_summary.json``, ``exit_status`` the command's."""

    model_meta: dict[str, str]
    engine: str = "local"
    max_frame_errors: float = 0.001
    shards: list[ShardResult] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    stored: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time while scoring, all threads (not worker processes)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.shards if s.status != "failed")

    @property
    def edge_cases(self) -> int:
        return sum(s.edge_cases for s in self.shards if s.status != "failed")

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.shards if s.status != "failed")

    @property
    def failed_shards(self) -> int:
        return sum(1 for s in self.shards if s.status == "failed")

    @property
    def too_many_frame_errors(self) -> bool:
        return self.frames > 0 and self.errors / self.frames > self.max_frame_errors

    @property
    def exit_status(self) -> int:
        """0: all shards scored and frame errors within the limit; 1: otherwise (see --help)."""
        return 1 if self.failed_shards or self.too_many_frame_errors else 0

    def as_dict(self) -> dict[str, Any]:
        meta = self.model_meta
        scored = sum(s.frames for s in self.shards if s.status == "scored")
        return {
            "model": meta["model"],
            "version": int(meta["version"]),
            "head": meta["head"],
            "threshold": float(meta["threshold"]),
            "target_fpr": float(meta["target_fpr"]),
            "engine": self.engine,
            "frames": self.frames,
            "edge_cases": self.edge_cases,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "max_frame_errors": self.max_frame_errors,
            "exit_status": self.exit_status,
            "shards": [s.as_dict() for s in self.shards],
            "failures": self.failures,
            "stage_frames_per_s": {
                stage: round(scored / seconds, 1) if seconds > 0 else None
                for stage, seconds in self.stage_seconds.items()
            },
        }

    def text(self) -> str:
        skipped = sum(1 for s in self.shards if s.status == "skipped")
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        line = (
            f"scored {self.frames:,} frames in {len(self.shards):,} shard(s) with "
            f"{self.model_meta['model']}/{self.model_meta['version']} in {self.seconds:.1f} s "
            f"({rate:,.1f} frames/s): {self.edge_cases:,} edge cases, {self.errors:,} frame error(s)"
        )
        if skipped:
            line += f", {skipped:,} shard(s) already done (resumed)"
        if self.failed_shards:
            line += f", {self.failed_shards:,} shard(s) FAILED"
        if self.stored:
            line += f"; {self.stored:,} new flag(s) in the store"
        return line
