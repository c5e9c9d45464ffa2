"""The memory bank of the patch head: early conv features of normal frames, and a coreset of them.

PatchCore (Roth et al. 2022, "Towards Total Recall in Industrial Anomaly Detection"): each location
of a grid is described by early conv features of the run's own network (standardised, optionally
pooled, projected to ``PROJECTION_DIM`` by a fixed Gaussian matrix, Johnson-Lindenstrauss), and the
bank keeps a greedy k-centre coreset of normal features seen at the location and its neighbours.
The score graph that searches the bank is training/heads/patch.py.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.pixels import to_unit_range

BANK_SIZE = 256
RADIUS = 1
PROJECTION_DIM = 64
POOL = 1  # local neighbourhood aggregation (PatchCore uses 3); 1 = none, chosen by the protocol
MAX_CANDIDATES = 8192  # per location, drawn at random before the coreset (bounds its time and memory)


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
