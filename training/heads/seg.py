"""The discriminative head ``<kind>-seg``: a small network that learns *where* a frame was corrupted.

Likelihoods and feature distances ask "how unlike normal is this frame?"; a 3-pixel animal barely
moves either. DRAEM (Zavrtanik et al. 2021, "DRAEM - A discriminatively trained reconstruction
embedding for surface anomaly detection") instead trains a segmentation network on normal frames with
*synthetic* defects pasted in, given the frame and the generative model's reconstruction of it: it
learns what "locally inconsistent with the rest of the frame and with what the model expected here"
looks like, a skill that transfers to defects it never saw. Issue 3's rules allow exactly this
training signal (generic corruptions of normal frames; no edge-case family).

- Reconstruction: the run's own network, frozen: the VAE decoded at the posterior mean, or the GAN's
  f-AnoGAN path G(E(x)). Both drop what normal training frames do not contain, so the pair
  (x, recon) shows a pasted object as a difference the network can localise.
- The net and its training (Perlin pseudo-anomalies on 64 px windows with coordinate channels, focal
  loss): training/seg_net.py.
- Score graph: frames -> [-1, 1] -> (x, recon, row/column planes) -> U-Net logits -> ``SMOOTH`` x
  ``SMOOTH`` mean filter (DRAEM's reduction: one confident pixel is noise, a coherent blob is a
  defect) -> anomaly map [N, H, W]; score = max of the map, in logits.
- Held out: the protocol's rectangular patches and photometric corruptions (training/protocol.py)
  are *not* what this net trains on, so the protocol measures transfer, not memorisation.

The default training length (``STEPS``) was chosen by that protocol (docs/benchmarks.md, "Score-head
design history"). :func:`fit_seg_net` trains the net and caches it in ``RUN_DIR/banks/seg.pt`` with
its settings; the run's ``seg_steps`` (``--seg-steps``, 0 = no seg head) and seed make it
deterministic on CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.heads.base import HeadNotFitted, HeadSpec, HeadUnavailable
from training.heads.gan import load_gan
from training.heads.vae import load_vae
from training.pixels import to_unit_range
from training.runs import load_config, run_normals, run_size
from training.seg_net import (
    BATCH,
    CLEAN_FRACTION,
    CROP,
    FOCAL_GAMMA,
    LEARNING_RATE,
    STEPS,
    WIDTH,
    SegNet,
    coord_planes,
    train_seg_net,
)

log = logging.getLogger(__name__)

SEG_FILE = "seg.pt"
SEG_FORMAT_VERSION = 2  # 2: coordinate channels and Perlin pseudo-anomalies
SMOOTH = 3
MAX_TRAIN_FRAMES = 4000
MAX_EPOCHS = 25  # passes over the frames at most: a 16-frame test run trains in seconds


class Reconstructor(nn.Module):
    """The run's frozen generative network as x -> reconstruction, both in [-1, 1] NCHW."""

    def __init__(self, network: nn.Module, kind: str) -> None:
        super().__init__()
        if kind not in ("vae", "gan"):
            raise ValueError(f"unknown run kind {kind!r}; valid: gan, vae")
        self.network = network.eval()
        self.kind = kind
        for p in self.network.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "vae":
            mu, _ = self.network.encode(x)
            return self.network.decode(mu).float()
        return self.network.generator(self.network.encoder(x)).float()


def load_reconstructor(run_dir: str | Path, kind: str) -> Reconstructor:
    """The reconstruction path of a VAE or GAN run (the GAN needs its trained encoder)."""
    if kind == "vae":
        return Reconstructor(load_vae(run_dir)[0], "vae")
    return Reconstructor(load_gan(run_dir)[0], "gan")


class SegGraph(nn.Module):
    """Score graph of ``<kind>-seg``: (max of the smoothed logit map [N], the map [N, H, W]).

    The whole frame goes through the fully convolutional net with its full coordinate planes (a
    constant of the graph built for the run's H x W, so the exported graph stays uint8 in).
    """

    def __init__(
        self, reconstructor: Reconstructor, net: SegNet, size: tuple[int, int], smooth: int = SMOOTH
    ) -> None:
        super().__init__()
        if smooth < 1 or smooth % 2 == 0:
            raise ValueError(f"smooth must be an odd number >= 1, got {smooth}")
        self.reconstructor = reconstructor
        self.net = net.eval()
        self.smooth = smooth
        self.register_buffer("coords", coord_planes(int(size[0]), int(size[1])), persistent=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits [N, 1, H, W] of whole frames x in [-1, 1]."""
        with torch.no_grad():
            recon = self.reconstructor(x)
        coords = self.coords.expand(x.shape[0], -1, -1, -1)
        return self.net(torch.cat([x, recon, coords], dim=1))

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(to_unit_range(frames))
        if self.smooth > 1:
            pad = self.smooth // 2
            logits = F.avg_pool2d(logits, self.smooth, stride=1, padding=pad, count_include_pad=False)
        amap = logits[:, 0]
        return amap.flatten(1).max(dim=1).values, amap


def settings(steps: int = STEPS, width: int = WIDTH, smooth: int = SMOOTH) -> dict[str, Any]:
    """Everything that decides the trained net; a cache with other settings is retrained."""
    return {
        "version": SEG_FORMAT_VERSION,
        "steps": steps,
        "batch": BATCH,
        "lr": LEARNING_RATE,
        "width": width,
        "smooth": smooth,
        "max_train_frames": MAX_TRAIN_FRAMES,
        "clean_fraction": CLEAN_FRACTION,
        "focal_gamma": FOCAL_GAMMA,
        "crop": CROP,
    }


def _model_digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "model.pt").read_bytes()).hexdigest()


def resolve_steps(config: dict[str, Any], n_frames: int) -> int:
    """Training steps for a run: its ``seg_steps`` (default STEPS), at most MAX_EPOCHS passes over
    its frames (tiny runs train in seconds), 2 in a dry run; 0 means the run has no seg head."""
    steps = int(config.get("seg_steps", STEPS))
    if steps <= 0:
        return 0
    if config.get("dry_run"):
        steps = min(steps, 2)
    return max(1, min(steps, math.ceil(MAX_EPOCHS * n_frames / BATCH)))


def _device(config: dict[str, Any]) -> torch.device:
    """Where the seg net trains: the run's CUDA device when it trained on one and it is here, else CPU."""
    resolved = str(config.get("resolved_device", "cpu"))
    return torch.device(resolved if resolved.startswith("cuda") and torch.cuda.is_available() else "cpu")


def _cache(run_dir: Path, width: int) -> Path:
    return run_dir / "banks" / (SEG_FILE if width == WIDTH else f"seg-w{width}.pt")


def _requested_steps(run_dir: Path, kind: str) -> int:
    """The run's ``seg_steps``; :class:`HeadUnavailable` for a run trained with ``--seg-steps 0``."""
    steps = int(load_config(run_dir).get("seg_steps", STEPS))
    if steps <= 0:
        raise HeadUnavailable(f"{run_dir}: trained with --seg-steps 0, so it has no {kind}-seg head")
    return steps


def load_seg_graph(run_dir: str | Path, kind: str, width: int = WIDTH) -> SegGraph:
    """The ``<kind>-seg`` graph from the cached net; :class:`HeadNotFitted` if it is missing or stale."""
    run_dir = Path(run_dir)
    requested = _requested_steps(run_dir, kind)
    path = _cache(run_dir, width)
    if not path.is_file():
        raise HeadNotFitted(f"{path}: no segmentation net trained for {kind}-seg")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    trained = json.loads(saved["settings"])
    wanted = settings(int(trained["steps"]), width)
    same_request = int(saved.get("requested_steps", trained["steps"])) == requested
    if trained != wanted or not same_request or saved["model_sha256"] != _model_digest(run_dir):
        raise HeadNotFitted(f"{path}: stale (other settings or model), the net must be retrained")
    net = SegNet(width)
    net.load_state_dict(saved["state_dict"])
    size = run_size(load_config(run_dir))
    return SegGraph(load_reconstructor(run_dir, kind), net.eval(), size, wanted["smooth"]).eval()


def fit_seg_net(run_dir: str | Path, kind: str, width: int = WIDTH) -> None:
    """Train the ``<kind>-seg`` net on the run's training normals and cache it (no-op when fresh)."""
    run_dir = Path(run_dir)
    try:
        load_seg_graph(run_dir, kind, width)
        return
    except HeadNotFitted as exc:
        log.info("%s", exc)
    config = load_config(run_dir)
    requested = _requested_steps(run_dir, kind)
    reconstructor = load_reconstructor(run_dir, kind)
    frames = run_normals(run_dir, "train", limit=MAX_TRAIN_FRAMES)
    steps = resolve_steps(config, len(frames))
    wanted = settings(steps, width)
    seed = int(config.get("seed", 0))
    start = time.perf_counter()
    log.info("%s-seg: training the segmentation net, %d steps on %d normal frames", kind, steps, len(frames))
    net, losses = train_seg_net(
        reconstructor, frames, steps=steps, width=width, seed=seed, device=_device(config)
    )
    log.info(
        "%s-seg: trained in %.0f s, focal loss %.4f -> %.4f (first / last 50 steps)",
        kind,
        time.perf_counter() - start,
        float(np.mean(losses[:50])),
        float(np.mean(losses[-50:])),
    )
    path = _cache(run_dir, width)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = {
        "settings": json.dumps(wanted),
        "model_sha256": _model_digest(run_dir),
        "requested_steps": requested,
        "state_dict": net.state_dict(),
        "losses": torch.tensor(losses),
    }
    torch.save(payload, tmp)
    tmp.replace(path)


def _has_seg(config: dict[str, Any]) -> bool:
    return int(config.get("seg_steps", 1)) > 0


def _seg_head(kind: str) -> HeadSpec:
    return HeadSpec(
        name=f"{kind}-seg",
        kind=kind,
        units="logit",
        definition="max over the frame of a smoothed per-pixel defect logit from a small U-Net that "
        f"sees the frame and its {'VAE' if kind == 'vae' else 'G(E(x))'} reconstruction, trained on "
        "Perlin-noise defects filled with normal texture (DRAEM-style), with the pixel's position as input",
        has_map=True,
        build=lambda run_dir: load_seg_graph(run_dir, kind),
        fit=lambda run_dir: fit_seg_net(run_dir, kind),
        available=_has_seg,
    )


SEG_HEADS = [_seg_head("vae"), _seg_head("gan")]
