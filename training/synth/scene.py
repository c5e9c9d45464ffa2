"""What a normal frame shows, as per-frame parameter arrays, and the road geometry they imply.

The camera looks down a straight highway in clear daytime: the bulk of any fleet's data. Ground
points are addressed by lateral position ``u`` (in lane widths, lane boundaries at 0..lanes) and
depth ``t`` in (0, 1]: ``t = 1`` is the bottom row, ``t -> 0`` the horizon, and ground distance is
``z = 1 / t``. A point at (u, t) appears at

    y = horizon + t (1 - horizon),   x = vanish_x + curve (1 - t)^3 + (u - ego_u) lane_w t,

and an upright object of world height h (lane widths) at depth t is ``h lane_w t`` tall on screen,
the pinhole projection with one scale for both axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from training.synth.draws import Uniforms
from training.synth.pinhole import CAMERA_HEIGHT_M, LANE_WIDTH_M

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

N_TREES, N_CARS, N_LAMPS = 4, 3, 4
CAR_PALETTE = np.array(
    [
        [0.92, 0.92, 0.93],  # white
        [0.70, 0.72, 0.75],  # silver
        [0.42, 0.43, 0.45],  # grey
        [0.10, 0.10, 0.12],  # black
        [0.62, 0.10, 0.10],  # red
        [0.14, 0.22, 0.50],  # blue
        [0.10, 0.15, 0.28],  # dark blue
        [0.72, 0.66, 0.52],  # beige
        [0.20, 0.34, 0.22],  # green
    ],
    np.float32,
)


@dataclass
class Scene:
    """Per-frame parameters (arrays with a leading batch axis) of one rendered scene."""

    horizon: F32
    vanish_x: F32
    roll: F32
    lanes: I64
    lane_w: F32
    ego_u: F32
    curve: F32
    sky_top: F32
    sky_horizon: F32
    sun_x: F32
    sun_y: F32
    sun_radius: F32
    sun_power: F32
    hill_h: F32
    hill_freq: F32
    hill_phase: F32
    hill_colour: F32
    treeline_h: F32
    treeline_phase: F32
    treeline_colour: F32
    grass: F32
    verge: F32
    asphalt: F32
    marking: F32
    dashed: B
    left_yellow: B
    inner_yellow: B
    dash_period: F32
    dash_phase: F32
    line_hw: F32
    rail_left: B
    rail_right: B
    tree_on: B
    tree_z: F32
    tree_u: F32
    tree_size: F32
    tree_colour: F32
    lamps_on: B
    lamp_side: F32
    lamp_z0: F32
    lamp_spacing: F32
    car_on: B
    car_z: F32
    car_u: F32
    car_colour: F32
    car_height: F32
    car_truck: B
    """``(N, N_CARS)`` the vehicle is a lorry (a tall box trailer seen from behind)."""
    exposure: F32
    tint: F32
    haze: F32
    haze_colour: F32
    blur: F32
    noise: F32
    snow_cover: F32
    wet: F32
    camera_height: F32
    """``(N,)`` metres; only used by the pinhole camera of wide frames (``pinhole.py``)."""
    z_scale: F32
    """``(N,)`` factor the square scene's depths were multiplied by (1 unless ``use_pinhole`` ran)."""
    metres_per_z: F32
    """``(N,)`` metres per unit of depth ``z``; NaN in square frames, whose scene has no metric scale."""

    @property
    def pinhole(self) -> bool:
        """Whether these frames use the metric pinhole camera (``pinhole.use_pinhole``)."""
        return bool(np.isfinite(self.metres_per_z).all()) and self.n > 0

    @property
    def n(self) -> int:
        return int(self.horizon.shape[0])

    def ground_y(self, t: F32) -> F32:
        """Screen y of ground depth ``t`` (same shape as ``t``, per-frame params broadcast)."""
        h = _bcast(self.horizon, t)
        return h + t * (np.float32(1.0) - h)

    def ground_x(self, u: F32, t: F32) -> F32:
        """Screen x of the ground point at lateral ``u`` (lane widths) and depth ``t``."""
        return (
            _bcast(self.vanish_x, t)
            + _bcast(self.curve, t) * (np.float32(1.0) - t) ** 3
            + (u - _bcast(self.ego_u, t)) * _bcast(self.lane_w, t) * t
        )

    def scale(self, t: F32) -> F32:
        """Screen units per lane width at depth ``t``."""
        return _bcast(self.lane_w, t) * t


def _bcast(values: npt.NDArray, like: npt.NDArray) -> npt.NDArray:
    """Reshape per-frame ``(N,)`` values to broadcast against an ``(N, ...)`` array."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def _lerp(a: F32, b: F32, w: F32) -> F32:
    return a + (b - a) * w


def _rgb(r: Uniforms, base: tuple[float, float, float], jitter: float) -> F32:
    """A per-frame colour near ``base``."""
    return np.clip(np.array(base, np.float32) + r.uniform_k(3, -jitter, jitter), 0.0, 1.0)


def sample_scene(r: Uniforms) -> Scene:
    """Draw one normal scene per frame from the frames' uniforms (see module docstring)."""
    n = r.n
    horizon = r.uniform(0.36, 0.50)
    lanes = r.integers(2, 5)
    ego_lane = np.minimum((r.uniform() * lanes).astype(np.int64), lanes - 1)
    ego_u = ego_lane + np.float32(0.5) + r.uniform(-0.15, 0.15)

    # Clear sky: blue zenith (deep to pale) fading to a bright, slightly warm horizon.
    pale = r.uniform()[:, None]
    bright = r.uniform(0.82, 1.12)[:, None]
    sky_top = _lerp(np.array([0.20, 0.40, 0.78], np.float32), np.array([0.52, 0.68, 0.90], np.float32), pale)
    warm = (r.uniform() ** 3 * 0.12)[:, None] * np.array([1.0, 0.3, -0.8], np.float32)
    sky_horizon = _lerp(sky_top, np.array([0.88, 0.90, 0.93], np.float32), r.uniform(0.45, 0.85)[:, None])
    sky_top, sky_horizon = np.clip(sky_top * bright, 0, 1), np.clip((sky_horizon + warm) * bright, 0, 1)

    sun_y = r.uniform(-0.12, 1.0) * (horizon - 0.10)
    grass = (
        _lerp(
            np.array([0.20, 0.40, 0.14], np.float32),
            np.array([0.52, 0.49, 0.28], np.float32),
            (r.uniform() ** 2)[:, None],
        )
        * r.uniform(0.8, 1.1)[:, None]
    )
    hill_mix = r.uniform(0.35, 0.75)[:, None]
    grey = r.uniform(0.25, 0.42)

    car_on = r.take(N_CARS) < np.array([0.75, 0.5, 0.3])
    car_colour = CAR_PALETTE[
        np.minimum((r.take(N_CARS) * len(CAR_PALETTE)).astype(int), len(CAR_PALETTE) - 1)
    ]
    car_colour = np.clip(car_colour * r.uniform_k(N_CARS, 0.85, 1.1)[..., None], 0, 1).astype(np.float32)
    car_lane = np.minimum((r.take(N_CARS) * lanes[:, None]).astype(np.int64), lanes[:, None] - 1)
    car_u = (car_lane + 0.5 + r.uniform_k(N_CARS, -0.12, 0.12)).astype(np.float32)
    car_z = (1.35 + 8.0 * r.uniform_k(N_CARS) ** 2).astype(np.float32)  # mostly near

    side = np.where(r.take(N_TREES) < 0.5, -1.0, 1.0).astype(np.float32)
    out_by = r.uniform_k(N_TREES, 0.9, 3.0)
    tree_u = np.where(side < 0, -out_by, lanes[:, None] + out_by).astype(np.float32)
    tree_green = r.uniform_k(N_TREES, 0.0, 1.0)[..., None]
    tree_colour = _lerp(
        np.array([0.08, 0.22, 0.08], np.float32), np.array([0.22, 0.34, 0.12], np.float32), tree_green
    )

    lamps_on = r.bernoulli(0.3)
    white = r.uniform(0.82, 0.96)[:, None]
    return Scene(
        horizon=horizon,
        vanish_x=r.uniform(0.40, 0.60),
        roll=r.uniform(-0.035, 0.035),
        lanes=lanes,
        lane_w=r.uniform(0.42, 0.62),
        ego_u=ego_u.astype(np.float32),
        curve=r.uniform(-0.08, 0.08),
        sky_top=sky_top,
        sky_horizon=sky_horizon,
        sun_x=r.uniform(-0.05, 1.05),
        sun_y=sun_y,
        sun_radius=r.uniform(0.022, 0.045),
        sun_power=r.uniform(0.35, 0.9),
        hill_h=r.uniform(0.0, 0.09) * r.bernoulli(0.8),
        hill_freq=r.uniform_k(2, 3.0, 14.0),
        hill_phase=r.uniform_k(2, 0.0, 6.283),
        hill_colour=_lerp(grass * 0.8, sky_horizon, hill_mix),
        treeline_h=r.uniform(0.008, 0.03) * r.bernoulli(0.6),
        treeline_phase=r.uniform_k(3, 0.0, 6.283),
        treeline_colour=_rgb(r, (0.12, 0.22, 0.10), 0.04),
        grass=grass.astype(np.float32),
        verge=_rgb(r, (0.50, 0.47, 0.40), 0.06),
        asphalt=np.clip(grey[:, None] + r.uniform_k(3, -0.015, 0.015), 0, 1),
        marking=np.broadcast_to(white, (n, 3)).astype(np.float32),
        dashed=r.bernoulli(0.85),
        left_yellow=r.bernoulli(0.35),
        inner_yellow=r.bernoulli(0.08),
        dash_period=r.uniform(0.35, 0.7),
        dash_phase=r.uniform(),
        line_hw=r.uniform(0.018, 0.03),
        rail_left=r.bernoulli(0.45),
        rail_right=r.bernoulli(0.45),
        tree_on=r.take(N_TREES) < 0.55,
        tree_z=r.uniform_k(N_TREES, 1.8, 14.0),
        tree_u=tree_u,
        tree_size=r.uniform_k(N_TREES, 0.6, 1.4),
        tree_colour=tree_colour.astype(np.float32),
        lamps_on=lamps_on,
        lamp_side=r.sign(),
        lamp_z0=r.uniform(1.3, 3.0),
        lamp_spacing=r.uniform(2.0, 4.0),
        car_on=car_on,
        car_z=car_z,
        car_u=car_u,
        car_colour=car_colour,
        car_height=(0.9 + 0.6 * r.uniform_k(N_CARS) ** 3).astype(np.float32),
        car_truck=r.take(N_CARS) < 0.12,
        exposure=r.uniform(0.86, 1.12),
        tint=r.uniform_k(3, 0.97, 1.03),
        haze=r.uniform(0.012, 0.035),
        haze_colour=sky_horizon.copy(),
        blur=r.uniform(0.0, 0.8),
        noise=r.uniform(0.004, 0.02),
        snow_cover=np.zeros(n, np.float32),
        wet=np.zeros(n, np.float32),
        camera_height=r.uniform(*CAMERA_HEIGHT_M),  # drawn last: earlier draws stay as they were
        z_scale=np.ones(n, np.float32),
        metres_per_z=np.full(n, np.nan, np.float32),
    )


def use_pinhole(scene: Scene, focal: float) -> None:
    """Make the scene a metric pinhole camera with ``focal`` (in frame heights); see ``pinhole.py``.

    ``lane_w`` follows from the camera height; every depth the square scene drew keeps its metres.
    """
    lane_w = ((np.float32(1.0) - scene.horizon) * np.float32(LANE_WIDTH_M) / scene.camera_height).astype(
        np.float32
    )
    ratio = (lane_w / scene.lane_w).astype(np.float32)
    scene.lane_w = lane_w
    scene.z_scale = ratio
    scene.metres_per_z = (np.float32(focal * LANE_WIDTH_M) / lane_w).astype(np.float32)
    scene.car_z = (scene.car_z * ratio[:, None]).astype(np.float32)
    scene.tree_z = (scene.tree_z * ratio[:, None]).astype(np.float32)
    scene.lamp_z0 = (scene.lamp_z0 * ratio).astype(np.float32)
    scene.lamp_spacing = (scene.lamp_spacing * ratio).astype(np.float32)
    scene.dash_period = (scene.dash_period * ratio).astype(np.float32)


def depth_at(scene: Scene, metres: F32) -> F32:
    """Depth parameter ``t`` of a ground point ``metres`` ahead (pinhole scenes only)."""
    return (scene.metres_per_z / metres).astype(np.float32)
