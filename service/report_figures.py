"""The batch report's figures (PNG): scores vs calibration, PSI bins, edge-case rate per shard, top frames.

matplotlib is optional (the `report` extra, also in `train`): it is imported inside each function, on
the object-oriented ``Figure`` API with the Agg canvas (no pyplot, no global state, no display), and
``require_matplotlib`` turns its absence into one clear message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from service.drift import PsiBin

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CALIBRATION_COLOR = "#4c72b0"
BATCH_COLOR = "#dd8452"
ALERT_COLOR = "#c44e52"
DPI = 110


class MissingPlotting(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


def require_matplotlib() -> None:
    """Fail early, before any work, when the figures cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as exc:
        raise MissingPlotting(
            "the report's figures need matplotlib: pip install 'edgecase[report]' (or matplotlib>=3.8)"
        ) from exc


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def plot_scores(
    calibration: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    *,
    threshold: float,
    ks: float,
    ks_at: float,
    units: str,
    path: Path,
) -> Path:
    """Left: score histograms (densities) of calibration and batch; right: their CDFs and the KS gap."""
    fig = _figure(11, 4)
    hist_ax, cdf_ax = fig.subplots(1, 2)
    # The axis spans calibration plus the batch's 0.5-99.5 % range; farther batch scores pile up in
    # the end bins (said in the title) so one wild frame does not squash the picture.
    low = min(float(calibration[0]), float(np.quantile(scores, 0.005)), threshold)
    high = max(float(calibration[-1]), float(np.quantile(scores, 0.995)), threshold)
    pad = 0.02 * (high - low or 1.0)
    edges = np.linspace(low - pad, high + pad, 51)
    clipped = int(np.sum((scores < edges[0]) | (scores > edges[-1])))
    for values, color, label in (
        (calibration, CALIBRATION_COLOR, f"calibration normals (n={calibration.size:,})"),
        (scores, BATCH_COLOR, f"this batch (n={scores.size:,})"),
    ):
        hist_ax.hist(
            np.clip(values, edges[0], edges[-1]),
            bins=edges,
            density=True,
            alpha=0.55,
            color=color,
            label=label,
        )
    hist_ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.4g}")
    title = "Score histogram (density)"
    hist_ax.set_title(title + (f"; {clipped:,} off-axis scores in the end bins" if clipped else ""))
    hist_ax.set_xlabel(f"score ({units})")
    hist_ax.legend(fontsize=8)
    for values, color, label in (
        (calibration, CALIBRATION_COLOR, "calibration"),
        (scores, BATCH_COLOR, "batch"),
    ):
        ys = np.arange(1, values.size + 1) / values.size
        cdf_ax.step(np.sort(values), ys, where="post", color=color, label=label)
    cal_at = np.searchsorted(calibration, ks_at, side="right") / calibration.size
    batch_at = np.searchsorted(np.sort(scores), ks_at, side="right") / scores.size
    cdf_ax.plot(
        [ks_at, ks_at], [cal_at, batch_at], color=ALERT_COLOR, linewidth=2.5, label=f"KS D = {ks:.3f}"
    )
    cdf_ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
    cdf_ax.set_xlim(edges[0], edges[-1])
    cdf_ax.set_ylim(0, 1.02)
    cdf_ax.set_title("Empirical CDFs")
    cdf_ax.set_xlabel(f"score ({units})")
    cdf_ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_psi(bins: Sequence[PsiBin], value: float, verdict: str, path: Path) -> Path:
    """Share of calibration and batch scores in each PSI bin (calibration deciles)."""
    fig = _figure(max(6.0, 0.75 * len(bins) + 2), 3.8)
    ax = fig.subplots()
    x = np.arange(len(bins))
    ax.bar(x - 0.2, [b.expected for b in bins], width=0.4, color=CALIBRATION_COLOR, label="calibration")
    ax.bar(x + 0.2, [b.actual for b in bins], width=0.4, color=BATCH_COLOR, label="batch")
    labels = []
    for b in bins:
        if math.isinf(b.low):
            labels.append(f"< {b.high:.3g}")
        elif math.isinf(b.high):
            labels.append(f">= {b.low:.3g}")
        else:
            labels.append(f"{b.low:.3g}-{b.high:.3g}")
    ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("share of scores")
    ax.set_title(f"PSI bins (calibration deciles): PSI = {value:.3f}, {verdict}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_shard_rates(
    names: Sequence[str],
    rates: Sequence[float],
    alerts: Sequence[bool],
    *,
    target_fpr: float,
    path: Path,
) -> Path:
    """Edge-case rate of every shard against the target FPR; shards too far above it in red."""
    fig = _figure(min(14.0, max(6.0, 0.35 * len(names) + 2)), 4)
    ax = fig.subplots()
    x = np.arange(len(names))
    colors = [ALERT_COLOR if alert else BATCH_COLOR for alert in alerts]
    ax.bar(x, rates, color=colors, width=0.8)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.axhline(target_fpr, color="black", linestyle="--", linewidth=1)
    handles = [
        Line2D([], [], color="black", linestyle="--", linewidth=1, label=f"target FPR {target_fpr:g}"),
        Patch(color=BATCH_COLOR, label="edge-case rate"),
    ]
    if any(alerts):
        handles.append(Patch(color=ALERT_COLOR, label="above target beyond chance (binomial tail p < 0.001)"))
    if len(names) <= 40:
        ax.set_xticks(x, list(names), rotation=45, ha="right", fontsize=7)
    else:
        ax.set_xlabel(f"{len(names):,} shards, in name order")
        ax.set_xticks([])
    ax.set_ylabel("edge-case rate")
    ax.set_ylim(0, max([*rates, target_fpr]) * 1.4 or 1.0)  # headroom: the legend sits above the bars
    ax.set_title("Edge-case rate per shard")
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_frame_grid(
    tiles: Sequence[npt.NDArray[np.uint8] | str],
    captions: Sequence[str],
    path: Path,
    *,
    columns: int = 8,
) -> Path:
    """The top frames in rank order; a frame that could not be read back is a grey tile saying why."""
    cols = max(1, min(columns, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / cols))
    fig = _figure(cols * 1.9, rows * 2.5 + 0.4)
    fig.suptitle(f"Top {len(tiles)} frames by score, highest first", fontsize=10)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[len(tiles) :]:
        ax.set_axis_off()
    for ax, tile, caption in zip(axes, tiles, captions, strict=False):
        ax.set_xticks([])
        ax.set_yticks([])  # the frame line stays: white and grey tiles stay visible on the page
        if isinstance(tile, str):
            ax.imshow(np.full((8, 8, 3), 200, dtype=np.uint8))
            ax.text(3.5, 3.5, _wrap(tile, 22), ha="center", va="center", fontsize=6, color="black")
        else:
            ax.imshow(tile)
        ax.set_title(caption, fontsize=7)
    return _save(fig, path)


def _wrap(text: str, width: int) -> str:
    return "\n".join(text[i : i + width] for i in range(0, min(len(text), 4 * width), width))
