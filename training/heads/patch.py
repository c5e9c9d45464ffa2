"""Local (patch-level) score heads: small objects are local evidence, not a global likelihood.

A pedestrian 2-20 px tall changes a 64x64 frame's likelihood by less than the natural variation
between normal frames, so every global score sits at chance on it. PatchCore (Roth et al. 2022,
"Towards Total Recall in Industrial Anomaly Detection") scores each location by the distance of its
feature to the nearest feature in a memory bank of normal patches. Dashcam frames are spatially
aligned (sky on top, road below), so here the bank is *position-aware*: location ``(i, j)`` is
compared only with normal features seen at ``(i + di, j + dj)``, ``|di|, |dj| <= radius``. Sky-blue
on the road or asphalt-grey in the sky is then anomalous even though both are normal elsewhere (the
idea PaDiM, Defard et al. 2021, uses with one Gaussian per location).

Graph (export-friendly: conv, bmm, min, max, bilinear resize): frames uint8 NHWC -> [-1, 1] -> the
first ``depth`` conv blocks of the run's network (VAE encoder or GAN discriminator; 1 at 64 px, a 32
x 32 grid; 3 at 256x144, an 18 x 32 grid, 576 locations) -> per-channel standardisation -> 3x3
average pooling (PatchCore's local neighbourhood aggregation) -> a fixed random projection to
``dim`` channels (Johnson-Lindenstrauss; keeps the bank small) -> per location, the min squared
distance to its bank [L, M, dim] -> sqrt -> anomaly map (upsampled bilinearly to H x W) and score =
max over locations. The max is the reduction rule because one small object occupies one or two
locations.

The bank holds at most ``bank_size`` (default 256) entries per location, chosen from the candidates
(features of up to 4,000 training normals at the location and its neighbours, 8,192 of them drawn
at random) by greedy k-centre coreset selection (PatchCore), so rare normal patterns stay covered.
It is fitted from training normals (:func:`fit_patch_bank`) and cached in ``RUN_DIR/banks/<head>.pt``.
At 256x144 the bank is 576 x 256 x 64 float32 (36 MB) and fits in under a minute on 2 cores from
4,000 frames (peak memory about 3 GB with the frames; the grid keeps it below 64x64's 1,024 locations).

Grid, bank size, pooling and the per-cell normalisation were chosen by the validation protocol
(training/protocol.py: held-out normals vs generic corruptions, no edge-case family); the
measurements are in docs/benchmarks.md, "Score-head design history". The rejected settings remain
options of :func:`fit_patch_bank` (the accuracy bench reports them as ablation rows).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from contract.frames import FrameSize
from training.heads.base import HeadNotFitted, HeadSpec
from training.heads.gan import build_dcgan, load_gan
from training.heads.vae import load_vae
from training.patch_bank import (
    BANK_SIZE,
    MAX_CANDIDATES,
    POOL,
    PROJECTION_DIM,
    RADIUS,
    PatchFeatures,
    build_bank,
    context_backbone,
)
from training.pixels import to_unit_range
from training.runs import split_train_normals
from training.shapes import parse_size
from training.vae import VAE

log = logging.getLogger(__name__)

GRID_SIDE = 32
CELL_NORM = False  # per-location z-scores of the map; chosen by the protocol (module docstring)
MAX_BANK_FRAMES = 4000
CONTEXT = 0  # deeper conv blocks whose features join each location's (upsampled), PatchCore's mid-level
BANK_FORMAT_VERSION = 2
MAX_CELL_FRAMES = 1000
CELL_SCALE_FLOOR = 0.25  # of the median cell scale: a constant sky cell must not turn noise into z = 50


class PatchDistanceGraph(nn.Module):
    """Score graph: per-location nearest-neighbour distance to a position-aware bank of normals.

    With ``cell_center`` / ``cell_scale`` ([h, w], from :func:`cell_statistics`) each location's
    distance is standardised against its own spread on held-out normals before the max, so one
    unusual cell on the quiet road shoulder is not drowned by the busy horizon (PaDiM's per-location
    statistics, Defard et al. 2021, applied to the nearest-neighbour distance).
    """

    def __init__(
        self,
        features: PatchFeatures,
        bank: torch.Tensor,
        grid: tuple[int, int],
        cell_center: torch.Tensor | None = None,
        cell_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        locations, _, dim = bank.shape
        if locations != grid[0] * grid[1]:
            raise ValueError(f"bank has {locations} locations, grid {grid} has {grid[0] * grid[1]}")
        self.features = features
        self.grid = grid
        self.register_buffer("bank_t", bank.transpose(1, 2).contiguous())  # [L, dim, M]
        self.register_buffer("bank_sq", (bank * bank).sum(-1)[:, None, :].contiguous())  # [L, 1, M]
        self.dim = dim
        self.cell_norm = cell_center is not None
        if (cell_center is None) != (cell_scale is None):
            raise ValueError("give both cell_center and cell_scale, or neither")
        if cell_center is not None and cell_scale is not None:
            for name, t in (("cell_center", cell_center), ("cell_scale", cell_scale)):
                if tuple(t.shape) != tuple(grid):
                    raise ValueError(f"{name} has shape {tuple(t.shape)}, the grid is {grid}")
            self.register_buffer("cell_center", cell_center.float().contiguous())
            self.register_buffer("inv_cell_scale", 1.0 / cell_scale.float().clamp_min(1e-8))

    def distance_map(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, h, w] distance of each location's feature to its nearest bank entry."""
        f = self.features(to_unit_range(frames))  # [N, dim, h, w]
        n = f.shape[0]
        f = f.flatten(2).permute(2, 0, 1)  # [L, N, dim]
        d2 = (f * f).sum(-1, keepdim=True) - 2.0 * torch.bmm(f, self.bank_t) + self.bank_sq  # [L, N, M]
        # The expansion finds the nearest entry fast but cancels badly near zero (sqrt of rounding
        # noise); the distance to that entry is computed directly, so torch and onnxruntime agree.
        idx = d2.argmin(dim=-1)  # [L, N]
        nearest = torch.gather(self.bank_t, 2, idx[:, None, :].expand(-1, self.dim, -1))  # [L, dim, N]
        d = (f - nearest.transpose(1, 2)).pow(2).sum(-1).sqrt()  # [L, N]
        return d.transpose(0, 1).reshape(n, self.grid[0], self.grid[1])

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dmap = self.distance_map(frames)
        if self.cell_norm:
            dmap = (dmap - self.cell_center) * self.inv_cell_scale
        score = dmap.flatten(1).max(dim=1).values
        amap = F.interpolate(dmap[:, None], size=frames.shape[1:3], mode="bilinear", align_corners=False)
        return score, amap[:, 0]


@torch.no_grad()
def cell_statistics(
    graph: PatchDistanceGraph, frames: npt.NDArray[np.uint8]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-location median and 1.4826 MAD [h, w] of the raw distance map on held-out normal frames.

    The frames must not be in the bank (a bank member is at distance 0 from itself). Scales are
    floored at ``CELL_SCALE_FLOOR`` times their median so a location that never varies does not turn
    rendering noise into a huge z-score.
    """
    if len(frames) < 2:
        raise ValueError("per-cell statistics need at least two held-out normal frames")
    x = torch.from_numpy(np.ascontiguousarray(frames))
    maps = torch.cat([graph.distance_map(x[i : i + 64]) for i in range(0, len(x), 64)])  # [N, h, w]
    center = maps.median(dim=0).values
    scale = (maps - center).abs().median(dim=0).values * 1.4826
    floor = CELL_SCALE_FLOOR * float(scale.median()) + 1e-6
    return center, scale.clamp_min(floor)


def default_depth(size: FrameSize | int) -> int:
    """Conv blocks (each halves the resolution) that bring the longer side to about GRID_SIDE.

    64 px -> 1 block (a 32x32 grid), 128 px -> 2, 256x144 -> 3 (an 18x32 grid): the grid, hence the
    bank, the fit time and the latency, stays about the same size, and a location covers the same
    fraction of the frame's width at every resolution.
    """
    side = max(parse_size(size))
    return max(1, round(math.log2(max(side, GRID_SIDE) / GRID_SIDE)))


def _prepare(
    run_dir: Path,
    kind: str,
    *,
    depth: int | None,
    bank_size: int,
    radius: int,
    dim: int,
    random_init: bool,
    cell_norm: bool,
    pool: int,
    context: int,
    bank_frames: int,
    max_candidates: int,
) -> tuple[Path, dict[str, Any], PatchFeatures]:
    """(cache file, settings, unfitted features) of a patch head with these settings."""
    # Non-default settings get their own cache file, so ablations never evict the default bank.
    head = f"{kind}-patch" + ("-random" if random_init else "")
    head += "" if cell_norm == CELL_NORM else f"-cell{int(cell_norm)}"
    head += "" if pool == POOL else f"-pool{pool}"
    head += "" if context == CONTEXT else f"-ctx{context}"
    head += (
        ""
        if (bank_frames, max_candidates) == (MAX_BANK_FRAMES, MAX_CANDIDATES)
        else (f"-f{bank_frames}-c{max_candidates}")
    )
    head += "" if bank_size == BANK_SIZE else f"-m{bank_size}"
    network, config = early_network(run_dir, kind, random_init=random_init)
    depth = depth or default_depth(parse_size(config["size"]))
    backbone, channels = context_backbone(network, depth, context)
    settings: dict[str, Any] = {
        "version": BANK_FORMAT_VERSION,
        "depth": depth,
        "bank_size": bank_size,
        "radius": radius,
        "dim": dim,
        "pool": pool,
        "random_init": random_init,
        "cell_norm": cell_norm,
        "context": context,
        "bank_frames": bank_frames,
        "max_candidates": max_candidates,
        "seed": int(config.get("seed", 0)),
    }
    features = PatchFeatures(backbone, channels, dim=dim, seed=settings["seed"], pool=pool)
    return run_dir / "banks" / f"{head}.pt", settings, features


def _saved(cache: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The cached bank record if it was fitted with ``settings``, else None."""
    if not cache.is_file():
        return None
    saved: dict[str, Any] = torch.load(cache, map_location="cpu", weights_only=True)
    if saved.get("settings") != settings:
        log.info("%s: settings changed, the bank must be refitted", cache)
        return None
    return saved


def load_patch_graph(run_dir: str | Path, kind: str, **options: Any) -> PatchDistanceGraph:
    """The ``<kind>-patch`` graph from its cached bank; :class:`HeadNotFitted` when there is none.

    ``options`` are those of :func:`fit_patch_bank` (defaults: the module constants).
    """
    cache, settings, features = _prepare(Path(run_dir), kind, **{**_DEFAULTS, **options})
    saved = _saved(cache, settings)
    if saved is None:
        raise HeadNotFitted(f"{cache}: no patch bank fitted with these settings")
    features.load_state_dict(saved["features"])
    cells = (saved["cell_center"], saved["cell_scale"]) if settings["cell_norm"] else (None, None)
    return PatchDistanceGraph(features, saved["bank"], tuple(saved["grid"]), *cells).eval()


def fit_patch_bank(
    run_dir: str | Path,
    kind: str,
    *,
    depth: int | None = None,
    bank_size: int = BANK_SIZE,
    radius: int = RADIUS,
    dim: int = PROJECTION_DIM,
    random_init: bool = False,
    cell_norm: bool = CELL_NORM,
    pool: int = POOL,
    context: int = CONTEXT,
    bank_frames: int = MAX_BANK_FRAMES,
    max_candidates: int = MAX_CANDIDATES,
) -> None:
    """Build the position-aware bank of a run and cache it in ``RUN_DIR/banks/`` (no-op if fresh).

    ``depth`` (conv blocks of early features) defaults to :func:`default_depth` of the run's size.
    The bank comes from up to ``bank_frames`` training normals; with ``cell_norm`` the per-cell
    statistics come from up to ``MAX_CELL_FRAMES`` *other* training normals.

    ``random_init`` swaps the trained early layers for the same layers at their random
    initialisation (an ablation: are trained features needed?). ``context`` adds that many deeper
    conv blocks' features to each location's (:class:`ContextBackbone`).
    """
    run_dir = Path(run_dir)
    cache, settings, features = _prepare(
        run_dir, kind, depth=depth, bank_size=bank_size, radius=radius, dim=dim, random_init=random_init,
        cell_norm=cell_norm, pool=pool, context=context, bank_frames=bank_frames,
        max_candidates=max_candidates,
    )  # fmt: skip
    if _saved(cache, settings) is not None:
        return
    normals, held_out = split_train_normals(run_dir, bank_frames, MAX_CELL_FRAMES if cell_norm else 0)
    bank, grid = build_bank(
        features,
        normals,
        bank_size=bank_size,
        radius=radius,
        seed=settings["seed"],
        max_candidates=max_candidates,
    )
    record: dict[str, Any] = {
        "settings": settings,
        "features": features.state_dict(),
        "bank": bank,
        "grid": list(grid),
    }
    if cell_norm:
        if len(held_out) < 2:
            raise ValueError(
                f"{cache.stem}: per-cell statistics need training normals beyond the {len(normals)} in "
                "the bank; give more training frames or build with cell_norm=False"
            )
        graph = PatchDistanceGraph(features, bank, grid).eval()
        record["cell_center"], record["cell_scale"] = cell_statistics(graph, held_out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".pt.tmp")
    torch.save(record, tmp)
    tmp.replace(cache)


def build_patch_graph(run_dir: str | Path, kind: str, **options: Any) -> PatchDistanceGraph:
    """Fit (if needed) and build a patch graph with non-default ``options``: the accuracy bench's
    ablations (:func:`fit_patch_bank` lists them)."""
    fit_patch_bank(run_dir, kind, **options)
    return load_patch_graph(run_dir, kind, **options)


_DEFAULTS: dict[str, Any] = {
    "depth": None,
    "bank_size": BANK_SIZE,
    "radius": RADIUS,
    "dim": PROJECTION_DIM,
    "random_init": False,
    "cell_norm": CELL_NORM,
    "pool": POOL,
    "context": CONTEXT,
    "bank_frames": MAX_BANK_FRAMES,
    "max_candidates": MAX_CANDIDATES,
}


def early_network(run_dir: Path, kind: str, *, random_init: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The network whose early convs the patch head uses: the VAE encoder or the GAN discriminator.

    With ``random_init`` the same architecture at a seeded random initialisation is returned instead.
    """
    if kind == "gan":
        model, config = load_gan(run_dir)
        if random_init:
            torch.manual_seed(int(config.get("seed", 0)))
            model = build_dcgan(config).eval()
        return model.discriminator, config
    if kind == "vae":
        vae, config = load_vae(run_dir)
        if random_init:
            torch.manual_seed(int(config.get("seed", 0)))
            vae = VAE(**vae.config()).eval()
        return vae.encoder, config
    raise ValueError(f"no patch head for run kind {kind!r}; valid: gan, vae")


def _patch_head(kind: str) -> HeadSpec:
    network = "VAE encoder" if kind == "vae" else "discriminator"
    return HeadSpec(
        name=f"{kind}-patch",
        kind=kind,
        units="feature distance",
        definition=f"max over locations of the nearest-neighbour distance of early {network} "
        "features to normal training features at the same location (position-aware PatchCore)",
        has_map=True,
        build=lambda run_dir: load_patch_graph(run_dir, kind),
        fit=lambda run_dir: fit_patch_bank(run_dir, kind),
    )


PATCH_HEADS = [_patch_head("vae"), _patch_head("gan")]
