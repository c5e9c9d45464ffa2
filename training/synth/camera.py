"""What the camera does to the light: roll, softness, exposure and white balance, sensor noise.

These run on every frame (normal and edge case alike) after the world is painted, so a model
cannot tell a family by the *absence* of camera effects.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from training.synth.canvas import Canvas

F32 = npt.NDArray[np.float32]


def apply_roll(cv: Canvas, roll: F32) -> None:
    """Rotate each frame by its small roll angle about the centre (nearest sample, edges clamped).

    For the few degrees of roll a dashcam has, a rotation is two shears to within a twentieth of
    a pixel: the source column depends only on the row and the source row only on the column, so
    the gather index is one broadcast add instead of a full rotation per pixel.
    """
    h, w, n = cv.height, cv.width, cv.n
    tan = np.tan(roll).astype(np.float32)[:, None]
    # Pixel offsets from the centre along each axis (the pitch is the same on both).
    cx = (np.arange(w, dtype=np.float32) + np.float32(0.5)) - np.float32(w / 2)
    cy = cx if h == w else (np.arange(h, dtype=np.float32) + np.float32(0.5)) - np.float32(h / 2)
    shift_by_col = np.rint(tan * cx).astype(np.intp)  # (N, W)
    shift_by_row = shift_by_col if h == w else np.rint(tan * cy).astype(np.intp)  # (N, H)
    # The row read for (row, col) shifts with the column, the column read with the row.
    src_y = np.clip(np.arange(h)[None, :, None] + shift_by_col[:, None, :], 0, h - 1)
    src_x = np.clip(np.arange(w)[None, None, :] - shift_by_row[:, :, None], 0, w - 1)
    index = (src_y * w + src_x).reshape(n, h * w)
    flat = cv.img.reshape(n, 3, h * w)
    out = np.empty_like(flat)
    for i in range(n):
        np.take(flat[i], index[i], axis=1, out=out[i])
    cv.img = out.reshape(n, 3, h, w)


def soften_and_expose(cv: Canvas, amount: F32, exposure: F32, tint: F32) -> None:
    """Optical softness, auto-exposure and white balance in one pass over the pixels.

    Softness is a 5-tap cross ``img (1 - 4w) + w (up + down + left + right)`` with
    ``w = amount / 5`` per frame (edge pixels reuse themselves); the per-frame, per-channel gain
    multiplies the same pass instead of costing one of its own.
    """
    img, n = cv.img, cv.n
    gain = (exposure[:, None] * tint).reshape(n, 3, 1, 1).astype(np.float32)
    w = (amount / np.float32(5.0)).reshape(n, 1, 1, 1).astype(np.float32)
    side = img * (w * gain)
    out = img * ((np.float32(1.0) - np.float32(4.0) * w) * gain)
    out[:, :, 1:] += side[:, :, :-1]
    out[:, :, :-1] += side[:, :, 1:]
    out[:, :, :, 1:] += side[:, :, :, :-1]
    out[:, :, :, :-1] += side[:, :, :, 1:]
    out[:, :, :1] += side[:, :, :1]
    out[:, :, -1:] += side[:, :, -1:]
    out[:, :, :, :1] += side[:, :, :, :1]
    out[:, :, :, -1:] += side[:, :, :, -1:]
    cv.img = out


def quantise_with_noise(img: F32, noise_bytes: npt.NDArray[np.uint8], sigma: F32) -> npt.NDArray[np.uint8]:
    """Add zero-mean sensor noise (std ``sigma``, from the frame's random bytes) and round to NHWC uint8.

    A byte ``b`` stands for the uniform ``(b + 0.5) / 256``; uniform noise scaled by sqrt(12) has
    the requested standard deviation. The 255 scale and the +0.5 of rounding fold into the same
    two operations.
    """
    k = (sigma * np.float32(255.0 * np.sqrt(12.0))).reshape(-1, 1, 1, 1).astype(np.float32)
    noise = noise_bytes * (k / np.float32(256.0))
    noise += np.float32(0.5) - np.float32(0.5) * k + k / np.float32(512.0)
    noise += img * np.float32(255.0)
    np.clip(noise, 0.0, 255.0, out=noise)
    return np.ascontiguousarray(noise.astype(np.uint8).transpose(0, 2, 3, 1))
