"""The discriminative head ``<kind>-seg``: a small network that learns *where* a frame was corrupted.

Likelihoods and feature distances ask "how unlike normal is this frame?"; a 3-pixel animal barely
moves either. DRAEM (Zavrtanik et al. 2021, "DRAEM - A discriminatively trained reconstruction
embedding for surface anomaly detection") instead trains a segmentation network on normal frames with
*synthetic* defects pasted in, given the frame and the generative model's reconstruction of it: it
learns what "locally inconsistent with the rest of the frame and with what the model expected here"
looks like, a skill that transfers to defects it never saw. Issue 3's rules allow exactly this
training signal (generic corruptions of normal frames; no edge-case family).

- Reconstruction: the run's own network, frozen: the VAE decoded at the posterior mean, or the GAN's
  f-AnoGAN path G(E(x)). Both drop what normal training frames do not contain (the lecture's latent
  variable model: a frame explained by a few latent causes), so the pair (x, recon) shows a pasted
  object as a difference the network can localise.
- Training corruptions (:func:`blob_corruptions`): blob-shaped masks (one to three ellipses, 2 px to
  a third of the frame) filled with texture cut from another normal frame, uniform noise or one
  colour, blended with an opacity of 0.5-1 (DRAEM's beta); half of each batch stays clean. Loss:
  focal loss on the per-pixel mask (Lin et al. 2017, as in DRAEM).
- Score graph: frames -> [-1, 1] -> (x, recon) -> U-Net logits -> ``SMOOTH`` x ``SMOOTH`` mean filter
  (DRAEM's reduction: one confident pixel is noise, a coherent blob is a defect) -> anomaly map; score
  = max of the map, in logits.
- Held out: the combo protocol's rectangular CutPaste / noise / colour patches and the
  photometric corruptions of :func:`training.combo_heads.heldout_anomalies` are *not* what this net
  trains on (rectangles vs blobs; blends vs local light changes, scars and global changes), so the
  protocol still measures transfer, not memorisation; its AUROCs are in the run's cache file.

Training length was chosen by the validation protocol (training/combo_heads.py, no edge-case
family): on the 64x64 benchmark VAE run, 800 steps scored AUROC 0.876 on the CutPaste / noise
patches and 0.820 on the held-out corruptions, 2,400 steps 0.917 and 0.882 (focal loss 0.0054 ->
0.0032). Frames larger than ``CROP`` train on random 64 px windows (:func:`random_windows`), so a
step costs the same at every size: about 0.5 s on 2 CPU cores, 2,400 steps in about 20 minutes.

The network is trained the first time the head is built (for a new run: when ``edgecase train``
calibrates its heads) and cached in ``RUN_DIR/banks/seg.pt`` with its settings; the run's
``seg_steps`` (``--seg-steps``, 0 = no seg head) and seed make it deterministic on CPU.
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
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)

SEG_FILE = "seg.pt"
SEG_FORMAT_VERSION = 1
STEPS = 2400
BATCH = 32
LEARNING_RATE = 1e-3
WIDTH = 16
SMOOTH = 3
MAX_TRAIN_FRAMES = 4000
CLEAN_FRACTION = 0.5
CROP = 64  # training windows: larger frames train on random 64 px windows, same cost per step
MAX_EPOCHS = 25  # passes over the frames at most: a 16-frame test run trains in seconds
FOCAL_GAMMA = 2.0


def to_unit_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the scaling every score graph does inside)."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


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
        from training.vae_heads import load_vae

        return Reconstructor(load_vae(run_dir)[0], "vae")
    from training.gan_heads import load_gan

    return Reconstructor(load_gan(run_dir)[0], "gan")


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SegNet(nn.Module):
    """A small U-Net (Ronneberger et al. 2015): 6 channels (frame, reconstruction) -> 1 logit/pixel.

    One convolution at full resolution on each side, the rest at 1/2 and 1/4: the full-resolution
    skip connection keeps 2-pixel detail, the coarse stages see the context a defect is judged in.
    """

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        w = width
        self.enc1 = _block(6, w)
        self.enc2 = nn.Sequential(_block(w, 2 * w, stride=2), _block(2 * w, 2 * w))
        self.enc3 = nn.Sequential(_block(2 * w, 2 * w, stride=2), _block(2 * w, 2 * w))
        self.dec2 = _block(4 * w, 2 * w)
        self.dec1 = _block(3 * w, w)
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="nearest"), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], dim=1))
        return self.out(d1)


class SegGraph(nn.Module):
    """Score graph of ``<kind>-seg``: (max of the smoothed logit map [N], the map [N, H, W])."""

    def __init__(self, reconstructor: Reconstructor, net: SegNet, smooth: int = SMOOTH) -> None:
        super().__init__()
        if smooth < 1 or smooth % 2 == 0:
            raise ValueError(f"smooth must be an odd number >= 1, got {smooth}")
        self.reconstructor = reconstructor
        self.net = net.eval()
        self.smooth = smooth

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits [N, 1, H, W] of x in [-1, 1] (training and scoring share this)."""
        with torch.no_grad():
            recon = self.reconstructor(x)
        return self.net(torch.cat([x, recon], dim=1))

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(to_unit_range(frames))
        if self.smooth > 1:
            pad = self.smooth // 2
            logits = F.avg_pool2d(logits, self.smooth, stride=1, padding=pad, count_include_pad=False)
        amap = logits[:, 0]
        return amap.flatten(1).max(dim=1).values, amap


def blob_mask(rng: np.random.Generator, h: int, w: int) -> npt.NDArray[np.bool_]:
    """One to three overlapping ellipses, overall extent log-uniform from 2 px to a third of the frame."""
    extent = float(np.exp(rng.uniform(np.log(2.0), np.log(max(3.0, h / 3)))))
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        a = max(0.8, extent / 2 * rng.uniform(0.5, 1.0))
        b = max(0.8, a * float(np.exp(rng.uniform(-0.9, 0.9))))
        theta = rng.uniform(0, np.pi)
        oy, ox = cy + rng.normal(0, extent / 4), cx + rng.normal(0, extent / 4)
        dy, dx = yy - oy, xx - ox
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        mask |= (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if not mask.any():  # a tiny ellipse between pixel centres: take the pixel it is in
        mask[min(h - 1, int(cy)), min(w - 1, int(cx))] = True
    return mask


def blob_corruptions(
    frames: npt.NDArray[np.uint8], donors: npt.NDArray[np.uint8], rng: np.random.Generator
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """The training signal: (frames with blob defects, masks [N, H, W]); some frames stay clean."""
    n, h, w, _ = frames.shape
    out = frames.copy()
    masks = np.zeros((n, h, w), dtype=np.float32)
    for i in range(n):
        if rng.random() < CLEAN_FRACTION:
            continue
        mask = blob_mask(rng, h, w)
        kind = rng.random()
        if kind < 0.5:  # texture from another normal frame, shifted: CutPaste with a blob shape
            donor = donors[rng.integers(len(donors))]
            shift = (int(rng.integers(h)), int(rng.integers(w)))
            fill = np.roll(donor, shift, axis=(0, 1)).astype(np.float32)
        elif kind < 0.75:
            fill = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
        else:
            fill = np.broadcast_to(rng.integers(0, 256, 3).astype(np.float32), (h, w, 3))
        beta = rng.uniform(0.5, 1.0)
        blended = beta * fill + (1 - beta) * frames[i].astype(np.float32)
        out[i][mask] = np.clip(np.rint(blended[mask]), 0, 255).astype(np.uint8)
        masks[i] = mask & np.any(out[i] != frames[i], axis=-1)  # a blend that changed nothing is no defect
    return out, masks


def random_windows(
    inputs: torch.Tensor, target: torch.Tensor, rng: np.random.Generator, crop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random ``crop`` x ``crop`` window per frame of inputs [N, C, H, W] and target [N, 1, H, W].

    The U-Net is fully convolutional, so it scores whole frames after training on windows; at
    128 px this keeps a training step as cheap as at 64 px. Frames no larger than ``crop`` pass whole.
    """
    h, w = inputs.shape[-2:]
    if h <= crop and w <= crop:
        return inputs, target
    ch, cw = min(crop, h), min(crop, w)
    tops = rng.integers(0, h - ch + 1, len(inputs))
    lefts = rng.integers(0, w - cw + 1, len(inputs))
    pairs = [
        (inputs[i, :, t : t + ch, c : c + cw], target[i, :, t : t + ch, c : c + cw])
        for i, (t, c) in enumerate(zip(tops, lefts, strict=True))
    ]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Mean focal loss (Lin et al. 2017): defects are a few pixels, so easy background is down-weighted."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)
    return ((1 - p_t) ** gamma * bce).mean()


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


def train_seg_net(
    reconstructor: Reconstructor,
    frames: npt.NDArray[np.uint8],
    steps: int = STEPS,
    width: int = WIDTH,
    seed: int = 0,
) -> tuple[SegNet, list[float]]:
    """Train the segmentation net on blob corruptions of ``frames``; (net in eval mode, loss per step)."""
    if len(frames) < 2:
        raise ValueError(f"the seg head needs at least 2 normal frames to train on, got {len(frames)}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SegNet(width)
    graph = SegGraph(reconstructor, net)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    losses: list[float] = []
    net.train()
    bar = tqdm(range(steps), desc="seg head", unit="step", leave=False)
    for _ in bar:
        pick = rng.choice(len(frames), size=min(BATCH, len(frames)), replace=False)
        corrupted, masks = blob_corruptions(frames[pick], frames, rng)
        x = to_unit_range(torch.from_numpy(corrupted))
        with torch.no_grad():
            inputs = torch.cat([x, graph.reconstructor(x)], dim=1)
        inputs, target = random_windows(inputs, torch.from_numpy(masks)[:, None], rng, CROP)
        loss = focal_loss(net(inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return net.eval(), losses


def resolve_steps(config: dict[str, Any], n_frames: int) -> int:
    """Training steps for a run: its ``seg_steps`` (default STEPS), at most MAX_EPOCHS passes over
    its frames (tiny runs train in seconds), 2 in a dry run; 0 means the run has no seg head."""
    steps = int(config.get("seg_steps", STEPS))
    if steps <= 0:
        return 0
    if config.get("dry_run"):
        steps = min(steps, 2)
    return max(1, min(steps, math.ceil(MAX_EPOCHS * n_frames / BATCH)))


def build_seg_graph(run_dir: str | Path, kind: str, width: int = WIDTH) -> SegGraph:
    """The ``<kind>-seg`` graph; the net is trained on first use and cached in ``banks/seg.pt``.

    Raises :class:`training.graphs.HeadUnavailable` for a run trained with ``--seg-steps 0``.
    """
    from training.graphs import HeadUnavailable
    from training.runs import load_config, run_normals

    run_dir = Path(run_dir)
    config = load_config(run_dir)
    if int(config.get("seg_steps", STEPS)) <= 0:
        raise HeadUnavailable(f"{run_dir}: trained with --seg-steps 0, so it has no {kind}-seg head")
    reconstructor = load_reconstructor(run_dir, kind)
    path = run_dir / "banks" / (SEG_FILE if width == WIDTH else f"seg-w{width}.pt")
    digest = _model_digest(run_dir)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        trained = json.loads(saved["settings"])
        wanted = settings(int(trained["steps"]), width)
        requested = int(saved.get("requested_steps", trained["steps"]))
        same_request = requested == int(config.get("seg_steps", STEPS))
        if trained == wanted and same_request and saved["model_sha256"] == digest:
            net = SegNet(width)
            net.load_state_dict(saved["state_dict"])
            return SegGraph(reconstructor, net.eval(), wanted["smooth"]).eval()
        log.info("%s: stale (other settings or model), retraining", path)
    frames = run_normals(run_dir, "train", limit=MAX_TRAIN_FRAMES)
    steps = resolve_steps(config, len(frames))
    wanted = settings(steps, width)
    seed = int(config.get("seed", 0))
    start = time.perf_counter()
    log.info("%s-seg: training the segmentation net, %d steps on %d normal frames", kind, steps, len(frames))
    net, losses = train_seg_net(reconstructor, frames, steps=steps, width=width, seed=seed)
    log.info(
        "%s-seg: trained in %.0f s, focal loss %.4f -> %.4f (first / last 50 steps)",
        kind,
        time.perf_counter() - start,
        float(np.mean(losses[:50])),
        float(np.mean(losses[-50:])),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = {
        "settings": json.dumps(wanted),
        "model_sha256": digest,
        "requested_steps": int(config.get("seg_steps", STEPS)),
        "state_dict": net.state_dict(),
        "losses": torch.tensor(losses),
    }
    torch.save(payload, tmp)
    tmp.replace(path)
    return SegGraph(reconstructor, net, wanted["smooth"]).eval()
