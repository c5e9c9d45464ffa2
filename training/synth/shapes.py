"""Antialiased masks of upright objects standing on the ground, in object-local units.

An object stands at ground point ``(x, y)`` (screen) with ``sc`` screen units per lane width, so
its parts are described once in lane widths (x to the right, y *up* from the ground) and come out
the right size at any distance. Boxes are separable: a ``(N, 1, W)`` column coverage times a
``(N, H, 1)`` row coverage, one full-frame multiply per part.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from training.synth.canvas import Canvas, col, cover

F32 = npt.NDArray[np.float32]
Num = F32 | float


def box(cv: Canvas, x: F32, y: F32, sc: F32, x0: Num, x1: Num, y0: Num, y1: Num) -> F32:
    """Coverage ``(N, H, W)`` of the box ``[x0, x1] x [y0, y1]`` (lane widths, y up) of each object."""
    ax = cover(cv.xs, col(x + x0 * sc), col(x + x1 * sc), cv.px)
    ay = cover(cv.ys, col(y - y1 * sc), col(y - y0 * sc), cv.px)
    return ax * ay


def ellipse(cv: Canvas, x: F32, y: F32, sc: F32, cx: Num, cy: Num, rx: Num, ry: Num) -> F32:
    """Coverage of an ellipse centred at ``(cx, cy)`` with radii ``(rx, ry)`` (lane widths, y up)."""
    rx_s = col(np.maximum(rx * sc, 1e-6).astype(np.float32))
    ry_s = col(np.maximum(ry * sc, 1e-6).astype(np.float32))
    dx = (cv.xs - col(x + cx * sc)) / rx_s
    dy = (cv.ys - col(y - cy * sc)) / ry_s
    d = np.sqrt(dx * dx + dy * dy)
    r_min = np.minimum(rx_s, ry_s)
    alpha = np.clip((np.float32(1.0) - d) * (r_min / np.float32(cv.px)) + np.float32(0.5), 0.0, 1.0)
    # A shape smaller than a pixel covers at most its area, not half the pixel.
    alpha *= np.minimum(np.float32(1.0), np.float32(2.0) * r_min / np.float32(cv.px))
    return alpha


def triangle(cv: Canvas, x: F32, y: F32, sc: F32, half_base: Num, height: Num) -> F32:
    """Coverage of an upright isosceles triangle (a traffic cone's outline) standing at the ground point."""
    hb = col(np.asarray(half_base * sc, np.float32))
    ht = col(np.asarray(height * sc, np.float32))
    rise = np.clip((col(y) - cv.ys) / ht, 0.0, 1.0)  # 0 at the base, 1 at the tip
    half = hb * (np.float32(1.0) - rise)
    rows = cover(cv.ys, col(y) - ht, col(y), cv.px)
    return cover(cv.xs - col(x), -half, half, cv.px) * rows
