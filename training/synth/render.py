"""Render batches of frames: the pipeline from per-frame randomness to NHWC uint8.

world (sky, hills, road, props) -> family objects -> haze/fog -> air (lights, rain, snow) ->
roll -> lens (glare, dirt) -> softness and exposure -> sensor faults -> noise -> uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from contract.frames import FrameSize, frame_size
from training.synth.camera import apply_roll, quantise_with_noise, soften_and_expose
from training.synth.canvas import SKY_DEPTH, Canvas, col
from training.synth.context import Family, RenderContext
from training.synth.draws import draw_frames
from training.synth.families import NEEDS_FIELD
from training.synth.landscape import (
    MAX_GROUND_DEPTH,
    paint_hills,
    paint_road,
    paint_sky_and_ground,
    paint_sun,
)
from training.synth.pinhole import OBJECT_DISTANCE_M, focal_heights, is_pinhole
from training.synth.props import paint_props
from training.synth.scene import sample_scene, use_pinhole

F32 = npt.NDArray[np.float32]
MIN_SIZE, MAX_SIZE = 32, 256
"""Sides of a square frame (the sizes square models are trained at)."""
MIN_SIDE, MAX_SIDE = 32, 4096
"""Sides of a frame that is not square (up to 4K, for decode and end-to-end benchmarks)."""
STRENGTH_RANGE = (0.3, 1.0)
"""Strengths drawn per frame when none is given (what the test split uses)."""


def apply_haze(ctx: RenderContext) -> None:
    """Aerial perspective and fog: blend towards the haze colour by ``1 - exp(-density * depth)``.

    This is Koschmieder's law as used in vision (Narasimhan & Nayar, "Vision and the Atmosphere",
    IJCV 2002): attenuation of the object's light plus airlight, both set by distance. The sky
    keeps its gradient unless fog veils it (``sky_veil``).
    """
    cv, scene = ctx.cv, ctx.scene
    assert cv is not None
    depth = np.minimum(cv.depth, MAX_GROUND_DEPTH)
    # Per unit of depth in a square frame; a pinhole scene's depths were stretched by z_scale to keep
    # their metres, so its haze per unit shrinks by the same factor (the same haze per metre).
    haze = scene.haze if not scene.pinhole else (scene.haze / scene.z_scale).astype(np.float32)
    alpha = np.exp(-col(haze) * depth)
    alpha = np.float32(1.0) - alpha
    sky = (cv.depth >= SKY_DEPTH - 1).astype(np.float32)
    alpha += sky * (col(ctx.sky_veil) - alpha)
    cv.composite(alpha, scene.haze_colour)


def check_size(size: int | str | tuple[int, int]) -> FrameSize:
    """The frame size to render, parsed by ``contract.frames.frame_size``: ``64``, ``"256x144"``, ``(h, w)``.

    Square frames keep the 32..256 range they always had; other shapes may have sides up to 4096.
    """
    parsed = frame_size(size)  # ValueError "size must be N or WxH ..." for anything else
    h, w = parsed
    if h == w and not MIN_SIZE <= h <= MAX_SIZE:
        raise ValueError(f"size of a square frame must be from {MIN_SIZE} to {MAX_SIZE} pixels, got {parsed}")
    if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        raise ValueError(f"size sides must be from {MIN_SIDE} to {MAX_SIDE} pixels, got {parsed}")
    return parsed


@dataclass
class Rendered:
    """A rendered batch: frames NHWC uint8, strengths, and metres to each frame's object."""

    frames: npt.NDArray[np.uint8]
    strength: F32
    distance: F32
    """``(N,)`` metres to the pedestrian, animal or first cone in wide frames; NaN where there is none."""


def render_frames(
    generators: list[np.random.Generator],
    size: int | str | tuple[int, int],
    family: Family | None,
    strength: F32 | None = None,
    *,
    object_distance: tuple[float, float] = OBJECT_DISTANCE_M,
) -> Rendered:
    """Render one frame per generator (see ``render_with_generators``), with the objects' distances."""
    height, width = check_size(size)
    n = len(generators)
    draws = draw_frames(
        generators, (height, width), with_field=family is not None and family.name in NEEDS_FIELD
    )
    scene = sample_scene(draws.base)
    if is_pinhole(height, width):
        use_pinhole(scene, focal_heights(height, width))
    lo, hi = STRENGTH_RANGE
    drawn = draws.family.uniform(lo, hi)
    if family is None:
        strength = np.zeros(n, np.float32)
    elif strength is None:
        strength = drawn
    strength = np.asarray(strength, np.float32)
    ctx = RenderContext(
        scene=scene,
        draws=draws,
        strength=strength,
        sky_veil=np.zeros(n, np.float32),
        object_distance=object_distance,
        distance=np.full(n, np.nan, np.float32),
    )
    hooks = family or Family("normal", "")
    if hooks.scene:
        hooks.scene(ctx)
    cv = ctx.cv = Canvas.blank(n, height, width)
    t_row, below = paint_sky_and_ground(scene, cv)
    paint_sun(scene, cv, below)
    paint_hills(scene, cv)
    ctx.maps = paint_road(scene, cv, t_row, below)
    ctx.lights = paint_props(scene, cv, t_row, below)
    if hooks.world:
        hooks.world(ctx)
    apply_haze(ctx)
    if hooks.air:
        hooks.air(ctx)
    apply_roll(cv, scene.roll)
    if hooks.lens:
        hooks.lens(ctx)
    soften_and_expose(cv, scene.blur, scene.exposure, scene.tint)
    if hooks.sensor:
        hooks.sensor(ctx)
    frames = quantise_with_noise(cv.img, draws.noise, scene.noise)
    return Rendered(frames, strength, ctx.distance)


def render_with_generators(
    generators: list[np.random.Generator],
    size: int | str | tuple[int, int],
    family: Family | None,
    strength: F32 | None = None,
    *,
    object_distance: tuple[float, float] = OBJECT_DISTANCE_M,
) -> tuple[npt.NDArray[np.uint8], F32]:
    """Render one frame per generator: ``(frames NHWC uint8, strengths)``.

    ``size`` is a side (square), ``"WxH"`` or ``(height, width)``. ``family`` None renders normal
    frames (strength 0). A None ``strength`` is drawn per frame, uniform in ``STRENGTH_RANGE``, from
    the frame's first family uniform (always consumed, so a given strength does not shift the
    frame's other draws). ``object_distance`` (metres) places objects in wide frames.
    """
    out = render_frames(generators, size, family, strength, object_distance=object_distance)
    return out.frames, out.strength
