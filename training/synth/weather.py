"""Weather and light families: night, fog, rain, snow.

Each is a scene edit (colours, haze, sun) plus, where the effect lives between the world and the
lens, an ``air`` hook painted after the aerial haze: lights at night, rain streaks and wet-road
reflections, snowflakes. ``strength`` scales each from a hint (dusk, light mist, drizzle, flurries)
to the full effect.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from training.synth.canvas import col
from training.synth.context import RenderContext
from training.synth.scene import N_CARS, N_LAMPS

F32 = npt.NDArray[np.float32]
OVERCAST = np.array([0.58, 0.60, 0.64], np.float32)
FOG = np.array([0.76, 0.77, 0.79], np.float32)
SNOW_WHITE = np.array([0.90, 0.92, 0.95], np.float32)
NIGHT_GAIN = np.array([0.06, 0.07, 0.12], np.float32)
LAMP_LIGHT = np.array([1.0, 0.72, 0.35], np.float32)
HEADLIGHT = np.array([1.0, 0.95, 0.82], np.float32)
TAIL_GLOW = np.array([1.0, 0.12, 0.06], np.float32)


def _mix(a: F32, b: F32, w: F32) -> F32:
    """Blend per-frame colours ``a`` towards ``b`` by per-frame weight ``w``; works for ``(N, k, 3)`` too."""
    w = w.reshape((-1,) + (1,) * (a.ndim - 1))
    return (a + (b - a) * w).astype(np.float32)


def _glow(xs: F32, ys: F32, x: F32, y: F32, r: F32) -> F32:
    """A soft light blob ``1 / (1 + d^2 / r^2)^2`` around per-frame points."""
    dx, dy = xs - col(x), ys - col(y)
    q = np.float32(1.0) + (dx * dx + dy * dy) / col(r * r)
    return np.float32(1.0) / (q * q)


# --- night ------------------------------------------------------------------------------------


def night_scene(ctx: RenderContext) -> None:
    """No sun; street lamps are on in most night frames."""
    s, scene = ctx.strength, ctx.scene
    scene.sun_power *= np.float32(1.0) - s
    scene.lamps_on |= ctx.draws.family.bernoulli(0.75)


def night_air(ctx: RenderContext) -> None:
    """Darken towards a blue night, then add the lights: headlight beam, lamps, tail lights."""
    cv, s, scene, maps, lights = ctx.cv, ctx.strength, ctx.scene, ctx.maps, ctx.lights
    assert cv is not None and maps is not None and lights is not None
    # sqrt: even a weak night (dusk) is clearly darker than any daytime exposure.
    gain = np.float32(1.0) + (NIGHT_GAIN - np.float32(1.0)) * np.sqrt(s)[:, None]
    cv.img *= gain.reshape(-1, 3, 1, 1)
    # A faint sky glow just above the horizon (towns, the last light).
    glow = (
        np.float32(0.05) * col(s) / (np.float32(1.0) + np.abs(cv.ys - col(scene.horizon)) * np.float32(25.0))
    )
    cv.add(glow, np.broadcast_to(np.array([0.7, 0.55, 0.5], np.float32), (scene.n, 3)))

    # Our own low beams: bright close to the car, centred on the ego lane, lighting markings most.
    road = cv.rows(maps.top, cv.height)
    lateral = (maps.u - col(scene.ego_u)) / np.float32(1.1)
    beam = maps.road / (np.float32(1.0) + lateral**4)
    beam *= np.clip((maps.t_row - np.float32(0.12)) * np.float32(2.5), 0.0, 1.0) * col(s)
    road.img += (
        beam[:, None] * (np.float32(0.10) + np.float32(3.0) * road.img) * HEADLIGHT.reshape(1, 3, 1, 1)
    )

    amount = np.zeros(cv.shape, np.float32)
    for i in range(N_LAMPS):
        on = col((lights.lamp_on * s).astype(np.float32))
        r = np.maximum(lights.lamp_sc[:, i] * np.float32(0.12), np.float32(cv.px * 0.7))
        amount += _glow(cv.xs, cv.ys, lights.lamp_x[:, i], lights.lamp_y[:, i], r) * on
        # The pool of light on the ground under the lamp head.
        ground_y = lights.lamp_y[:, i] + np.float32(2.3) * lights.lamp_sc[:, i]
        pool = _glow(cv.xs / np.float32(3.0), cv.ys, lights.lamp_x[:, i] / np.float32(3.0), ground_y, r * 1.5)
        amount += np.float32(0.25) * pool * on
    cv.add(amount, np.broadcast_to(LAMP_LIGHT, (scene.n, 3)))

    tail = np.zeros(cv.shape, np.float32)
    for j in range(N_CARS):
        on = col((lights.car_on[:, j] * s).astype(np.float32))
        for k in range(2):
            r = np.maximum(lights.tail_sc[:, j, k] * np.float32(0.06), np.float32(cv.px * 0.6))
            tail += _glow(cv.xs, cv.ys, lights.tail_x[:, j, k], lights.tail_y[:, j, k], r) * on
    cv.add(tail, np.broadcast_to(TAIL_GLOW, (scene.n, 3)))


# --- fog --------------------------------------------------------------------------------------


def fog_scene(ctx: RenderContext) -> None:
    """Dense grey haze: visibility drops from a few hundred metres (0.3) to a few tens (1.0)."""
    s, scene = ctx.strength, ctx.scene
    scene.haze = (np.float32(0.05) + np.float32(0.6) * s * s).astype(np.float32)
    tone = ctx.draws.family.uniform(0.85, 1.05)[:, None]
    scene.haze_colour = _mix(scene.haze_colour, FOG * tone, np.minimum(np.float32(1.0), s * 2))
    ctx.sky_veil = (np.float32(0.45) + np.float32(0.55) * s).astype(np.float32)
    scene.sun_power *= np.float32(1.0) - s


# --- rain -------------------------------------------------------------------------------------


def rain_scene(ctx: RenderContext) -> None:
    """Overcast and darker; the road turns dark and wet."""
    s, scene = ctx.strength, ctx.scene
    dim = (np.float32(1.0) - np.float32(0.3) * s)[:, None]
    scene.sky_top = _mix(scene.sky_top, OVERCAST * dim * 0.85, s)
    scene.sky_horizon = _mix(scene.sky_horizon, OVERCAST * dim, s)
    scene.haze_colour = scene.sky_horizon.copy()
    scene.haze = scene.haze + np.float32(0.05) * s
    scene.sun_power *= np.float32(1.0) - s
    scene.asphalt *= (np.float32(1.0) - np.float32(0.5) * s)[:, None]
    scene.grass *= (np.float32(1.0) - np.float32(0.3) * s)[:, None]
    scene.verge *= (np.float32(1.0) - np.float32(0.3) * s)[:, None]
    scene.wet = s.copy()


def _streaks(drops: F32, length: int, slope: float) -> F32:
    """Motion-blur sparse drops into slanted streaks by summing shifted copies.

    A falling drop seen during one exposure is a thin, bright, semi-transparent streak (Garg &
    Nayar, "Detection and Removal of Rain from Videos", CVPR 2004).
    """
    out = drops.copy()
    for k in range(1, length):
        out += np.roll(drops, (k, round(k * slope)), axis=(1, 2))
    return out


def rain_air(ctx: RenderContext) -> None:
    """Mirror the sky onto the wet road, then streak falling drops across the frame."""
    cv, s, scene, maps = ctx.cv, ctx.strength, ctx.scene, ctx.maps
    assert cv is not None and maps is not None
    road = cv.rows(maps.top, cv.height)
    # A wet road mirrors what is above the horizon, about the horizon (grazing reflection).
    rows = np.arange(maps.top, cv.height, dtype=np.float32)
    mirror = np.rint(np.float32(2.0) * col(scene.horizon) * cv.height - rows[None, :, None] - 1.0)
    mirror = np.clip(mirror, 0, cv.height - 1).astype(np.intp)[:, None]  # (N, 1, R, 1)
    reflected = np.take_along_axis(cv.img, mirror, axis=2) * np.float32(0.8)
    shine = maps.road * col(s * np.float32(0.45)) * (np.float32(1.0) - np.float32(0.5) * maps.t_row)
    road.composite(shine, reflected)

    size = cv.height
    density = (np.float32(0.004) + np.float32(0.02) * s).reshape(-1, 1, 1)
    drops = (ctx.draws.field < density).astype(np.float32)
    length = max(2, size // 11)
    slant = ctx.draws.family.sign()
    streak = _streaks(drops, length, 0.3)
    flipped = streak[:, :, ::-1]
    right = col((slant > 0).astype(np.float32))
    streak = flipped + right * (streak - flipped)
    alpha = np.clip(streak * np.float32(0.22), 0.0, 0.5) * col(np.minimum(np.float32(1.0), s * 1.5))
    cv.composite(alpha, np.broadcast_to(np.array([0.82, 0.84, 0.88], np.float32), (scene.n, 3)))


# --- snow -------------------------------------------------------------------------------------


def snow_scene(ctx: RenderContext) -> None:
    """White verges, hills and trees; a snow-covered road with dark tyre tracks; pale sky."""
    s, scene = ctx.strength, ctx.scene
    deep = np.minimum(np.float32(1.0), np.float32(0.45) + np.float32(0.7) * s)
    scene.grass = _mix(scene.grass, SNOW_WHITE * 0.95, deep)
    scene.verge = _mix(scene.verge, SNOW_WHITE * 0.9, deep)
    scene.hill_colour = _mix(scene.hill_colour, SNOW_WHITE * 0.9, deep * 0.75)
    scene.treeline_colour = _mix(scene.treeline_colour, SNOW_WHITE * 0.8, deep * 0.35)
    scene.tree_colour = _mix(scene.tree_colour, SNOW_WHITE, deep * 0.4)
    scene.snow_cover = (np.float32(0.1) + np.float32(0.75) * s).astype(np.float32)
    pale = np.array([0.78, 0.80, 0.84], np.float32)
    scene.sky_top = _mix(scene.sky_top, pale * 0.95, s)
    scene.sky_horizon = _mix(scene.sky_horizon, pale, s)
    scene.haze_colour = scene.sky_horizon.copy()
    scene.haze = scene.haze + np.float32(0.04) * s
    scene.sun_power *= np.float32(1.0) - np.float32(0.8) * s


def snow_air(ctx: RenderContext) -> None:
    """Falling flakes: sparse bright dots, a little larger than a pixel at larger frame sizes."""
    cv, s, scene = ctx.cv, ctx.strength, ctx.scene
    assert cv is not None
    density = (np.float32(0.006) + np.float32(0.03) * s).reshape(-1, 1, 1)
    flakes = (ctx.draws.field < density).astype(np.float32)
    if cv.height >= 96:  # flakes of 2x2 pixels so they stay visible at larger sizes
        flakes = np.maximum(flakes, np.roll(flakes, 1, axis=1))
        flakes = np.maximum(flakes, np.roll(flakes, 1, axis=2))
    cv.composite(flakes * np.float32(0.9), np.broadcast_to(SNOW_WHITE, (scene.n, 3)))
