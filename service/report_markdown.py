"""The text of `edgecase report`: report.md from the numbers `service/batch_report.py` computed.

Every number here is also in report.json; this module only lays them out (GitHub-flavoured Markdown,
figures linked relative to the report so the folder can move) and states the method.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contract.frames import FrameSize
from contract.manifest import Manifest, quantiles_of
from service import drift

if TYPE_CHECKING:
    from service.batch_report import ScoredRun

MAX_SHARD_ROWS = 50
MAX_FAILURES_SHOWN = 20


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _cell(value: object) -> str:
    """Table-safe text: a '|' or a newline would break the Markdown row."""
    return str(value).replace("|", "/").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render(
    run: ScoredRun,
    manifest: Manifest,
    n: dict[str, Any],
    figures: dict[str, Path],
    out: Path,
    *,
    tile: FrameSize,
    summary_file: str,
) -> str:
    """report.md for one run: headline, scores vs calibration, drift and its method, shards, top frames."""
    meta = run.meta
    rel = {name: os.path.relpath(path, out) for name, path in figures.items()}
    quantiles = manifest.calibration.quantiles
    # The manifest's own quantile rule, so the two columns are computed alike.
    batch_quantiles = quantiles_of(run.scores[~np.isnan(run.scores)], tuple(float(q) for q in quantiles))
    lines = [
        f"# Batch scoring report: `{run.out_dir}`",
        "",
        f"Model **{meta.model}/{meta.version}** (head `{meta.head}`, score in {manifest.model.units}), "
        f"threshold {meta.threshold:.6g} for a target false-positive rate of {meta.target_fpr:g}"
        + (
            f", graph sha256 `{meta.model_sha256[:16]}...` (matches the repository)"
            if meta.model_sha256
            else ""
        )
        + (f"; scored with edgecase {meta.edgecase_version}" if meta.edgecase_version else "")
        + ".",
        "",
        _table(
            ["frames", "scored", "errors", "edge cases", "edge-case rate", "target FPR", "shards"],
            [
                [
                    f"{n['frames']:,}",
                    f"{n['scored']:,}",
                    f"{n['errors']:,}",
                    f"{n['edge_cases']:,}",
                    f"{n['edge_case_rate']:.4%}",
                    f"{meta.target_fpr:.4%}",
                    f"{len(run.shards):,}",
                ]
            ],
        ),  # fmt: skip
        "",
        "## Scores against the calibration normals",
        "",
        f"![score histogram and CDFs]({rel['scores']})",
        "",
        f"The calibration scores are the {n['calibration_stored']:,} stored in the manifest "
        f"(of n = {n['calibration_n']:,} held-out normal frames"
        + (", all of them" if manifest.calibration.exact else ", evenly spaced order statistics")
        + "). The threshold is their (1 - target FPR) quantile, so on data like the calibration normals "
        "about a target-FPR share of frames is flagged.",
        "",
        _table(
            ["quantile", "calibration", "this batch"],
            [[q, _fmt(v), _fmt(batch_quantiles.get(q))] for q, v in quantiles.items()],
        ),
        "",
        "## Drift of the score distribution",
        "",
        f"- **PSI = {n['psi']:.4f}** ({n['psi_verdict']}; < 0.1 stable, 0.1-0.25 moderate, > 0.25 large)",
        f"- **KS statistic D = {n['ks']:.4f}** (largest CDF gap, at score {n['ks_at']:.4g}; "
        f"asymptotic p-value {n['ks_p_value']:.3g})",
        "",
        f"![PSI bins]({rel['psi']})",
        "",
        "Method. *PSI* (population stability index) bins the scores at the calibration scores' deciles "
        "(`numpy.quantile`, linear interpolation; the outer bins are open, a score on an edge goes to "
        "the bin above it), takes the share of calibration scores e_i and of this batch's scores a_i in "
        f"each bin, floors both at {drift.PSI_FLOOR:g} (an empty bin would be infinite) and sums "
        "(a_i - e_i) ln(a_i / e_i). *KS* is the two-sample Kolmogorov-Smirnov statistic, the largest "
        "vertical gap between the two empirical CDFs (exact, over all pooled scores); its p-value uses "
        "Kolmogorov's asymptotic distribution with n = calibration n and m = scored frames. Frames of "
        "one drive are correlated, not independent, so read the p-value as optimistic and watch D and "
        "PSI across runs instead.",
        "",
        "## Edge-case rate per shard",
        "",
        f"![edge-case rate per shard]({rel['shards']})",
        "",
        "Tail p = P(X >= edge cases) for X ~ Binomial(scored, target FPR): how likely that many flags "
        f"are from normal frames alone. Red bars and **bold** rows: tail p < {drift.SHARD_ALERT_P:g}.",
        "",
    ]
    shards = run.shards
    if len(shards) > MAX_SHARD_ROWS:
        shards = sorted(shards, key=lambda s: (s.tail_p if s.tail_p is not None else 2.0, s.name))
        shards = shards[:MAX_SHARD_ROWS]
        lines += [f"The {MAX_SHARD_ROWS} shards with the smallest tail p of {len(run.shards):,} "
                  "(all in report.json):", ""]  # fmt: skip
    rows = []
    for s in shards:
        name = f"**{s.name}**" if s.alert else s.name
        ratio = None if s.rate is None else s.rate / meta.target_fpr
        rows.append(
            [name, f"{s.frames:,}", f"{s.scored:,}", f"{s.errors:,}", f"{s.edge_cases:,}",
             _fmt(s.rate, ".3%"), _fmt(ratio, ".2f"), _fmt(s.tail_p, ".3g")]
        )  # fmt: skip
    lines += [
        _table(["shard", "frames", "scored", "errors", "edge cases", "rate", "rate / target", "tail p"], rows)
    ]
    lines += ["", f"## The {len(n['top_frames'])} most unusual frames", ""]
    if "top_frames" in rel:
        lines += [
            f"![top frames]({rel['top_frames']})",
            "",
            f"Highest scores first, read back from their shards and resized to {tile} by the model's "
            f"resize rule (`{manifest.input.resize_rule}`, as it sees them at {manifest.input.size}).",
            "",
            _table(
                ["rank", "key", "source", "score", "p-value"],
                [
                    [
                        str(t["rank"]),
                        f"`{_cell(t['key'])}`",
                        f"`{_cell(t['source'])}`",
                        _fmt(t["score"]),
                        _fmt(t["p_value"], ".3g"),
                    ]
                    for t in n["top_frames"]
                ],
            ),  # fmt: skip
        ]
    else:
        lines.append("(--top-k 0: none shown)")
    failures = (run.summary or {}).get("failures") or []
    if failures or n["errors"]:
        lines += ["", "## Failures", ""]
        lines.append(
            f"{n['errors']:,} frame(s) in the score files did not score"
            + (f"; `{summary_file}` lists {len(failures):,} failure(s)" if failures else "")
            + "."
        )
        if failures:
            rows = [
                [
                    f"`{_cell(f.get('source', ''))}`",
                    f"`{_cell(f.get('key') or '')}`",
                    _cell(f.get("error", "")),
                ]
                for f in failures[:MAX_FAILURES_SHOWN]
            ]
            lines += ["", _table(["source", "key", "error"], rows)]
            if len(failures) > MAX_FAILURES_SHOWN:
                lines.append(f"\n... and {len(failures) - MAX_FAILURES_SHOWN:,} more in `{summary_file}`.")
    return "\n".join(lines) + "\n"
