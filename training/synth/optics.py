"""Families that happen in the lens and the sensor: glare, lens dirt, sensor faults.

They act on the image after the camera's roll, so their geometry is fixed to the frame, not the
world: a flare ghost lies on the line through the sun and the image centre, dirt stays put on the
glass, a dead row is a row of the sensor.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from training.synth.canvas import col
from training.synth.context import RenderContext

F32 = npt.NDArray[np.float32]
N_BLOBS = 7
SUNLIGHT = np.array([1.0, 0.93, 0.78], np.float32)
GHOSTS = np.array([[0.35, 0.9, 0.5], [0.8, 0.4, 0.9], [1.0, 0.7, 0.3]], np.float32)


def glare_scene(ctx: RenderContext) -> None:
    """A low sun just above the horizon, near where the road goes."""
    r, scene = ctx.draws.family, ctx.scene
    scene.sun_y = (scene.horizon - r.uniform(0.015, 0.1)).astype(np.float32)
    scene.sun_x = (scene.vanish_x + r.uniform(-0.35, 0.35)).astype(np.float32)
    scene.sun_power = np.ones(scene.n, np.float32)
    scene.sun_radius = r.uniform(0.035, 0.055)


def glare_lens(ctx: RenderContext) -> None:
    """Bloom around the sun, a veil over the whole frame, a horizontal streak and flare ghosts."""
    cv, s, scene = ctx.cv, ctx.strength, ctx.scene
    assert cv is not None
    dx, dy = cv.xs - col(scene.sun_x), cv.ys - col(scene.sun_y)
    reach = col(np.float32(0.1) + np.float32(0.12) * s)
    light = np.float32(1.0) / (np.float32(1.0) + (dx * dx + dy * dy) / (reach * reach))
    light *= np.float32(0.95)
    light += (
        np.float32(0.5)
        / (np.float32(1.0) + (dy / np.float32(0.012)) ** 2)
        / (np.float32(1.0) + (dx / 0.3) ** 2)
    )
    light += np.float32(0.12) + np.float32(0.18) * col(s)  # veiling glare: contrast washes out
    light *= col(s)
    cv.screen(light, np.broadcast_to(SUNLIGHT, (scene.n, 3)))
    # Ghost reflections of the aperture along the line from the sun through the image centre.
    for k, along in enumerate((0.55, 1.25, 1.7)):
        gx = scene.sun_x + (np.float32(0.5) - scene.sun_x) * np.float32(along)
        gy = scene.sun_y + (np.float32(0.5) - scene.sun_y) * np.float32(along)
        rad = np.float32(0.03 + 0.025 * k)
        ex, ey = cv.xs - col(gx), cv.ys - col(gy)
        disc = np.clip((rad * rad - (ex * ex + ey * ey)) / (np.float32(2.0) * rad * rad) * 4, 0.0, 1.0)
        cv.screen(disc * col(np.float32(0.22) * s), np.broadcast_to(GHOSTS[k], (scene.n, 3)))


def lens_dirt_lens(ctx: RenderContext) -> None:
    """Blurry dark and brown blotches of mud and grime stuck on the lens."""
    cv, s, r = ctx.cv, ctx.strength, ctx.draws.family
    assert cv is not None
    count = np.round(np.float32(2.0) + np.float32(5.0) * s).astype(np.int64)
    x, y = r.uniform_k(N_BLOBS, 0.0, 1.0), r.uniform_k(N_BLOBS, 0.05, 1.0)
    left, right = cv.x_range
    if (left, right) != (0.0, 1.0):  # a wide frame: blotches anywhere across its width
        x = (np.float32(left) + x * np.float32(right - left)).astype(np.float32)
    radius = r.uniform_k(N_BLOBS, 0.04, 0.12) * (np.float32(0.7) + np.float32(0.6) * s)[:, None]
    opacity = r.uniform_k(N_BLOBS, 0.55, 0.95) * np.minimum(np.float32(1.0), np.float32(0.35) + s)[:, None]
    lobe_dx, lobe_dy = r.uniform_k(N_BLOBS, -0.8, 0.8), r.uniform_k(N_BLOBS, -0.8, 0.8)
    shade = r.uniform_k(N_BLOBS, 0.0, 1.0)[..., None]
    colour = (
        np.array([0.10, 0.08, 0.06], np.float32) + shade * np.array([0.25, 0.17, 0.08], np.float32)
    ).astype(np.float32)
    for i in range(N_BLOBS):
        on = col((i < count).astype(np.float32))
        rad = col(radius[:, i])
        ex, ey = (cv.xs - col(x[:, i])) / rad, (cv.ys - col(y[:, i])) / rad
        q = ex * ex + ey * ey
        profile = np.float32(1.0) / (np.float32(1.0) + q * q)
        # A second, offset lobe makes the blotch irregular rather than a perfect disc.
        fx, fy = ex - col(lobe_dx[:, i]), ey - col(lobe_dy[:, i])
        q2 = (fx * fx + fy * fy) * np.float32(2.0)
        profile = np.maximum(profile, np.float32(1.0) / (np.float32(1.0) + q2 * q2))
        cv.composite(np.clip(profile * col(opacity[:, i]) * np.float32(1.2), 0.0, 0.97) * on, colour[:, i])


def sensor_fault_sensor(ctx: RenderContext) -> None:
    """One fault per frame: dead or stuck rows/columns, a dropped colour channel, or heavy noise."""
    cv, s, r = ctx.cv, ctx.strength, ctx.draws.family
    assert cv is not None
    mode = r.integers(0, 3)
    field = ctx.draws.field
    size = cv.height

    # 0: dead/stuck lines. Line count grows with strength; rows, columns or both.
    share = (np.float32(1.5) + s * np.float32(size / 8)) / np.float32(size)
    which = r.integers(0, 3)
    dead_rows = (field[:, :, 0] < share[:, None]) & (which != 1)[:, None]
    dead_cols = (field[:, 0, :] < share[:, None]) & (which != 0)[:, None]
    stuck = np.where(r.bernoulli(0.6), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    dead = (dead_rows[:, :, None] | dead_cols[:, None, :]) & (mode == 0)[:, None, None]
    cv.img += dead[:, None].astype(np.float32) * (stuck.reshape(-1, 1, 1, 1) - cv.img)

    # 1: a colour channel drops out (a broken Bayer channel or a loose connector).
    channel = r.integers(0, 3)
    keep = np.ones((cv.n, 3), np.float32)
    keep[np.arange(cv.n), channel] = np.float32(1.0) - s
    keep = np.where((mode == 1)[:, None], keep, np.float32(1.0)).astype(np.float32)
    cv.img *= keep.reshape(-1, 3, 1, 1)

    # 2: heavy noise: strong luminance noise, chroma noise and salt-and-pepper.
    sigma = ((np.float32(0.08) + np.float32(0.22) * s) * (mode == 2)).reshape(-1, 1, 1).astype(np.float32)
    lum = (field - np.float32(0.5)) * sigma * np.float32(np.sqrt(12.0))
    chroma = (
        (ctx.draws.noise[:, ::-1] * np.float32(1 / 256) - np.float32(0.5)) * sigma[:, None] * np.float32(1.5)
    )
    cv.img += lum[:, None] + chroma
    salt = np.float32(0.02) * col(s * (mode == 2))
    cv.img = np.where((field < salt * 0.5)[:, None], np.float32(0.0), cv.img)
    cv.img = np.where((field > np.float32(1.0) - salt * 0.5)[:, None], np.float32(1.0), cv.img).astype(
        np.float32
    )
