"""Local (patch-level) score heads: small objects are local evidence, not a global likelihood.

A pedestrian 2-20 px tall changes a 64x64 frame's likelihood by less than the natural variation
between normal frames, so every global score sits at chance on it. PatchCore (Roth et al. 2022,
"Towards Total Recall in Industrial Anomaly Detection") scores each location by the distance of its
feature to the nearest feature in a memory bank of normal patches. Dashcam frames are spatially
aligned (sky on top, road below), so here the bank is *position-aware*: location ``(i, j)`` is
compared only with normal features seen at ``(i + di, j + dj)``, ``|di|, |dj| <= radius``. Sky-blue
on the road or asphalt-grey in the sky is then anomalous even though both are normal elsewhere (the
idea PaDiM, Defard et al. 2021, uses with one Gaussian per location).

Graph (export-friendly: conv, bmm, min, max, bilinear resize): frames uint8 NHWC -> [-1, 1] ->
the first ``depth`` conv blocks of the run's network (VAE encoder or GAN discriminator; 1 at 64 px,
a 32 x 32 grid) -> per-channel standardisation -> 3x3 average pooling (PatchCore's local
neighbourhood aggregation) -> a fixed random projection to ``dim`` channels (Johnson-Lindenstrauss;
keeps the bank small) -> per location, the min squared distance to its bank [L, M, dim] -> sqrt ->
anomaly map (upsampled bilinearly to H x W) and score = max over locations. The max is the
reduction rule because one small object occupies one or two locations.

The bank holds at most ``bank_size`` (default 256) entries per location, chosen from the candidates
(features of up to 4,000 training normals at the location and its neighbours, 8,192 of them drawn
at random) by greedy k-centre coreset selection (PatchCore), so rare normal patterns stay covered.
It is built from training normals the first time the graph is built and cached in
``RUN_DIR/banks/<head>.pt``.

Grid and bank size were chosen by the validation protocol of training/combo_heads.py (held-out
normals vs CutPaste / noise-patch corruptions, no edge-case family): on the 64x64 benchmark runs a
32 x 32 grid with 128 entries scored AUROC 0.735 (VAE) and 0.766 (GAN) there, a 16 x 16 grid with
256 entries 0.622 and 0.692 (docs/benchmarks.md, "## Accuracy"). The same protocol chose the
feature pooling and the per-cell normalisation, on the re-trained 64x64 runs (VAE / GAN):
no pooling, raw distances 0.786 / 0.771; no pooling, per-cell z-scores 0.725 / 0.719; 3x3 pooling,
raw 0.733 / 0.725; 3x3 pooling, per-cell 0.734 / 0.736. Both remain settings of
:func:`build_patch_graph` (the accuracy bench reports them as ablation rows). On the third
session's re-trained runs the protocol chose the larger bank (4,000 frames, 8,192 candidates, 256
entries: 0.821 / 0.822 against 0.779 / 0.771 for 1,500 frames, 2,048 candidates, 128 entries) and
rejected the next conv block's features as context (:class:`ContextBackbone`, VAE 0.739 vs 0.779).
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
from tqdm import tqdm

log = logging.getLogger(__name__)

BANK_SIZE = 256
GRID_SIDE = 32
RADIUS = 1
PROJECTION_DIM = 64
POOL = 1  # local neighbourhood aggregation (PatchCore uses 3); 1 = none, chosen by the protocol
CELL_NORM = False  # per-location z-scores of the map; chosen by the protocol (module docstring)
MAX_BANK_FRAMES = 4000
MAX_CANDIDATES = 8192  # per location, drawn at random before the coreset (bounds its time and memory)
CONTEXT = 0  # deeper conv blocks whose features join each location's (upsampled), PatchCore's mid-level
BANK_FORMAT_VERSION = 2
MAX_CELL_FRAMES = 1000
CELL_SCALE_FLOOR = 0.25  # of the median cell scale: a constant sky cell must not turn noise into z = 50


def to_unit_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the scaling every score graph does inside)."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ContextBackbone(nn.Module):
    """Early conv blocks whose deeper outputs are upsampled to the first grid and concatenated.

    PatchCore (Roth et al. 2022) describes a patch by *mid-level* features: a location's own block
    sees a few pixels, the next block a neighbourhood about twice as wide, which tells the legs and
    neck of a 5-pixel animal from the box of a distant car. ``blocks[0]`` is the grid's backbone,
    each further block consumes the previous one's output: [N, C0 + C1 + ..., h, w].
    """

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a context backbone needs at least one block")
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.blocks[0](x)
        feats = [f]
        for block in self.blocks[1:]:
            f = block(f)
            feats.append(F.interpolate(f, size=feats[0].shape[2:], mode="bilinear", align_corners=False))
        return torch.cat(feats, dim=1)


class PatchFeatures(nn.Module):
    """Early conv features, standardised, locally pooled and projected: [N, dim, h, w]."""

    def __init__(
        self, backbone: nn.Module, channels: int, dim: int = PROJECTION_DIM, seed: int = 0, pool: int = POOL
    ) -> None:
        super().__init__()
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"pool must be an odd number >= 1, got {pool}")
        self.backbone = backbone
        self.pool = pool
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("inv_std", torch.ones(1, channels, 1, 1))
        # A fixed Gaussian projection (seeded): distances are preserved up to a small factor (JL lemma).
        generator = torch.Generator().manual_seed(seed)
        out_dim = min(dim, channels)
        projection = torch.randn(out_dim, channels, generator=generator) / out_dim**0.5
        if out_dim == channels:
            projection = torch.eye(channels)
        self.register_buffer("projection", projection[:, :, None, None].contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        f = (f - self.mean) * self.inv_std
        if self.pool > 1:
            k = self.pool
            f = F.avg_pool2d(f, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
        return F.conv2d(f, self.projection)

    @torch.no_grad()
    def fit_standardisation(self, x: torch.Tensor) -> None:
        """Per-channel mean and std of the backbone's features on normal frames."""
        f = self.backbone(x)
        self.mean.copy_(f.mean(dim=(0, 2, 3), keepdim=True))
        self.inv_std.copy_(1.0 / f.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))


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
        d = d2.min(dim=-1).values.clamp_min(0.0).sqrt()  # [L, N]
        return d.transpose(0, 1).reshape(n, self.grid[0], self.grid[1])

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dmap = self.distance_map(frames)
        if self.cell_norm:
            dmap = (dmap - self.cell_center) * self.inv_cell_scale
        score = dmap.flatten(1).max(dim=1).values
        amap = F.interpolate(dmap[:, None], size=frames.shape[1:3], mode="bilinear", align_corners=False)
        return score, amap[:, 0]


def greedy_coreset(candidates: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Indices [L, size] of a greedy k-centre coreset per location (Roth et al. 2022, Sec. 3.2).

    ``candidates`` is [L, K, D]; each step adds, per location, the candidate farthest from those
    already chosen, so the chosen set covers every candidate within the smallest radius it can.
    """
    locations, k, _ = candidates.shape
    if size >= k:
        return torch.arange(k).expand(locations, k).clone()
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(locations)
    sq = (candidates * candidates).sum(-1)  # [L, K]

    def sq_dist_to(pick: torch.Tensor) -> torch.Tensor:
        # |c - p|^2 = |c|^2 - 2 c.p + |p|^2 as a batched mat-vec: no [L, K, D] temporary per step.
        dots = torch.bmm(candidates, candidates[rows, pick][:, :, None])[:, :, 0]
        return (sq - 2.0 * dots + sq[rows, pick][:, None]).clamp_min(0.0)

    first = torch.randint(k, (locations,), generator=generator)
    chosen = [first]
    nearest = sq_dist_to(first)  # [L, K]
    for _ in range(size - 1):
        pick = nearest.argmax(dim=1)
        chosen.append(pick)
        nearest = torch.minimum(nearest, sq_dist_to(pick))
    return torch.stack(chosen, dim=1)


def sample_candidates(
    padded: torch.Tensor, locations: torch.Tensor, grid_w: int, keep: torch.Tensor, radius: int
) -> torch.Tensor:
    """[S, K, D] bank candidates of ``locations`` from replicate-padded features [N, D, h+2r, w+2r].

    ``keep`` indexes (frame, shift) pairs as ``frame * (2r+1)^2 + shift``, shifts row-major from
    (-r, -r): a location is compared with normal features seen at itself and its neighbours, and
    edge locations reuse the nearest valid neighbour.
    """
    side = 2 * radius + 1
    frame, shift = keep // (side * side), keep % (side * side)
    rows = (locations // grid_w)[:, None] + (shift // side)[None, :]  # [S, K] in padded coordinates
    cols = (locations % grid_w)[:, None] + (shift % side)[None, :]
    return padded[frame[None, :], :, rows, cols]  # advanced indices first: [S, K, D]


@torch.no_grad()
def build_bank(
    features: PatchFeatures,
    frames: npt.NDArray[np.uint8],
    bank_size: int = BANK_SIZE,
    radius: int = RADIUS,
    seed: int = 0,
    batch_size: int = 64,
    max_candidates: int = MAX_CANDIDATES,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Fit the standardisation and build the position-aware bank [L, M, dim] from normal frames.

    Each location draws the same ``max_candidates`` (frame, neighbour) pairs at random from all of
    them; candidates are gathered one chunk of locations at a time, so memory grows with the
    frames' features, not with frames x neighbours x locations.
    """
    if len(frames) == 0:
        raise ValueError("building a patch bank needs at least one normal frame")
    x = torch.from_numpy(np.ascontiguousarray(frames))
    features.eval()
    features.fit_standardisation(to_unit_range(x[: min(len(x), 512)]))
    chunks = [
        features(to_unit_range(x[i : i + batch_size]))
        for i in tqdm(range(0, len(x), batch_size), desc="patch features", unit="batch", leave=False)
    ]
    feats = torch.cat(chunks)  # [N, dim, h, w]
    n, _, h, w = feats.shape
    padded = F.pad(feats, (radius, radius, radius, radius), mode="replicate")
    del feats, chunks
    total = n * (2 * radius + 1) ** 2
    generator = torch.Generator().manual_seed(seed)
    keep = torch.arange(total)
    if total > max_candidates:  # bound coreset time: a random subset first
        keep = torch.randperm(total, generator=generator)[:max_candidates]
    banks = []
    step = 64  # locations per coreset chunk bounds memory
    for start in tqdm(range(0, h * w, step), desc="patch coreset", unit="chunk", leave=False):
        block = sample_candidates(padded, torch.arange(start, min(start + step, h * w)), w, keep, radius)
        idx = greedy_coreset(block, bank_size, seed=seed + start)
        banks.append(torch.gather(block, 1, idx[:, :, None].expand(-1, -1, block.shape[2])))
    return torch.cat(banks).contiguous(), (int(h), int(w))


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


def early_layers(network: nn.Module, depth: int) -> tuple[nn.Sequential, int]:
    """The leaf modules of ``network`` up to (not including) its ``depth + 1``-th conv; and its width.

    Relies on the modules being registered in forward order, as in an ``nn.Sequential`` stack of
    conv / norm / activation blocks (pytorch/examples' DCGAN and our VAE encoder).
    """
    layers: list[nn.Module] = []
    convs = 0
    channels = 0
    for module in network.modules():
        if list(module.children()):
            continue
        if isinstance(module, nn.Conv2d):
            if convs == depth:
                break
            convs += 1
            channels = module.out_channels
        elif isinstance(module, nn.Linear | nn.Flatten):
            break
        if convs:
            layers.append(module)
    if convs < depth:
        raise ValueError(f"network has only {convs} conv layers before its head, asked for {depth}")
    return nn.Sequential(*layers), channels


def context_backbone(network: nn.Module, depth: int, context: int) -> tuple[nn.Module, int]:
    """The first ``depth`` conv blocks, with ``context`` deeper blocks' features joined (upsampled).

    With ``context`` 0 this is :func:`early_layers` itself (the cached banks' state-dict keys).
    """
    backbone, channels = early_layers(network, depth)
    if context == 0:
        return backbone, channels
    blocks: list[nn.Module] = [backbone]
    total, seen = channels, len(backbone)
    for extra in range(1, context + 1):
        deeper, width = early_layers(network, depth + extra)
        blocks.append(nn.Sequential(*list(deeper)[seen:]))
        total, seen = total + width, len(deeper)
    return ContextBackbone(blocks), total


def default_depth(size: int) -> int:
    """Conv blocks (each halves the resolution) that bring ``size`` to a GRID_SIDE x GRID_SIDE grid.

    64 px -> 1 block (stride 2), 128 px -> 2 (stride 4): the grid, hence the bank and the latency,
    stays the same size, and a location covers the same fraction of the frame at every resolution.
    """
    return max(1, round(math.log2(max(size, GRID_SIDE) / GRID_SIDE)))


def build_patch_graph(
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
) -> PatchDistanceGraph:
    """The ``<kind>-patch`` graph of a run; the bank is built once and cached in RUN_DIR/banks/.

    ``depth`` (conv blocks of early features) defaults to :func:`default_depth` of the run's size.
    The bank comes from up to ``MAX_BANK_FRAMES`` training normals; with ``cell_norm`` the per-cell
    statistics come from up to ``MAX_CELL_FRAMES`` *other* training normals.

    ``random_init`` swaps the trained early layers for the same layers at their random
    initialisation (an ablation: are trained features needed?). ``context`` adds that many deeper
    conv blocks' features to each location's (:class:`ContextBackbone`).
    """
    run_dir = Path(run_dir)
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
    depth = depth or default_depth(int(config["size"]))
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
    cache = run_dir / "banks" / f"{head}.pt"
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("settings") == settings:
            features.load_state_dict(saved["features"])
            cells = (saved["cell_center"], saved["cell_scale"]) if cell_norm else (None, None)
            return PatchDistanceGraph(features, saved["bank"], tuple(saved["grid"]), *cells).eval()
        log.info("%s: settings changed, rebuilding the bank", cache)
    from training.runs import split_train_normals

    normals, held_out = split_train_normals(run_dir, bank_frames, MAX_CELL_FRAMES if cell_norm else 0)
    bank, grid = build_bank(
        features,
        normals,
        bank_size=bank_size,
        radius=radius,
        seed=settings["seed"],
        max_candidates=max_candidates,
    )
    graph = PatchDistanceGraph(features, bank, grid).eval()
    record: dict[str, Any] = {
        "settings": settings,
        "features": features.state_dict(),
        "bank": bank,
        "grid": list(grid),
    }
    if cell_norm:
        if len(held_out) < 2:
            raise ValueError(
                f"{head}: per-cell statistics need training normals beyond the {len(normals)} in the "
                "bank; give more training frames or build with cell_norm=False"
            )
        record["cell_center"], record["cell_scale"] = cell_statistics(graph, held_out)
        graph = PatchDistanceGraph(features, bank, grid, record["cell_center"], record["cell_scale"]).eval()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".pt.tmp")
    torch.save(record, tmp)
    tmp.replace(cache)
    return graph


def early_network(run_dir: Path, kind: str, *, random_init: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The network whose early convs the patch head uses: the VAE encoder or the GAN discriminator.

    With ``random_init`` the same architecture at a seeded random initialisation is returned instead.
    """
    if kind == "gan":
        from training.gan_heads import build_dcgan, load_gan

        model, config = load_gan(run_dir)
        if random_init:
            torch.manual_seed(int(config.get("seed", 0)))
            model = build_dcgan(config).eval()
        return model.discriminator, config
    if kind == "vae":
        from training.vae_heads import load_vae

        vae, config = load_vae(run_dir)
        if random_init:
            from training.vae import VAE

            torch.manual_seed(int(config.get("seed", 0)))
            vae = VAE(**vae.config()).eval()
        return vae.encoder, config
    raise ValueError(f"no patch head for run kind {kind!r}; valid: gan, vae")
