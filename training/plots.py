"""PNG plots shared by the VAE and GAN loops: loss curves, image grids and a t-SNE of latents.

matplotlib is used through ``matplotlib.figure.Figure`` (no pyplot), which draws with the Agg canvas,
needs no display and keeps no global figure state between calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

_SKIP_KEYS = {"epoch", "time", "seconds", "lr", "step", "partial_epoch_frames"}


def plot_losses(
    history: Sequence[dict[str, Any]], path: str | Path, keys: Sequence[str] | None = None
) -> Path:
    """One panel per numeric series in ``history`` (one record per epoch) against the epoch.

    ``keys`` picks the series; by default every numeric field except bookkeeping (epoch, time, lr).
    Series sharing a suffix after ``train_``/``val_`` (e.g. ``train_loss``, ``val_loss``) share a panel.
    """
    path = Path(path)
    if keys is None:
        keys = sorted(
            {
                k
                for rec in history
                for k, v in rec.items()
                if k not in _SKIP_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
    panels: dict[str, list[str]] = {}
    for key in keys:
        panels.setdefault(key.removeprefix("train_").removeprefix("val_"), []).append(key)
    n = max(1, len(panels))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="tight")
    for i, (title, series) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key in series:
            pts = [(r.get("epoch", j), r[key]) for j, r in enumerate(history) if key in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
    return path


def image_grid(frames: npt.NDArray[np.uint8], nrow: int, pad: int = 2) -> npt.NDArray[np.uint8]:
    """Tile NHWC uint8 frames into one image, ``nrow`` frames per row, with a white gutter."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 NHWC frames with 3 channels, got {frames.dtype} {frames.shape}")
    n, h, w, _ = frames.shape
    nrow = max(1, min(nrow, n))
    ncol_rows = math.ceil(n / nrow)
    grid = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = frame
    return grid


def save_image_grid(frames: npt.NDArray[np.uint8], path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    """Write NHWC uint8 frames as one PNG grid; ``scale`` enlarges small frames (nearest neighbour)."""
    path = Path(path)
    grid = image_grid(frames, nrow)
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


def plot_tsne(
    latents: npt.NDArray[np.floating],
    labels: Sequence[str] | None,
    path: str | Path,
    *,
    seed: int = 0,
    max_points: int = 2000,
    title: str = "t-SNE of latents",
) -> Path:
    """2-D t-SNE (van der Maaten & Hinton 2008) of latent vectors, coloured by label when given.

    At most ``max_points`` points (a seeded subsample) keep it to seconds. Perplexity shrinks for tiny
    sets (t-SNE needs perplexity < n); fewer than 3 points are drawn as they are.
    """
    from sklearn.manifold import TSNE  # heavy import, only where used

    path = Path(path)
    x = np.asarray(latents, dtype=np.float32).reshape(len(latents), -1)
    lab = np.array(labels if labels is not None else ["frames"] * len(x), dtype=object)
    if len(lab) != len(x):
        raise ValueError(f"{len(lab)} labels for {len(x)} latents")
    if len(x) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
        x, lab = x[keep], lab[keep]
    if len(x) >= 3:
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        # exact gradients for small sets: Barnes-Hut's per-iteration overhead dominates there
        method = "exact" if len(x) < 300 else "barnes_hut"
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, method=method)
        emb = tsne.fit_transform(x)
    else:
        emb = np.pad(x[:, :2], ((0, 0), (0, max(0, 2 - x.shape[1]))))
    fig = Figure(figsize=(6.5, 5.5), layout="tight")
    ax = fig.add_subplot(1, 1, 1)
    # normal first and grey, so the rare families are drawn on top in distinct colours (tab20
    # without its greys: up to 18 families before a colour repeats)
    order = sorted(set(lab), key=lambda s: (s != "normal", s))
    palette = [c for i, c in enumerate(colormaps["tab20"].colors) if i not in (14, 15)]
    families = iter(palette * (1 + len(order) // len(palette)))
    for name in order:
        sel = lab == name
        colour = "#b0b0b0" if name == "normal" else next(families)
        ax.scatter(emb[sel, 0], emb[sel, 1], s=8, alpha=0.7, color=colour, label=f"{name} ({sel.sum()})")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.savefig(path, dpi=90)
    return path
