"""The state an edge-case family sees while a batch is rendered, and the family hook type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from training.synth.canvas import Canvas
from training.synth.draws import FrameDraws
from training.synth.landscape import RoadMaps
from training.synth.pinhole import OBJECT_DISTANCE_M
from training.synth.props import Lights
from training.synth.scene import Scene

F32 = npt.NDArray[np.float32]


@dataclass
class RenderContext:
    """One batch in flight: its scene, canvas and the maps later stages reuse."""

    scene: Scene
    draws: FrameDraws
    strength: F32
    """``(N,)`` edge-case strength in [0, 1] (0 for normal frames)."""
    cv: Canvas | None = None
    maps: RoadMaps | None = None
    lights: Lights | None = None
    sky_veil: F32 = field(default_factory=lambda: np.zeros(0, np.float32))
    """``(N,)`` how much fog hides the sky (0 keeps the sky gradient)."""
    object_distance: tuple[float, float] = OBJECT_DISTANCE_M
    """``(near, far)`` metres objects are placed at in pinhole (wide) frames."""
    distance: F32 = field(default_factory=lambda: np.zeros(0, np.float32))
    """``(N,)`` metres to the family's object (pinhole frames with an object; NaN otherwise)."""


Hook = Callable[[RenderContext], None]


@dataclass(frozen=True)
class Family:
    """An edge-case family: hooks at the pipeline stages where its effect physically happens.

    ``scene`` edits parameters before painting (weather colours, a sharp curve), ``world`` paints
    objects into the world (occluded and fogged like everything else), ``air`` adds what is
    between the world and the lens (lights at night, rain, snow), ``lens`` acts on the optics (glare,
    dirt) and ``sensor`` on the read-out (dead lines, dropped channel, heavy noise).
    """

    name: str
    description: str
    scene: Hook | None = None
    world: Hook | None = None
    air: Hook | None = None
    lens: Hook | None = None
    sensor: Hook | None = None
