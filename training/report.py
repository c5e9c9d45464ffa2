"""The evaluation report: Markdown tables, ROC curves, score histograms, top-scoring frames, JSON.

Files written to REPORT_DIR:
- ``report.md``: headline (best head by mean AUROC over families), a summary table per scorer, and
  per-family tables of AUROC and of detection rate at the calibrated threshold;
- ``roc.png``: overall ROC curve of every scorer (one figure);
- ``hist_<scorer>.png``: score histograms per family for each scorer, with its threshold;
- ``top_frames.png``: the best head's top-scoring frames with their family and anomaly map;
- ``report.json``: every number above.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from training.evaluate import ScorerResult


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(results: list[ScorerResult]) -> str:
    """One row per scorer: mean AUROC over families and overall metrics."""
    rows = []
    for r in sorted(results, key=lambda r: -r.metrics["mean_auroc"]):
        o = r.metrics["overall"]
        rows.append(
            [
                f"`{r.name}`",
                r.source,
                _fmt(r.metrics["mean_auroc"]),
                _fmt(o["auroc"]),
                _fmt(o["aupr"]),
                _fmt(o["fpr_at_95tpr"]),
                _fmt(o.get("false_positive_rate")),
                _fmt(o.get("detection_rate")),
            ]
        )
    header = ["scorer", "type", "mean AUROC", "AUROC", "AUPR", "FPR@95TPR", "FPR@thr", "detect@thr"]
    return markdown_table(header, rows)


def family_table(results: list[ScorerResult], metric: str = "auroc") -> str:
    """Scorers x families table of one metric."""
    families = sorted(results[0].metrics["families"]) if results else []
    rows = [
        [f"`{r.name}`"] + [_fmt(r.metrics["families"][f].get(metric)) for f in families]
        for r in sorted(results, key=lambda r: -r.metrics["mean_auroc"])
    ]
    return markdown_table(["scorer", *families], rows)


def plot_roc(results: list[ScorerResult], families: list[str], path: Path) -> None:
    """Overall ROC curves (all edge cases vs normals), one line per scorer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    labels = (np.asarray(families) != "normal").astype(int)
    fig, ax = plt.subplots(figsize=(6, 5))
    for r in results:
        fpr, tpr, _ = roc_curve(labels, np.nan_to_num(r.scores, nan=np.inf))
        style = "-" if r.source == "head" else ":"
        ax.plot(fpr, tpr, style, label=f"{r.name} ({r.metrics['overall']['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC, all edge cases vs normal")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_histograms(result: ScorerResult, families: list[str], path: Path) -> None:
    """Score histograms per family (normal first) with the calibrated threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fam = np.asarray(families)
    names = ["normal", *sorted(set(families) - {"normal"})]
    finite = result.scores[np.isfinite(result.scores)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if len(finite) else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 40)
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 1.1 * len(names) + 0.6), sharex=True)
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        ax.hist(
            np.clip(result.scores[fam == name], bins[0], bins[-1]),
            bins=bins,
            color="C0" if name == "normal" else "C3",
        )
        ax.axvline(result.calibration.threshold, color="k", lw=0.8)
        ax.set_ylabel(name, rotation=0, ha="right", fontsize=8)
        ax.set_yticks([])
    np.atleast_1d(axes)[0].set_title(f"{result.name}: scores per family (line = threshold)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_top_frames(
    result: ScorerResult, frames: npt.NDArray[np.uint8], families: list[str], path: Path, n: int = 32
) -> None:
    """The top-scoring frames of a head (and its anomaly maps, if any) with their families."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = result.top_indices if result.top_indices is not None else np.argsort(-result.scores)[:n]
    top = top[:n]
    cols = 8
    with_maps = result.maps is not None
    rows = int(np.ceil(len(top) / cols)) * (2 if with_maps else 1)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.45))
    for ax in np.ravel(axes):
        ax.axis("off")
    grid = np.asarray(axes).reshape(rows, cols)
    for k, idx in enumerate(top):
        r, c = divmod(k, cols)
        r = r * 2 if with_maps else r
        grid[r, c].imshow(frames[idx])
        grid[r, c].set_title(f"{families[idx]}\n{result.scores[idx]:.3g}", fontsize=6)
        if with_maps:
            grid[r + 1, c].imshow(result.maps[k], cmap="inferno")
    fig.suptitle(f"top-scoring frames of {result.name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_json(results: list[ScorerResult], meta: dict[str, Any]) -> dict[str, Any]:
    """Every number of the report, JSON-ready."""
    return {
        **meta,
        "scorers": {
            r.name: {
                "source": r.source,
                "threshold": r.calibration.threshold,
                "n_calibration": r.calibration.n,
                **r.metrics,
            }
            for r in results
        },
    }


def write_report(
    out_dir: str | Path,
    results: list[ScorerResult],
    families: list[str],
    frames: npt.NDArray[np.uint8],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write report.md, report.json and the PNGs to ``out_dir``; returns the report.md path."""
    from training.evaluate import best_result

    if not results:
        raise ValueError("nothing to report: no scorer results")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    best = best_result(results)
    counts = {f: int(c) for f, c in zip(*np.unique(families, return_counts=True), strict=True)}
    meta.update({"best_head": best.name, "counts": counts})
    (out / "report.json").write_text(json.dumps(report_json(results, meta), indent=1))
    plot_roc(results, families, out / "roc.png")
    for r in results:
        plot_histograms(r, families, out / f"hist_{r.name}.png")
    plot_top_frames(best, frames, families, out / "top_frames.png")
    fam_metrics = best.metrics["families"]
    weakest = min(fam_metrics, key=lambda f: fam_metrics[f]["auroc"])
    lines = [
        "# Evaluation report",
        "",
        f"Run: `{meta.get('run_dir', '?')}`; data: `{meta.get('data', '?')}`; frames: "
        + ", ".join(f"{f} {c}" for f, c in counts.items()),
        "",
        f"**Best head: `{best.name}`**, mean AUROC over families {best.metrics['mean_auroc']:.3f} "
        f"(overall {best.metrics['overall']['auroc']:.3f}; weakest family {weakest} "
        f"{fam_metrics[weakest]['auroc']:.3f}).",
        "",
        "Thresholds are the calibrated ones (held-out normals, target FPR "
        f"{best.calibration.target_fpr:g}); FPR@thr is measured on this set's normal frames.",
        "",
        "## Summary",
        "",
        summary_table(results),
        "",
        "## AUROC per family",
        "",
        family_table(results, "auroc"),
        "",
        "## Detection rate at the calibrated threshold, per family",
        "",
        family_table(results, "detection_rate"),
        "",
        "## AUPR per family",
        "",
        family_table(results, "aupr"),
        "",
        "## Figures",
        "",
        "![ROC curves](roc.png)",
        "",
        "![Top-scoring frames](top_frames.png)",
        "",
        *[f"![{r.name} histograms](hist_{r.name}.png)" for r in results],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
