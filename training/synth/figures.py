"""Small objects that make a frame an edge case: pedestrians, animals, road works, curve signs.

They are deliberately *small* and sit in an otherwise normal scene, so a detector has to notice
their shape, not a change in overall brightness. ``strength`` brings them closer (larger). They are
depth-tested against what is already painted, so a nearer car hides a pedestrian behind it.

Two size rules: in a square frame an object's height is stated in pixels of a 64 px frame (a few
to about twenty pixels), the rule the square benchmarks were tuned with; in a wide frame the
object stands at a distance in metres drawn from the context's ``object_distance`` range and the
pinhole camera (``pinhole.py``) gives its size, so a pedestrian at 15 to 60 m is 25 to 6 px tall
at 256x144. The drawn world sizes (a person 1.4 to 1.9 m, a deer 1 m at the shoulder) are the same
in both.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from training.synth.canvas import Canvas, paint_in_patches
from training.synth.context import RenderContext
from training.synth.pinhole import LANE_WIDTH_M, distance_for_strength
from training.synth.props import rgb
from training.synth.scene import Scene, depth_at
from training.synth.shapes import box, ellipse, triangle

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.intp]
TOPS = np.array(
    [[0.80, 0.12, 0.10], [0.95, 0.85, 0.10], [0.92, 0.92, 0.90], [0.08, 0.08, 0.10], [0.15, 0.30, 0.70],
     [0.20, 0.50, 0.25], [0.95, 0.50, 0.10], [0.55, 0.20, 0.55]],
    np.float32,
)  # fmt: skip
TROUSERS = np.array(
    [[0.10, 0.12, 0.25], [0.08, 0.08, 0.08], [0.35, 0.35, 0.38], [0.40, 0.30, 0.20]], np.float32
)
FUR = np.array([[0.45, 0.30, 0.17], [0.55, 0.40, 0.22], [0.10, 0.09, 0.08], [0.85, 0.80, 0.70]], np.float32)
ORANGE = np.array([0.98, 0.42, 0.05], np.float32)
WHITE = np.array([0.95, 0.95, 0.95], np.float32)
YELLOW = np.array([0.95, 0.80, 0.10], np.float32)


def _pick(palette: F32, u: F32) -> F32:
    return palette[np.minimum((u * len(palette)).astype(np.int64), len(palette) - 1)]


def _depth_for_height(scene: Scene, height_px: F32, world_h: F32) -> F32:
    """Depth ``t`` at which an object ``world_h`` lane widths tall is ``height_px`` tall in a 64 px frame.

    Sizes are stated at 64x64 and scale with the frame, so a scene looks the same at any size.
    """
    t = (height_px / np.float32(64.0)) / (world_h * scene.lane_w)
    return np.clip(t, 0.03, 0.97).astype(np.float32)


def _pinhole_depth(ctx: RenderContext) -> F32:
    """Depth ``t`` of the family's object in a pinhole (wide) frame: at the distance the strength
    picks in the ``object_distance`` range, recorded in ``ctx.distance``."""
    near, far = ctx.object_distance
    ctx.distance = distance_for_strength(ctx.strength, near, far)
    return depth_at(ctx.scene, ctx.distance)


def visible_u(
    scene: Scene, t: F32, margin: float = 0.06, x_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[F32, F32]:
    """The lateral range (lane widths) that is on screen, ``margin`` inside the frame, at depth ``t``.

    ``x_range`` is the frame's left and right edge in x (``Canvas.x_range``; ``(0, 1)`` when square).
    """
    centre = scene.vanish_x + scene.curve * (np.float32(1.0) - t) ** 3
    scale = scene.lane_w * t
    left, right = x_range
    lo = scene.ego_u + (np.float32(left + margin) - centre) / scale
    hi = scene.ego_u + (np.float32(right - margin) - centre) / scale
    return lo.astype(np.float32), hi.astype(np.float32)


def _lateral(ctx: RenderContext, t: F32, on_road_p: float) -> F32:
    """On the road (in some lane) with probability ``on_road_p``, else on a verge just off it.

    Clipped to what the camera sees at depth ``t``: a near object is never placed off screen.
    """
    r, scene = ctx.draws.family, ctx.scene
    lanes = scene.lanes.astype(np.float32)
    on_road = r.bernoulli(on_road_p)
    across = np.float32(0.15) + r.uniform(0.0, 1.0) * (lanes - np.float32(0.3))
    off = r.uniform(0.2, 0.55)
    verge = np.where(r.bernoulli(0.5), -off, lanes + off)
    assert ctx.cv is not None
    lo, hi = visible_u(scene, t, x_range=ctx.cv.x_range)
    return np.clip(np.where(on_road, across, verge), lo, hi).astype(np.float32)


def pedestrian_world(ctx: RenderContext) -> None:
    """A person standing or walking, on the road (crossing) or beside it."""
    cv, scene, r, s = ctx.cv, ctx.scene, ctx.draws.family, ctx.strength
    assert cv is not None
    height = (np.float32(0.5) * r.uniform(0.8, 1.1)).astype(np.float32)  # 1.75 m is half a lane width
    target = (np.float32(2.0) + np.float32(18.0) * s * s) * r.uniform(0.85, 1.1)  # ~4 px at 0.3, 20 at 1
    t = _pinhole_depth(ctx) if scene.pinhole else _depth_for_height(scene, target, height)
    u = _lateral(ctx, t, 0.65)
    x, y = scene.ground_x(u, t), scene.ground_y(t)
    sc = scene.scale(t) * height  # screen units per person height
    z = (np.float32(1.0) / t).astype(np.float32)
    stride = r.uniform(-0.06, 0.06)
    top, legs = _pick(TOPS, r.uniform()), _pick(TROUSERS, r.uniform())
    skin = np.array([0.80, 0.60, 0.46], np.float32) * r.uniform(0.6, 1.1)[:, None]

    def draw(p: Canvas, f: I64) -> None:
        X, Y, S, st = x[f], y[f], sc[f], stride[f]
        seen = p.occlusion(z[f])
        leg = np.maximum(
            box(p, X, Y, S, -0.09 + st, -0.01 + st, 0.0, 0.48),
            box(p, X, Y, S, 0.01 - st, 0.09 - st, 0.0, 0.48),
        )
        p.composite(leg * seen, legs[f], z[f])
        body = np.maximum(box(p, X, Y, S, -0.12, 0.12, 0.45, 0.8), box(p, X, Y, S, -0.16, 0.16, 0.5, 0.78))
        p.composite(body * seen, top[f], z[f])
        p.composite(ellipse(p, X, Y, S, 0.0, 0.89, 0.075, 0.09) * seen, skin[f], z[f])

    paint_in_patches(cv, np.ones(scene.n, bool), (x - 0.2 * sc, y - 1.0 * sc, x + 0.2 * sc, y + 0.01), draw)


def animal_world(ctx: RenderContext) -> None:
    """A deer (long legs and neck) or a dog, side-on, usually on the road."""
    cv, scene, r, s = ctx.cv, ctx.scene, ctx.draws.family, ctx.strength
    assert cv is not None
    deer = r.bernoulli(0.6)
    shoulder = np.where(deer, np.float32(0.3), np.float32(0.17)).astype(np.float32)  # 1 m / 0.6 m
    target = (np.float32(2.0) + np.float32(13.0) * s * s) * r.uniform(0.85, 1.1) / np.float32(1.4)
    t = _pinhole_depth(ctx) if scene.pinhole else _depth_for_height(scene, target, shoulder)
    u = _lateral(ctx, t, 0.8)
    x, y = scene.ground_x(u, t), scene.ground_y(t)
    sc = scene.scale(t) * shoulder  # screen units per shoulder height
    z = (np.float32(1.0) / t).astype(np.float32)
    facing = r.sign()
    fur = np.where(deer[:, None], FUR[0] * r.uniform(0.85, 1.1)[:, None], _pick(FUR, r.uniform()))
    leg_top = np.where(deer, np.float32(0.72), np.float32(0.55))
    neck_top = np.where(deer, np.float32(1.25), np.float32(0.85))

    def draw(p: Canvas, f: I64) -> None:
        X, Y, S, d, lt, nt = x[f], y[f], sc[f], facing[f], leg_top[f], neck_top[f]
        seen = p.occlusion(z[f])
        shape = ellipse(p, X, Y, S, 0.0, lt + 0.1, 0.55, 0.2)
        for a in (-0.45, -0.3, 0.3, 0.45):
            np.maximum(shape, box(p, X, Y, S, a - 0.04, a + 0.04, 0.0, lt + 0.05), out=shape)
        neck_x = d * 0.5
        np.maximum(shape, box(p, X, Y, S, neck_x - 0.07, neck_x + 0.07, lt, nt), out=shape)
        np.maximum(shape, ellipse(p, X, Y, S, d * 0.6, nt, 0.16, 0.1), out=shape)
        np.maximum(shape, box(p, X, Y, S, -d * 0.6 - 0.05, -d * 0.6 + 0.05, lt - 0.05, lt + 0.2), out=shape)
        p.composite(shape * seen, fur[f], z[f])

    bounds = (x - 0.8 * sc, y - 1.45 * sc, x + 0.8 * sc, y + 0.01)
    paint_in_patches(cv, np.ones(scene.n, bool), bounds, draw)


N_CONES = 8
CONE_M = 0.7


def construction_world(ctx: RenderContext) -> None:
    """A work zone: a line of orange cones along a lane line and a striped barrier closing a lane."""
    cv, scene, r, s = ctx.cv, ctx.scene, ctx.draws.family, ctx.strength
    assert cv is not None
    lanes = scene.lanes.astype(np.float32)
    z0 = (np.float32(5.5) - np.float32(4.0) * s) * r.uniform(0.85, 1.15)
    if scene.pinhole:  # the first cone at the distance the strength picks (square frames keep z0)
        z0 = (np.float32(1.0) / _pinhole_depth(ctx)).astype(np.float32)
    # A lane line the camera sees at the first cone (near cones on a far lane would be off screen).
    lo, hi = visible_u(scene, (np.float32(1.0) / z0).astype(np.float32), margin=0.1, x_range=cv.x_range)
    lo, hi = np.clip(np.ceil(lo), 0, lanes), np.clip(np.floor(hi), 0, lanes)
    line = (
        np.floor(lo + r.uniform() * (np.maximum(hi, lo) - lo + 1))
        .astype(np.float32)
        .clip(lo, np.maximum(hi, lo))
    )
    closed_side = np.where(line >= lanes, np.float32(-1.0), np.where(line <= 0, np.float32(1.0), r.sign()))
    gap = r.uniform(0.5, 1.1) * scene.z_scale  # 5 to 11 m between cones in every frame shape
    count = np.round(np.float32(3.0) + np.float32(5.0) * s).astype(np.int64)
    cz = z0[:, None] + gap[:, None] * np.arange(N_CONES, dtype=np.float32)
    ct = (np.float32(1.0) / cz).astype(np.float32)
    cu = (line + np.float32(0.12) * closed_side)[:, None] * np.ones(N_CONES, np.float32)
    # Cones are 1.1 m tall in the square rule; a real traffic cone (wide frames) is 0.7 m.
    cone = np.float32(CONE_M / (0.32 * LANE_WIDTH_M)) if scene.pinhole else np.float32(1.0)
    cx, cy, csc = scene.ground_x(cu, ct), scene.ground_y(ct), scene.scale(ct) * cone
    cone_on = np.arange(N_CONES) < count[:, None]
    # The barrier stands across the closed lane, just before the first cone.
    bz = (z0 - np.float32(0.3) * scene.z_scale).astype(np.float32)
    bt = (np.float32(1.0) / bz).astype(np.float32)
    bu = (line + np.float32(0.5) * closed_side).astype(np.float32)
    bx, by, bsc = scene.ground_x(bu, bt), scene.ground_y(bt), scene.scale(bt)

    def draw(p: Canvas, f: I64) -> None:
        cone = np.zeros(p.shape, np.float32)
        band = np.zeros(p.shape, np.float32)
        for i in range(N_CONES):
            on = cone_on[f, i].astype(np.float32).reshape(-1, 1, 1)
            X, Y, S = cx[f, i], cy[f, i], csc[f, i]
            shape = triangle(p, X, Y, S, 0.1, 0.32) * on * p.occlusion(cz[f, i])
            np.maximum(cone, shape, out=cone)
            np.maximum(band, shape * box(p, X, Y, S, -0.1, 0.1, 0.13, 0.2), out=band)
        p.composite(cone, rgb(len(f), ORANGE), cz[f, 0])
        p.composite(band, rgb(len(f), WHITE))
        X, Y, S = bx[f], by[f], bsc[f]
        seen = p.occlusion(bz[f])
        legs = np.maximum(box(p, X, Y, S, -0.38, -0.34, 0.0, 0.2), box(p, X, Y, S, 0.34, 0.38, 0.0, 0.2))
        p.composite(legs * seen, rgb(len(f), WHITE * 0.6), bz[f])
        board = box(p, X, Y, S, -0.42, 0.42, 0.18, 0.36) * seen
        diag = (p.xs - X.reshape(-1, 1, 1)) / S.reshape(-1, 1, 1) - (p.ys - Y.reshape(-1, 1, 1)) / S.reshape(
            -1, 1, 1
        )
        stripes = (np.mod(diag * np.float32(5.0), np.float32(1.0)) < 0.5).astype(np.float32)
        colour = WHITE.reshape(1, 3, 1, 1) + (ORANGE - WHITE).reshape(1, 3, 1, 1) * stripes[:, None]
        p.composite(board, colour, bz[f])

    lo_x = np.minimum((cx - 0.12 * csc).min(axis=1), bx - 0.45 * bsc)
    hi_x = np.maximum((cx + 0.12 * csc).max(axis=1), bx + 0.45 * bsc)
    lo_y = np.minimum((cy - 0.34 * csc).min(axis=1), by - 0.4 * bsc)
    hi_y = np.maximum(cy.max(axis=1), by) + np.float32(0.01)
    paint_in_patches(cv, np.ones(scene.n, bool), (lo_x, lo_y, hi_x, hi_y), draw)


def sharp_curve_scene(ctx: RenderContext) -> None:
    """The road bends hard left or right towards the horizon."""
    s, r = ctx.strength, ctx.draws.family
    ctx.scene.curve = (r.sign() * (np.float32(0.3) + np.float32(0.9) * s)).astype(np.float32)


def sharp_curve_world(ctx: RenderContext) -> None:
    """Chevron boards on the outside of the bend, pointing the way the road turns."""
    cv, scene = ctx.cv, ctx.scene
    assert cv is not None
    lanes = scene.lanes.astype(np.float32)
    right = scene.curve > 0
    u = np.where(right, lanes + np.float32(0.6), np.float32(-0.6)).astype(np.float32)  # outer edge ahead
    z = np.array([2.6, 3.4, 4.4], np.float32) * scene.z_scale[:, None]
    t = (np.float32(1.0) / z).astype(np.float32)
    x, y, sc = scene.ground_x(u[:, None], t), scene.ground_y(t), scene.scale(t)
    point = np.where(right, np.float32(1.0), np.float32(-1.0))

    def draw(p: Canvas, f: I64) -> None:
        for i in range(3):
            X, Y, S = x[f, i], y[f, i], sc[f, i]
            zi = z[f, i]
            seen = p.occlusion(zi)
            p.composite(box(p, X, Y, S, -0.02, 0.02, 0.0, 0.3) * seen, rgb(len(f), WHITE * 0.5), zi)
            p.composite(box(p, X, Y, S, -0.13, 0.13, 0.28, 0.56) * seen, rgb(len(f), YELLOW), zi)
            # A dark ">" (or "<"): distance from the chevron's centre line.
            lx = (p.xs - X.reshape(-1, 1, 1)) / S.reshape(-1, 1, 1) * point[f].reshape(-1, 1, 1)
            ly = (Y.reshape(-1, 1, 1) - p.ys) / S.reshape(-1, 1, 1) - np.float32(0.42)
            mark = np.clip(
                np.float32(1.0) - np.abs(lx + np.abs(ly) - np.float32(0.02)) / np.float32(0.05), 0.0, 1.0
            )
            p.composite(mark * box(p, X, Y, S, -0.11, 0.11, 0.3, 0.54) * seen, rgb(len(f), WHITE * 0.08), zi)

    lo_x = (x - 0.15 * sc).min(axis=1)
    hi_x = (x + 0.15 * sc).max(axis=1)
    paint_in_patches(
        cv, np.ones(scene.n, bool), (lo_x, (y - 0.6 * sc).min(axis=1), hi_x, y.max(axis=1) + 0.01), draw
    )
