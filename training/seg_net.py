"""The segmentation net of the ``<kind>-seg`` head and how it is trained (DRAEM, Zavrtanik et al. 2021).

A small U-Net (Ronneberger et al. 2015) sees a frame and its reconstruction by the run's frozen
generative network and predicts, per pixel, whether the frame was corrupted there. Training
corruptions (:func:`blob_corruptions`): blob-shaped masks (one to three ellipses, 2 px to a third of
the frame) filled with texture cut from another normal frame, uniform noise or one colour, blended
with an opacity of 0.5-1 (DRAEM's beta); half of each batch stays clean. Loss: focal loss on the
per-pixel mask (Lin et al. 2017, as in DRAEM). Frames larger than ``CROP`` train on random windows
(:func:`random_windows`), so a step costs the same at every size. The score graph and the cache are
in training/heads/seg.py.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.pixels import to_unit_range

STEPS = 2400
BATCH = 32
LEARNING_RATE = 1e-3
WIDTH = 16
CLEAN_FRACTION = 0.5
CROP = 64  # training windows: larger frames train on random 64 px windows, same cost per step
FOCAL_GAMMA = 2.0


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


def train_seg_net(
    reconstructor: nn.Module,
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
            inputs = torch.cat([x, reconstructor(x)], dim=1)
        inputs, target = random_windows(inputs, torch.from_numpy(masks)[:, None], rng, CROP)
        loss = focal_loss(net(inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return net.eval(), losses
