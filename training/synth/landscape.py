"""The static world of a frame: sky and sun, distant hills and tree line, ground, road and markings.

Everything here is computed per row or per column where it can be (``(N, H, 1)`` or ``(N, 1, W)``)
and only combined into full ``(N, H, W)`` masks at the end, which is what keeps a batch of frames
at a fraction of a millisecond each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from training.synth.canvas import SKY_DEPTH, Canvas, col, cover, cover_above
from training.synth.scene import Scene

F32 = npt.NDArray[np.float32]
MAX_GROUND_DEPTH = np.float32(60.0)
YELLOW = np.array([0.88, 0.70, 0.14], np.float32)
SNOW = np.array([0.90, 0.92, 0.95], np.float32)


@dataclass
class RoadMaps:
    """Per-pixel road geometry that later effects reuse (headlight beams, wet reflections).

    The maps cover rows ``top:`` of the frame (the rows that can show ground in this batch).
    """

    top: int

    t_row: F32
    """``(N, H, 1)`` ground depth parameter of each row (clamped positive above the horizon)."""
    below: F32
    """``(N, H, 1)`` coverage of each row by the ground (0 in the sky)."""
    u: F32
    """``(N, H, W)`` lateral road coordinate in lane widths (0 and ``lanes`` are the road edges)."""
    road: F32
    """``(N, H, W)`` coverage by the asphalt."""


def paint_sky_and_ground(scene: Scene, cv: Canvas) -> tuple[F32, F32]:
    """Fill every row with the sky gradient or the grass, and set the depth buffer per row."""
    h = col(scene.horizon)
    w = np.clip(cv.ys / h, 0.0, 1.0) ** 1.6
    sky = scene.sky_top[:, :, None, None] + (scene.sky_horizon - scene.sky_top)[:, :, None, None] * w[:, None]
    t = (cv.ys - h) / (np.float32(1.0) - h)
    t_row = np.maximum(t, np.float32(0.5 * cv.px) / (np.float32(1.0) - h))
    below = cover_above(cv.ys, h, cv.px)
    # Grass is a touch darker close to the camera, where it is seen from above.
    ground = scene.grass[:, :, None, None] * (np.float32(1.05) - np.float32(0.12) * t)[:, None]
    cv.img[:] = sky + (ground - sky) * below[:, None]
    ground_depth = np.minimum(np.float32(1.0) / t_row, MAX_GROUND_DEPTH)
    cv.depth[:] = np.where(below > 0.5, ground_depth, SKY_DEPTH)
    return t_row.astype(np.float32), below.astype(np.float32)


def sky_rows(scene: Scene, cv: Canvas) -> int:
    """Rows at or below this index are below every frame's horizon (no sky there)."""
    return min(cv.height, int(np.ceil(float(scene.horizon.max()) * cv.height)) + 1)


def ground_top(scene: Scene, cv: Canvas) -> int:
    """Rows above this index are above every frame's horizon (no ground there)."""
    return max(0, int(np.floor(float(scene.horizon.min()) * cv.height)) - 1)


def paint_sun(scene: Scene, cv: Canvas, below: F32) -> None:
    """A bright disc with a soft halo, only in the sky (rational falloffs: no exp or sqrt needed)."""
    bottom = sky_rows(scene, cv)
    view = cv.rows(0, bottom)
    dx = view.xs - col(scene.sun_x)
    dy = view.ys - col(scene.sun_y)
    d2 = dx * dx + dy * dy
    r = col(scene.sun_radius)
    # (r^2 - d^2) / 2r is the distance inside the rim to first order: an antialiased disc.
    light = np.clip((r * r - d2) / (np.float32(2.0 * view.px) * r) + np.float32(0.5), 0.0, 1.0)
    halo = np.float32(1.0) / (np.float32(1.0) + d2 / (np.float32(6.0) * r * r))
    light += np.float32(0.5) * halo
    light *= col(scene.sun_power) * (np.float32(1.0) - below[:, :bottom])
    view.screen(light, np.broadcast_to(np.array([1.0, 0.97, 0.88], np.float32), (scene.n, 3)))


def paint_hills(scene: Scene, cv: Canvas) -> None:
    """Hazy distant hills, then (in some frames) a dark tree line along the horizon."""
    # The tree line can stand taller than the hills: the rows painted must reach both in every frame,
    # or a frame would depend on which other frames share its batch.
    tallest = np.maximum(scene.hill_h, scene.treeline_h)
    top_row = max(0, int(np.floor(float((scene.horizon - tallest).min()) * cv.height)) - 1)
    view = cv.rows(top_row, sky_rows(scene, cv))
    h, x = col(scene.horizon), view.xs
    f, p = scene.hill_freq, scene.hill_phase
    shape = (
        np.float32(0.6)
        + np.float32(0.25) * np.sin(col(f[:, 0]) * x + col(p[:, 0]))
        + np.float32(0.15) * np.sin(col(f[:, 1]) * x + col(p[:, 1]))
    )
    top = h - col(scene.hill_h) * shape
    far = np.full(scene.n, 50, np.float32)
    view.composite(cover(view.ys, top, h + np.float32(cv.px), cv.px), scene.hill_colour, far)
    q = scene.treeline_phase
    crowns = np.abs(np.sin(np.float32(70.0) * x + col(q[:, 0]))) * np.float32(0.35) + np.float32(0.45)
    crowns += np.float32(0.2) * np.sin(np.float32(9.0) * x + col(q[:, 1]))
    top = h - col(scene.treeline_h) * crowns
    alpha = cover(view.ys, top, h + np.float32(cv.px), cv.px) * col(scene.treeline_h > 0)
    view.composite(alpha, scene.treeline_colour, np.full(scene.n, 30, np.float32))


def road_u(scene: Scene, cv: Canvas, t_row: F32) -> F32:
    """Lateral road coordinate of every pixel (the inverse of ``Scene.ground_x`` per row)."""
    centre = col(scene.vanish_x) + col(scene.curve) * (np.float32(1.0) - t_row) ** 3
    u = cv.xs - centre
    u *= np.float32(1.0) / (col(scene.lane_w) * t_row)
    u += col(scene.ego_u)
    return u


def dash_pattern(scene: Scene, cv: Canvas, t_row: F32) -> F32:
    """Per-row on/off of dashed lines, fading to the mean where a dash is shorter than two pixels."""
    z = np.float32(1.0) / t_row
    period = col(scene.dash_period)
    f = np.mod(z / period + col(scene.dash_phase), np.float32(1.0))
    duty = np.float32(0.4)
    hard = (f < duty).astype(np.float32)
    px_per_cycle = period * (np.float32(1.0) - col(scene.horizon)) * t_row * t_row / np.float32(cv.px)
    w = np.clip(px_per_cycle / np.float32(2.0) - np.float32(0.5), 0.0, 1.0)
    return w * hard + (np.float32(1.0) - w) * duty


def paint_road(scene: Scene, frame: Canvas, t_full: F32, below_full: F32) -> RoadMaps:
    """Verge, asphalt with worn wheel paths (or snow with tyre tracks), then lane markings."""
    top = ground_top(scene, frame)
    cv = frame.rows(top, frame.height)
    t_row, below = t_full[:, top:], below_full[:, top:]
    u = road_u(scene, cv, t_row)
    lanes = col(scene.lanes.astype(np.float32))
    scale = col(scene.lane_w) * t_row
    to_px = scale / np.float32(cv.px)
    margin = np.minimum(u, lanes - u)  # lane widths inside the road (negative outside)
    verge = np.clip((margin + np.float32(0.5)) * to_px + np.float32(0.5), 0.0, 1.0) * below
    cv.composite(verge, scene.verge)
    road = np.clip((margin + np.float32(0.15)) * to_px + np.float32(0.5), 0.0, 1.0) * below

    # Nearest lane line k and the signed offset from it, in lane widths.
    k = np.clip(np.rint(u), 0.0, lanes)
    offset = np.abs(u - k)
    # Wheel paths sit at a quarter and three quarters of each lane (triangle wave, squared).
    tracks = np.abs(offset * np.float32(4.0) - np.float32(1.0))
    np.clip(np.float32(1.0) - tracks, 0.0, 1.0, out=tracks)
    tracks *= tracks
    asphalt = scene.asphalt[:, :, None, None] * (np.float32(1.0) - np.float32(0.09) * tracks)[:, None]
    if scene.snow_cover.any():
        cover_snow = col(scene.snow_cover) * (np.float32(1.0) - np.float32(0.8) * tracks * tracks)
        asphalt = asphalt + (SNOW[None, :, None, None] - asphalt) * cover_snow[:, None]
    cv.composite(road, asphalt)

    # Line coverage: half-width hw around k, antialiased; capped at 2 hw / px for sub-pixel lines.
    hw_px = col(scene.line_hw) * to_px
    line = offset * to_px
    np.subtract(hw_px + np.float32(0.5), line, out=line)
    np.clip(line, 0.0, 1.0, out=line)
    np.minimum(line, np.float32(2.0) * hw_px, out=line)
    # "inner" is 1 for lines between lanes and 0 for the two road edges.
    inner = np.minimum(np.minimum(k, lanes - k), np.float32(1.0))
    dashed = col(scene.dashed.astype(np.float32))
    dashes = np.float32(1.0) + dashed * (dash_pattern(scene, cv, t_row) - np.float32(1.0))
    line *= np.float32(1.0) + inner * (dashes - np.float32(1.0))
    line *= below * (np.float32(1.0) - col(np.clip(scene.snow_cover * 1.3, 0, 1).astype(np.float32)))
    yellow = inner * col(scene.inner_yellow.astype(np.float32))
    if scene.left_yellow.any():
        left_edge = np.float32(1.0) - np.minimum(k, np.float32(1.0))
        yellow += left_edge * col(scene.left_yellow.astype(np.float32))
    white = scene.marking[:, :, None, None]
    paint = yellow[:, None] * (YELLOW[None, :, None, None] - white)
    paint += white
    cv.composite(line, paint)
    return RoadMaps(top=top, t_row=t_row, below=below, u=u, road=road)
