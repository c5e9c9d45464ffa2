"""Render batches of frames: the pipeline from per-frame randomness to NHWC uint8.

world (sky, hills, road, props) -> family objects -> haze/fog -> air (lights, rain, snow) ->
roll -> lens (glare, dirt) -> softness and exposure -> sensor faults -> noise -> uint8.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

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
from training.synth.props import paint_props
from training.synth.scene import sample_scene

F32 = npt.NDArray[np.float32]
MIN_SIZE, MAX_SIZE = 32, 256
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
    alpha = np.exp(-col(scene.haze) * depth)
    alpha = np.float32(1.0) - alpha
    sky = (cv.depth >= SKY_DEPTH - 1).astype(np.float32)
    alpha += sky * (col(ctx.sky_veil) - alpha)
    cv.composite(alpha, scene.haze_colour)


def render_with_generators(
    generators: list[np.random.Generator], size: int, family: Family | None, strength: F32 | None = None
) -> tuple[npt.NDArray[np.uint8], F32]:
    """Render one frame per generator: ``(frames NHWC uint8, strengths)``.

    ``family`` None renders normal frames (strength 0). A None ``strength`` is drawn per frame,
    uniform in ``STRENGTH_RANGE``, from the frame's first family uniform (always consumed, so a
    given strength does not shift the frame's other draws).
    """
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    n = len(generators)
    draws = draw_frames(generators, size, with_field=family is not None and family.name in NEEDS_FIELD)
    scene = sample_scene(draws.base)
    lo, hi = STRENGTH_RANGE
    drawn = draws.family.uniform(lo, hi)
    if family is None:
        strength = np.zeros(n, np.float32)
    elif strength is None:
        strength = drawn
    strength = np.asarray(strength, np.float32)
    ctx = RenderContext(scene=scene, draws=draws, strength=strength, sky_veil=np.zeros(n, np.float32))
    hooks = family or Family("normal", "")
    if hooks.scene:
        hooks.scene(ctx)
    cv = ctx.cv = Canvas.blank(n, size)
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
    return quantise_with_noise(cv.img, draws.noise, scene.noise), strength
