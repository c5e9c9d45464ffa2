"""`edgecase report`: what a batch-scoring run found, as Markdown + PNG beside a machine-readable JSON.

Reads a per-shard output folder of `edgecase score` (``OUT_DIR/<shard>.parquet`` with the model, version,
threshold and target FPR in each file's key-value metadata, and ``OUT_DIR/_summary.json``), finds the
model version that made it in the repository (checking the graph's sha256), and compares the batch's
scores with that version's calibration scores (``manifest.calibration.scores``): histograms and CDFs, PSI
and the KS statistic (``service/drift.py``), the edge-case rate of every shard against the target FPR,
and the top-k frames by score, read back from their shards with ``contract.readers``.

Files in REPORT_DIR (default ``OUT_DIR/report``): ``report.md``, ``report.json`` (every number in it),
``scores.png``, ``psi.png``, ``shards.png``, ``top_frames.png`` (drawn by ``service/report_figures.py``,
laid out by ``service/report_markdown.py``). No onnxruntime, no torch: only the Parquet files, the
manifest and the shards are read. matplotlib is needed for the figures.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from contract.frames import RESIZE_RULE, FrameSize
from contract.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, ManifestError, load_manifest
from contract.readers import ReadReport, iter_frames
from service import drift, report_figures, report_markdown

SUMMARY_FILE = "_summary.json"
REPORT_DIR = "report"
META_KEYS = ("model", "version", "head", "threshold", "target_fpr", "model_sha256", "edgecase_version")
COLUMNS = ("key", "source", "score", "p_value", "is_edge_case", "error")
TILE_PX = 128
"""The longer side of a top frame's tile; the other follows the model input's aspect."""
SQUARE_TILE = FrameSize(TILE_PX, TILE_PX)


class ReportError(ValueError):
    """The run folder, the repository or the arguments cannot make a report; the message says why."""


@dataclass(frozen=True)
class RunMeta:
    """What made the scores, from the Parquet metadata (the same in every shard file of one run)."""

    model: str
    version: int
    head: str
    threshold: float
    target_fpr: float
    model_sha256: str | None
    edgecase_version: str | None


@dataclass
class ShardStats:
    name: str
    source: str
    frames: int
    scored: int
    errors: int
    edge_cases: int
    rate: float | None
    tail_p: float | None

    @property
    def alert(self) -> bool:
        return self.tail_p is not None and self.tail_p < drift.SHARD_ALERT_P


@dataclass
class ScoredRun:
    """Every row of a run (numpy columns), its metadata, per-shard numbers and the summary if present."""

    out_dir: Path
    meta: RunMeta
    keys: list[str]
    sources: list[str]
    scores: npt.NDArray[np.float64]  # NaN where the frame did not score
    p_values: npt.NDArray[np.float64]
    shards: list[ShardStats] = field(default_factory=list)
    summary: dict[str, Any] | None = None


@dataclass(frozen=True)
class TopFrame:
    rank: int
    key: str
    source: str
    score: float
    p_value: float


def _meta_of(path: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k.decode() in META_KEYS}


def _run_meta(files: Sequence[Path]) -> RunMeta:
    found = {path: _meta_of(path) for path in files}
    missing = [
        p.name for p, m in found.items() if not {"model", "version", "threshold", "target_fpr"} <= set(m)
    ]
    if missing:
        raise ReportError(
            f"{', '.join(missing[:5])}: no model/version/threshold/target_fpr in the Parquet metadata "
            "(not written by `edgecase score --out OUT_DIR`?)"
        )
    made_by = {(m["model"], m["version"]) for m in found.values()}
    if len(made_by) > 1:
        which = ", ".join(sorted(f"{name}/{version}" for name, version in made_by))
        raise ReportError(
            f"the shards were scored by different model versions ({which}): rerun with --resume"
        )
    m = next(iter(found.values()))
    try:
        return RunMeta(
            model=m["model"],
            version=int(m["version"]),
            head=m.get("head", "?"),
            threshold=float(m["threshold"]),
            target_fpr=float(m["target_fpr"]),
            model_sha256=m.get("model_sha256"),
            edgecase_version=m.get("edgecase_version"),
        )
    except ValueError as exc:
        raise ReportError(f"unreadable Parquet metadata in {files[0]}: {exc}") from exc


def load_run(out_dir: Path) -> ScoredRun:
    """Read every ``OUT_DIR/*.parquet`` (hidden and ``_`` files skipped) and ``_summary.json``."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ReportError(f"{out_dir}: not a folder (give the --out folder of `edgecase score`)")
    files = sorted(p for p in out_dir.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise ReportError(f"{out_dir}: no <shard>.parquet score files")
    meta = _run_meta(files)
    run = ScoredRun(out_dir, meta, [], [], np.empty(0), np.empty(0))
    scores, p_values = [], []
    for path in files:
        try:
            table = pq.read_table(path, columns=list(COLUMNS))
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError; a missing column too
            raise ReportError(f"{path}: cannot read the score columns {', '.join(COLUMNS)}: {exc}") from exc
        score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN
        flags = table.column("is_edge_case").fill_null(False).to_numpy(zero_copy_only=False)
        sources = table.column("source").to_pylist()
        run.keys += table.column("key").to_pylist()
        run.sources += sources
        scores.append(score)
        p_values.append(table.column("p_value").to_numpy(zero_copy_only=False).astype(np.float64))
        scored = int(np.sum(~np.isnan(score)))
        edge = int(np.sum(flags))
        run.shards.append(
            ShardStats(
                name=path.stem,
                source=sources[0] if sources else "",
                frames=table.num_rows,
                scored=scored,
                errors=table.num_rows - scored,
                edge_cases=edge,
                rate=edge / scored if scored else None,
                tail_p=drift.binomial_tail(edge, scored, meta.target_fpr) if scored else None,
            )
        )
    run.scores, run.p_values = np.concatenate(scores), np.concatenate(p_values)
    summary_path = out_dir / SUMMARY_FILE
    if summary_path.is_file():
        try:
            run.summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReportError(f"{summary_path}: not readable JSON: {exc}") from exc
    return run


def find_manifest(repo: Path, meta: RunMeta) -> Manifest:
    """The manifest of the version that made the scores; refuses one whose graph is not that graph."""
    path = Path(repo) / meta.model / str(meta.version) / MANIFEST_FILE
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        raise ReportError(
            f"model {meta.model}/{meta.version} that made these scores is not usable in {repo} ({exc}); "
            "pass --repo"
        ) from exc
    published = manifest.files[MODEL_FILE].sha256
    if meta.model_sha256 and meta.model_sha256 != published:
        raise ReportError(
            f"{path.parent}: its {MODEL_FILE} (sha256 {published[:12]}...) is not the graph that made these "
            f"scores (sha256 {meta.model_sha256[:12]}...): another repository with the same name/version?"
        )
    return manifest


def top_frames(run: ScoredRun, k: int) -> list[TopFrame]:
    """The k highest-scoring frames (ties broken by key, so the choice is reproducible)."""
    scored = np.flatnonzero(~np.isnan(run.scores))
    if 0 < k < scored.size:  # only frames scoring at least the k-th highest can be in the top k
        kth = np.partition(run.scores[scored], scored.size - k)[scored.size - k]
        scored = scored[run.scores[scored] >= kth]
    keys = np.asarray([run.keys[i] for i in scored], dtype=object)
    order = scored[np.lexsort((keys, -run.scores[scored]))][:k]
    return [
        TopFrame(rank + 1, run.keys[i], run.sources[i], float(run.scores[i]), float(run.p_values[i]))
        for rank, i in enumerate(order)
    ]


def resolve_source(source: str, data: Sequence[Path]) -> Path | None:
    """Where a source is now: the recorded path if it still exists, else the same file name in --data.

    Among several same-named files under a --data folder, the one sharing the longest path tail with
    the recorded source wins (``a/train-00000.tar`` vs ``b/train-00000.tar``).
    """
    recorded = Path(source)
    if "://" not in source and recorded.exists():
        return recorded
    name = recorded.name
    for root in data:
        if root.is_file() and root.name == name:
            return root
        if root.is_dir():
            candidates = sorted(root.rglob(name))
            if candidates:
                return max(candidates, key=lambda p: _common_tail(p.parts, recorded.parts))
    return None


def _common_tail(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def tile_size(model_input: FrameSize) -> FrameSize:
    """A tile of the model input's aspect with its longer side TILE_PX (256x144 -> 128x72)."""
    long_side = max(model_input.height, model_input.width)
    scale = TILE_PX / long_side
    return FrameSize(max(1, round(model_input.height * scale)), max(1, round(model_input.width * scale)))


def read_back(
    frames: Sequence[TopFrame],
    data: Sequence[Path],
    *,
    size: FrameSize = SQUARE_TILE,
    rule: str = RESIZE_RULE,
) -> list[npt.NDArray[np.uint8] | str]:
    """Each frame decoded from its shard and resized by ``rule`` to ``size`` (the model's rule, at
    ``tile_size`` of its input: what the model saw, smaller), or why it could not be."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for top in frames:
        wanted[top.source].add(top.key)
    found: dict[tuple[str, str], npt.NDArray[np.uint8] | str] = {}
    for source, keys in wanted.items():
        path = resolve_source(source, data)
        if path is None:
            for key in keys:
                found[(source, key)] = f"not found: {Path(source).name} (pass --data)"
            continue
        report = ReadReport()
        single = path.is_file() and path.suffix.lower() not in (".tar", ".parquet")  # one loose image
        try:
            for read in iter_frames(path, size=size, rule=rule, report=report, keys=None if single else keys):
                found[(source, next(iter(keys)) if single else read.key)] = read.image
        except (OSError, ValueError) as exc:
            report.add_source_error(str(path), str(exc))
        for _, key, reason in report.errors:  # a loose image's reader key is its stem: use ours
            for ours in keys if single else [key]:
                found.setdefault((source, ours), f"unreadable: {reason}")
        for key in keys:
            found.setdefault(
                (source, key), f"not in {path.name}" + (f": {report.errors[0][2]}" if report.errors else "")
            )
    return [found[(f.source, f.key)] for f in frames]


@dataclass
class Report:
    """What ``write_report`` wrote, and the headline numbers (all also in report.json)."""

    markdown: Path
    figures: dict[str, Path]
    numbers: dict[str, Any]


def write_report(
    out_dir: Path,
    *,
    repo: Path,
    data: Sequence[Path] = (),
    top_k: int = 16,
    report_dir: Path | None = None,
) -> Report:
    """Make the report of one `edgecase score` output folder; see the module docstring for the files."""
    if top_k < 0:
        raise ReportError(f"--top-k must be >= 0, got {top_k}")
    report_figures.require_matplotlib()
    run = load_run(out_dir)
    manifest = find_manifest(repo, run.meta)
    meta = run.meta
    scores = run.scores[~np.isnan(run.scores)]
    if scores.size == 0:
        raise ReportError(f"{out_dir}: no frame scored (every row has an error): nothing to compare")
    calibration = np.asarray(manifest.calibration.scores, dtype=np.float64)
    bins = drift.psi_bins(calibration, scores)
    psi = drift.psi(bins)
    ks, ks_at = drift.ks_statistic(calibration, scores)
    ks_p = drift.ks_p_value(ks, manifest.calibration.n, int(scores.size))
    out = Path(report_dir) if report_dir is not None else Path(out_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "scores": report_figures.plot_scores(
            calibration,
            scores,
            threshold=meta.threshold,
            ks=ks,
            ks_at=ks_at,
            units=manifest.model.units,
            path=out / "scores.png",
        ),  # fmt: skip
        "psi": report_figures.plot_psi(bins, psi, drift.psi_verdict(psi), out / "psi.png"),
        "shards": report_figures.plot_shard_rates(
            [s.name for s in run.shards],
            [s.rate or 0.0 for s in run.shards],
            [s.alert for s in run.shards],
            target_fpr=meta.target_fpr,
            path=out / "shards.png",
        ),  # fmt: skip
    }
    top = top_frames(run, top_k)
    tile = tile_size(manifest.input.size)
    if top:
        captions = [f"#{t.rank} {t.score:.4g}\np={t.p_value:.2g}\n{_short(t.key)}" for t in top]
        figures["top_frames"] = report_figures.plot_frame_grid(
            read_back(top, data, size=tile, rule=manifest.input.resize_rule), captions, out / "top_frames.png"
        )
    edge_cases = sum(s.edge_cases for s in run.shards)
    numbers: dict[str, Any] = {
        "run": asdict(meta) | {"out_dir": str(out_dir)},
        "frames": len(run.keys),
        "scored": int(scores.size),
        "errors": len(run.keys) - int(scores.size),
        "edge_cases": edge_cases,
        "edge_case_rate": edge_cases / scores.size,
        "calibration_n": manifest.calibration.n,
        "calibration_stored": len(manifest.calibration.scores),
        "psi": psi,
        "psi_verdict": drift.psi_verdict(psi),
        "psi_bins": [asdict(b) | {"term": b.term} for b in bins],
        "ks": ks,
        "ks_at": ks_at,
        "ks_p_value": ks_p,
        "shards": [asdict(s) | {"alert": s.alert} for s in run.shards],
        "top_frames": [asdict(t) for t in top],
    }
    markdown = out / "report.md"
    text = report_markdown.render(run, manifest, numbers, figures, out, tile=tile, summary_file=SUMMARY_FILE)
    _atomic_write(markdown, text)
    _atomic_write(out / "report.json", json.dumps(numbers, indent=2, default=_json_default) + "\n")
    return Report(markdown=markdown, figures=figures, numbers=numbers)


def _short(key: str, width: int = 26) -> str:
    return key if len(key) <= width else "..." + key[-(width - 3) :]


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {value!r}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
