"""The segmentation net of the ``<kind>-seg`` head and how it is trained (DRAEM, Zavrtanik et al. 2021).

A small U-Net (Ronneberger et al. 2015) sees a frame, its reconstruction by the run's frozen
generative network and two coordinate planes (CoordConv, Liu et al. 2018: each pixel's row and
column in the *full* frame, scaled to [-1, 1]), and predicts, per pixel, whether the frame was
corrupted there. It trains on random ``CROP`` px windows of the full frame (:func:`random_windows`)
whose coordinate planes are cut from the full frame's, so a window knows where it sits (sky above,
road below) and a training step costs the same at 64x64 and 256x144; scoring runs the fully
convolutional net on the whole frame with its full coordinate planes.

Training corruptions (:func:`pseudo_anomalies`), DRAEM's recipe: a mask from thresholded 2-D Perlin
noise (:func:`perlin_mask`; random scales per axis, so blobs range from a few pixels to most of the
window) placed inside the training window, filled with texture from another normal frame or from
another place of the same frame (sometimes noise or one colour), blended with an opacity of 0.5-1
(DRAEM's beta); half of the windows stay clean. A 256x144 frame gives four windows per step (one
reconstruction), a 64x64 frame one. Never drawings of the edge-case families. Loss:
focal loss on the per-pixel mask (Lin et al. 2017, as in DRAEM). The score graph and the cache are
in training/heads/seg.py.
"""

from __future__ import annotations

import math

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
CROP = 64  # training windows: larger frames train on random 64 px windows, same net cost per step
FOCAL_GAMMA = 2.0
IN_CHANNELS = 8  # frame (3), reconstruction (3), row and column planes (2)


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SegNet(nn.Module):
    """A small U-Net (Ronneberger et al. 2015): 8 channels (frame, reconstruction, row and column in
    the full frame) -> 1 logit/pixel.

    One convolution at full resolution on each side, the rest at 1/2 and 1/4: the full-resolution
    skip connection keeps 2-pixel detail, the coarse stages see the context a defect is judged in.
    """

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        w = width
        self.enc1 = _block(IN_CHANNELS, w)
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


def coord_planes(height: int, width: int) -> torch.Tensor:
    """[1, 2, H, W]: each pixel's row and column centre in the frame, scaled to [-1, 1] (CoordConv)."""
    rows = (torch.arange(height, dtype=torch.float32) + 0.5) * (2.0 / height) - 1.0
    cols = (torch.arange(width, dtype=torch.float32) + 0.5) * (2.0 / width) - 1.0
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"))[None]


def with_coords(inputs: torch.Tensor) -> torch.Tensor:
    """inputs [N, C, H, W] of whole frames -> [N, C + 2, H, W] with the frame's coordinate planes."""
    n, _, h, w = inputs.shape
    return torch.cat([inputs, coord_planes(h, w).to(inputs).expand(n, -1, -1, -1)], dim=1)


def _fade(t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return t * t * t * (t * (t * 6 - 15) + 10)  # Perlin's improved fade: C2-continuous at cell edges


def perlin_noise(
    rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]
) -> npt.NDArray[np.float64]:
    """2-D gradient noise (Perlin 2002) of ``shape`` with ``cells`` lattice cells per axis, ~[-0.7, 0.7]."""
    h, w = shape
    cy, cx = cells
    angles = rng.uniform(0, 2 * np.pi, (cy + 1, cx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    y = (np.arange(h) + 0.5) * cy / h  # lattice coordinates of the pixel centres
    x = (np.arange(w) + 0.5) * cx / w
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    ty, tx = (y - iy)[:, None], (x - ix)[None, :]
    iy, ix = iy[:, None], ix[None, :]

    def corner(dy: int, dx: int) -> npt.NDArray[np.float64]:
        return gy[iy + dy, ix + dx] * (ty - dy) + gx[iy + dy, ix + dx] * (tx - dx)

    fy, fx = _fade(ty), _fade(tx)
    top = corner(0, 0) * (1 - fx) + corner(0, 1) * fx
    bottom = corner(1, 0) * (1 - fx) + corner(1, 1) * fx
    return np.asarray(top * (1 - fy) + bottom * fy)


MAX_CELLS_LOG2 = 5  # up to 32 lattice cells across a 64 px window: blobs of a few pixels


def perlin_mask(rng: np.random.Generator, h: int, w: int) -> npt.NDArray[np.bool_]:
    """DRAEM's mask: Perlin noise thresholded, 2**k cells per axis (k in 0..5 drawn per axis, so blobs
    are round or streaks, from a few pixels to most of the window); never empty."""
    cells = (2 ** int(rng.integers(0, MAX_CELLS_LOG2 + 1)), 2 ** int(rng.integers(0, MAX_CELLS_LOG2 + 1)))
    noise = perlin_noise(rng, (h, w), cells)
    mask = noise > rng.uniform(0.25, 0.6)
    if not mask.any():  # the noise stayed below the threshold: its peak, a defect of a few pixels
        mask = noise >= noise.max() - 0.02
    return mask


Window = tuple[int, int, int, int]  # (top, left, height, width) in the full frame


def pseudo_anomalies(
    frames: npt.NDArray[np.uint8],
    donors: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    windows: list[list[Window]] | None = None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """The training signal: (frames with Perlin-mask defects, masks [N, H, W]); some stay clean.

    ``windows[i]`` lists the training windows of frame ``i`` (default: the whole frame); each window
    independently stays clean (``CLEAN_FRACTION``) or gets one defect inside it. Fills: texture of
    another normal frame (``donors``) or of another place of the same frame (both shifted by a random
    offset), else uniform noise or one colour; blended with opacity beta in [0.5, 1].
    """
    n, h, w, _ = frames.shape
    out = frames.copy()
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        for top, left, wh, ww in windows[i] if windows is not None else [(0, 0, h, w)]:
            if rng.random() < CLEAN_FRACTION:
                continue
            mask = np.zeros((h, w), dtype=bool)
            mask[top : top + wh, left : left + ww] = perlin_mask(rng, wh, ww)
            kind = rng.random()
            if kind < 0.8:  # texture: another normal frame, or elsewhere in this one (DRAEM, CutPaste)
                source = donors[rng.integers(len(donors))] if kind < 0.45 else frames[i]
                shift = (int(rng.integers(1, h)) if h > 1 else 0, int(rng.integers(1, w)) if w > 1 else 0)
                fill = np.roll(source, shift, axis=(0, 1)).astype(np.float32)[mask]
            elif kind < 0.9:
                fill = rng.integers(0, 256, (int(mask.sum()), 3)).astype(np.float32)
            else:
                fill = np.broadcast_to(rng.integers(0, 256, 3).astype(np.float32), (int(mask.sum()), 3))
            beta = rng.uniform(0.5, 1.0)
            blended = beta * fill + (1 - beta) * out[i][mask].astype(np.float32)
            out[i][mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
            masks[i] |= mask
        masks[i] &= np.any(out[i] != frames[i], axis=-1)  # a blend that changed nothing is no defect
    return out, masks.astype(np.float32)


MAX_WINDOWS_PER_FRAME = 4


def windows_per_frame(h: int, w: int, crop: int = CROP) -> int:
    """Training windows cut from each frame of a step: 1 at 64x64, 4 at 256x144.

    The generative network reconstructs whole frames, the step's costly part at 256x144; several
    windows (each with its own defect or none) share one reconstruction, so a step of ``BATCH``
    windows costs about the same at every size.
    """
    return max(1, min(MAX_WINDOWS_PER_FRAME, (h * w) // (crop * crop)))


def window_positions(
    h: int, w: int, n: int, rng: np.random.Generator, crop: int, per_frame: int = 1
) -> list[list[Window]]:
    """``per_frame`` random ``crop`` px windows for each of ``n`` frames (small frames: the whole)."""
    ch, cw = min(crop, h), min(crop, w)
    tops = rng.integers(0, h - ch + 1, (n, per_frame))
    lefts = rng.integers(0, w - cw + 1, (n, per_frame))
    return [
        [(int(t), int(c), ch, cw) for t, c in zip(ts, cs, strict=True)]
        for ts, cs in zip(tops, lefts, strict=True)
    ]


def random_windows(
    inputs: torch.Tensor,
    target: torch.Tensor,
    rng: np.random.Generator,
    crop: int,
    windows: list[list[Window]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of inputs [N, C, H, W] and target [N, 1, H, W]: [sum of windows, C, crop, crop].

    The windows are ``windows`` (per frame) when given, else one random window per frame. The U-Net
    is fully convolutional, so it scores whole frames after training on windows; give it
    :func:`with_coords` inputs and each window carries its place in the frame. Frames no larger than
    ``crop`` pass whole.
    """
    h, w = inputs.shape[-2:]
    if h <= crop and w <= crop:
        return inputs, target
    if windows is None:
        windows = window_positions(h, w, len(inputs), rng, crop)
    pairs = [
        (inputs[i, :, t : t + ch, c : c + cw], target[i, :, t : t + ch, c : c + cw])
        for i, frame_windows in enumerate(windows)
        for t, c, ch, cw in frame_windows
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
    device: torch.device | None = None,
) -> tuple[SegNet, list[float]]:
    """Train the segmentation net on Perlin pseudo-anomalies of ``frames``; (net in eval mode, losses).

    Per step: window positions first (:func:`windows_per_frame` of them per frame), then defects
    inside them, then the reconstruction of the whole corrupted frames (the generative network sees
    whole frames), then the net on the ``BATCH`` windows. ``device`` (default CPU) runs the
    reconstruction and the net there (a CUDA run's GPU); the returned net is on the CPU.
    """
    if len(frames) < 2:
        raise ValueError(f"the seg head needs at least 2 normal frames to train on, got {len(frames)}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = device or torch.device("cpu")
    net = SegNet(width).to(device)
    reconstructor = reconstructor.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    losses: list[float] = []
    _, h, w, _ = frames.shape
    per_frame = windows_per_frame(h, w)
    net.train()
    bar = tqdm(range(steps), desc="seg head", unit="step", leave=False)
    for _ in bar:
        n_frames = min(math.ceil(BATCH / per_frame), len(frames))
        pick = rng.choice(len(frames), size=n_frames, replace=False)
        windows = window_positions(h, w, len(pick), rng, CROP, per_frame)
        corrupted, masks = pseudo_anomalies(frames[pick], frames, rng, windows)
        x = to_unit_range(torch.from_numpy(corrupted).to(device))
        with torch.no_grad():
            inputs = with_coords(torch.cat([x, reconstructor(x)], dim=1))
        target = torch.from_numpy(masks)[:, None].to(device)
        inputs, target = random_windows(inputs, target, rng, CROP, windows)
        loss = focal_loss(net(inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    reconstructor.to("cpu")
    return net.cpu().eval(), losses
