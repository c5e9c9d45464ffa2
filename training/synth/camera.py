"""What the camera does to the light: roll, softness, exposure and white balance, sensor noise.

These run on every frame (normal and edge case alike) after the world is painted, so a model
cannot tell a family by the *absence* of camera effects.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from training.synth.canvas import Canvas, col

F32 = npt.NDArray[np.float32]


def apply_roll(cv: Canvas, roll: F32) -> None:
    """Rotate each frame by its small roll angle about the centre (nearest sample, edges clamped)."""
    s = cv.size
    c = (np.arange(s, dtype=np.float32) + np.float32(0.5)) - np.float32(s / 2)
    cos, sin = col(np.cos(roll)), col(np.sin(roll))
    xs, ys = c.reshape(1, 1, s), c.reshape(1, s, 1)
    src_x = np.clip(np.rint(cos * xs - sin * ys + np.float32(s / 2 - 0.5)), 0, s - 1).astype(np.intp)
    src_y = np.clip(np.rint(sin * xs + cos * ys + np.float32(s / 2 - 0.5)), 0, s - 1).astype(np.intp)
    index = (src_y * s + src_x).reshape(cv.n, s * s)
    flat = cv.img.reshape(cv.n, 3, s * s)
    out = np.empty_like(flat)
    for i in range(cv.n):
        np.take(flat[i], index[i], axis=1, out=out[i])
    cv.img = out.reshape(cv.n, 3, s, s)


def soften(cv: Canvas, amount: F32) -> None:
    """Optical softness: a separable ``[w, 1 - 2w, w]`` blur per frame, ``w = amount / 3``.

    ``amount`` 1 is a 3x3 box blur; edge pixels keep their own weight (edge replication).
    """
    w = (amount / np.float32(3.0)).reshape(-1, 1, 1, 1).astype(np.float32)
    for axis in (2, 3):
        img = cv.img
        out = img * (np.float32(1.0) - np.float32(2.0) * w)
        lo = [slice(None)] * 4
        hi = [slice(None)] * 4
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        out[tuple(hi)] += w * img[tuple(lo)]
        out[tuple(lo)] += w * img[tuple(hi)]
        first = [slice(None)] * 4
        last = [slice(None)] * 4
        first[axis], last[axis] = slice(0, 1), slice(-1, None)
        out[tuple(first)] += w * img[tuple(first)]
        out[tuple(last)] += w * img[tuple(last)]
        cv.img = out


def expose(cv: Canvas, exposure: F32, tint: F32) -> None:
    """Auto-exposure and white balance differ a little from frame to frame."""
    cv.img *= (exposure[:, None] * tint).reshape(cv.n, 3, 1, 1)


def add_noise(cv: Canvas, uniforms: F32, sigma: F32) -> None:
    """Sensor noise with standard deviation ``sigma`` from the frame's own uniforms (zero mean)."""
    noise = uniforms - np.float32(0.5)
    noise *= (sigma * np.float32(np.sqrt(12.0))).reshape(-1, 1, 1, 1)
    cv.img += noise


def to_uint8(img: F32) -> npt.NDArray[np.uint8]:
    """Planar float frames in [0, 1] to NHWC uint8 (rounded, clipped)."""
    out = np.clip(img * np.float32(255.0) + np.float32(0.5), 0.0, 255.0).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))
