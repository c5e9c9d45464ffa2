"""Upright things along a highway: guardrails, roadside trees, lamp posts and the vehicles ahead.

Objects are drawn far to near so nearer ones occlude; each writes its distance into the depth
buffer so that later objects (a pedestrian, a deer) are hidden behind a nearer car, and fog thins
them by their own distance rather than the distance of the ground behind them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from training.synth.canvas import Canvas, col, cover, paint_in_patches
from training.synth.landscape import ground_top
from training.synth.scene import N_CARS, N_LAMPS, N_TREES, Scene
from training.synth.shapes import box, ellipse

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.intp]
B = npt.NDArray[np.bool_]
RAIL = np.array([0.64, 0.66, 0.68], np.float32)
TRUNK = np.array([0.26, 0.18, 0.10], np.float32)
POLE = np.array([0.40, 0.41, 0.43], np.float32)
TYRES = np.array([0.05, 0.05, 0.06], np.float32)
TAIL = np.array([0.72, 0.07, 0.05], np.float32)
GLASS = np.array([0.10, 0.12, 0.16], np.float32)
BLACK = np.zeros(3, np.float32)


@dataclass
class Lights:
    """Where light sources are, for the night family: ``(N, k)`` screen positions and scales."""

    lamp_x: F32
    lamp_y: F32
    lamp_sc: F32
    lamp_on: npt.NDArray[np.bool_]
    tail_x: F32
    """``(N, N_CARS, 2)`` x of the left and right tail lights."""
    tail_y: F32
    tail_sc: F32
    car_on: npt.NDArray[np.bool_]


def rgb(n: int, value: F32) -> F32:
    """One colour for every frame, shaped ``(n, 3)``."""
    return np.broadcast_to(value, (n, 3))


def paint_rails(scene: Scene, frame: Canvas, t_full: F32, below_full: F32) -> None:
    """A metal guardrail band (0.14..0.24 lane widths above ground) just beyond each road edge."""
    if not (scene.rail_left.any() or scene.rail_right.any()):
        return
    top = ground_top(scene, frame)
    cv = frame.rows(top, frame.height)
    t_row, below = t_full[:, top:], below_full[:, top:]
    drop = np.float32(1.0) - col(scene.horizon)
    lanes = scene.lanes.astype(np.float32)
    alpha = np.zeros(cv.shape, np.float32)
    # Row y sees the band (heights a..b) on the wall x = x(u, t) at depths t in
    # [t_row drop / (drop - a lane_w), t_row drop / (drop - b lane_w)].
    t_a = np.minimum(t_row * drop / (drop - np.float32(0.14) * col(scene.lane_w)), np.float32(1.5))
    t_b = np.minimum(t_row * drop / (drop - np.float32(0.24) * col(scene.lane_w)), np.float32(1.5))
    for on, u in (
        (scene.rail_left, np.full(scene.n, -0.4, np.float32)),
        (scene.rail_right, lanes + np.float32(0.4)),
    ):
        if not on.any():
            continue
        x_a = scene.ground_x(np.broadcast_to(col(u), t_a.shape), t_a)
        x_b = scene.ground_x(np.broadcast_to(col(u), t_b.shape), t_b)
        a = cover(cv.xs, np.minimum(x_a, x_b), np.maximum(x_a, x_b), cv.px) * (below * col(on))
        np.maximum(alpha, a, out=alpha)
    cv.composite(alpha, rgb(scene.n, RAIL))  # at ground level: the ground depth is close enough


def _slot(values: npt.NDArray, pick: npt.NDArray[np.intp]) -> npt.NDArray:
    """Per-frame value of object slot ``pick`` (values ``(N, k, ...)``)."""
    return values[np.arange(values.shape[0]), pick]


def paint_trees(scene: Scene, cv: Canvas) -> None:
    """Broadleaf trees on the verges: a trunk, then a canopy ellipse; far trees first."""
    order = np.argsort(-scene.tree_z, axis=1, kind="stable")
    for j in range(N_TREES):
        pick = order[:, j]
        on, z, u = _slot(scene.tree_on, pick), _slot(scene.tree_z, pick), _slot(scene.tree_u, pick)
        size, green = _slot(scene.tree_size, pick), _slot(scene.tree_colour, pick)
        t = (np.float32(1.0) / z).astype(np.float32)
        x, y, sc = scene.ground_x(u, t), scene.ground_y(t), scene.scale(t)
        ext = sc * size

        def draw(p: Canvas, f: I64, x=x, y=y, sc=sc, size=size, z=z, green=green) -> None:
            s_ = size[f]
            p.composite(
                box(p, x[f], y[f], sc[f], -0.05 * s_, 0.05 * s_, 0.0, 0.8 * s_), rgb(len(f), TRUNK), z[f]
            )
            p.composite(ellipse(p, x[f], y[f], sc[f], 0.0, 1.35 * s_, 0.5 * s_, 0.7 * s_), green[f], z[f])

        bounds = (x - 0.52 * ext, y - 2.07 * ext, x + 0.52 * ext, y + 0.01)
        paint_in_patches(cv, on, bounds, draw)


def paint_lamps(scene: Scene, cv: Canvas) -> tuple[F32, F32, F32]:
    """Lamp posts on one side, leaning an arm over the road; returns lamp head positions."""
    lanes = scene.lanes.astype(np.float32)
    u = np.where(scene.lamp_side < 0, np.float32(-0.7), lanes + np.float32(0.7)).astype(np.float32)
    toward = -scene.lamp_side  # the arm reaches over the road
    z = scene.lamp_z0[:, None] + np.arange(N_LAMPS, dtype=np.float32) * scene.lamp_spacing[:, None]
    t = (np.float32(1.0) / z).astype(np.float32)
    x, y, sc = scene.ground_x(u[:, None], t), scene.ground_y(t), scene.scale(t)
    head_x, head_y = x + toward[:, None] * 0.5 * sc, y - 2.3 * sc
    arm_x0, arm_x1 = np.minimum(0.0, toward * 0.55), np.maximum(0.0, toward * 0.55)

    def draw(p: Canvas, f: I64) -> None:
        alpha = np.zeros(p.shape, np.float32)
        for i in range(N_LAMPS):
            xi, yi, si, hx = x[f, i], y[f, i], sc[f, i], head_x[f, i]
            np.maximum(alpha, box(p, xi, yi, si, -0.025, 0.025, 0.0, 2.4), out=alpha)
            np.maximum(alpha, box(p, xi, yi, si, arm_x0[f], arm_x1[f], 2.36, 2.42), out=alpha)
            np.maximum(alpha, box(p, hx, yi, si, -0.1, 0.1, 2.3, 2.38), out=alpha)
        p.composite(alpha, rgb(len(f), POLE), z[f].mean(axis=1).astype(np.float32))

    bounds = (
        (x - 0.6 * sc).min(axis=1),
        (y - 2.45 * sc).min(axis=1),
        (x + 0.6 * sc).max(axis=1),
        y.max(axis=1) + 0.01,
    )
    paint_in_patches(cv, scene.lamps_on, bounds, draw)
    return head_x.astype(np.float32), head_y.astype(np.float32), sc.astype(np.float32)


def _draw_car(p: Canvas, x: F32, y: F32, sc: F32, hm: F32, truck: B, paint: F32, z: F32, sky: F32) -> None:
    """One vehicle from behind: shadow, tyres, body and cabin, rear window, tail lights.

    A lorry uses the same five layers with other proportions: a wide, tall box trailer whose
    "window" is the dark seam between its doors and whose lights sit low.
    """
    n = len(x)
    f32 = np.float32
    half = np.where(truck, f32(0.36), f32(0.27))
    top = np.where(truck, f32(1.12), f32(0.27) * hm)
    p.composite(box(p, x, y, sc, -half - 0.03, half + 0.03, -0.03, 0.04) * f32(0.5), rgb(n, BLACK))
    p.composite(box(p, x, y, sc, -half + 0.02, half - 0.02, 0.0, 0.1), rgb(n, TYRES), z)
    body = box(p, x, y, sc, -half, half, 0.07, top)
    cabin_top = np.where(truck, top, f32(0.43) * hm)  # a lorry has no separate cabin in view
    np.maximum(body, box(p, x, y, sc, -0.22, 0.22, 0.26 * hm, cabin_top), out=body)
    p.composite(body, np.where(truck[:, None], paint * f32(0.4) + f32(0.5), paint), z)
    win_half = np.where(truck, f32(0.012), f32(0.18))
    win_lo, win_hi = np.where(truck, f32(0.16), f32(0.29) * hm), np.where(truck, f32(1.08), f32(0.41) * hm)
    p.composite(box(p, x, y, sc, -win_half, win_half, win_lo, win_hi), GLASS + f32(0.3) * sky, z)
    light_lo, light_hi = (
        np.where(truck, f32(0.13), f32(0.18) * hm),
        np.where(truck, f32(0.19), f32(0.235) * hm),
    )
    inner, outer = half - f32(0.1), half - f32(0.015)
    lights = np.maximum(
        box(p, x, y, sc, -outer, -inner, light_lo, light_hi),
        box(p, x, y, sc, inner, outer, light_lo, light_hi),
    )
    p.composite(lights, rgb(n, TAIL), z)


def paint_cars(scene: Scene, cv: Canvas) -> tuple[F32, F32, F32]:
    """Vehicles seen from behind, far first; returns the tail-light positions for night scenes."""
    order = np.argsort(-scene.car_z, axis=1, kind="stable")
    tails = np.zeros((3, scene.n, N_CARS, 2), np.float32)
    rows = np.arange(scene.n)
    for j in range(N_CARS):
        pick = order[:, j]
        on, z, u = _slot(scene.car_on, pick), _slot(scene.car_z, pick), _slot(scene.car_u, pick)
        hm, paint = _slot(scene.car_height, pick), _slot(scene.car_colour, pick)
        truck = _slot(scene.car_truck, pick)
        t = (np.float32(1.0) / z).astype(np.float32)
        x, y, sc = scene.ground_x(u, t), scene.ground_y(t), scene.scale(t)
        spread = np.where(truck, np.float32(0.3), np.float32(0.21)) * sc
        tails[0, rows, pick] = np.stack([x - spread, x + spread], -1)
        tails[1, rows, pick] = (y - np.where(truck, np.float32(0.16), np.float32(0.21) * hm) * sc)[:, None]
        tails[2, rows, pick] = sc[:, None]

        def draw(p: Canvas, f: I64, x=x, y=y, sc=sc, hm=hm, truck=truck, paint=paint, z=z) -> None:
            _draw_car(p, x[f], y[f], sc[f], hm[f], truck[f], paint[f], z[f], scene.sky_top[f])

        half = np.where(truck, np.float32(0.4), np.float32(0.31)) * sc
        height = np.where(truck, np.float32(1.14), np.float32(0.44) * hm) * sc
        bounds = (x - half, y - height, x + half, y + 0.04 * sc)
        paint_in_patches(cv, on, bounds, draw)
    return tails[0], tails[1], tails[2]


def paint_props(scene: Scene, cv: Canvas, t_row: F32, below: F32) -> Lights:
    """All upright props of a normal scene, in depth order by kind (roadside first, then traffic)."""
    paint_rails(scene, cv, t_row, below)
    paint_trees(scene, cv)
    lamp_x, lamp_y, lamp_sc = paint_lamps(scene, cv)
    tail_x, tail_y, tail_sc = paint_cars(scene, cv)
    return Lights(
        lamp_x, lamp_y, lamp_sc, scene.lamps_on.copy(), tail_x, tail_y, tail_sc, scene.car_on.copy()
    )
