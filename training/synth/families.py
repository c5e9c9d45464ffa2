"""The edge-case families: names, what each looks like, and where in the pipeline it acts."""

from __future__ import annotations

from training.synth.context import Family
from training.synth.figures import (
    animal_world,
    construction_world,
    pedestrian_world,
    sharp_curve_scene,
    sharp_curve_world,
)
from training.synth.optics import glare_lens, glare_scene, lens_dirt_lens, sensor_fault_sensor
from training.synth.weather import (
    fog_scene,
    night_air,
    night_scene,
    rain_air,
    rain_scene,
    snow_air,
    snow_scene,
)

NORMAL = "normal"
_FAMILIES = (
    Family("night", "dark, with headlights, tail-lights and street lamps", scene=night_scene, air=night_air),
    Family("fog", "contrast falls towards grey with distance", scene=fog_scene),
    Family("rain", "overcast, darker, wet reflective road, rain streaks", scene=rain_scene, air=rain_air),
    Family("snow", "white verges and road with tyre tracks, falling flakes", scene=snow_scene, air=snow_air),
    Family("pedestrian", "a small person on or beside the road", world=pedestrian_world),
    Family("animal", "a deer or a dog on the road", world=animal_world),
    Family(
        "sharp_curve",
        "the road bends strongly left or right",
        scene=sharp_curve_scene,
        world=sharp_curve_world,
    ),
    Family("construction", "orange cones and a striped barrier: a work zone", world=construction_world),
    Family("glare", "low sun flare and bloom washing out the frame", scene=glare_scene, lens=glare_lens),
    Family("lens_dirt", "blurry dark and brown blotches on the lens", lens=lens_dirt_lens),
    Family(
        "sensor_fault",
        "dead rows/columns, a dropped colour channel or heavy noise",
        sensor=sensor_fault_sensor,
    ),
)
FAMILY_BY_NAME: dict[str, Family] = {f.name: f for f in _FAMILIES}
FAMILIES: tuple[str, ...] = tuple(FAMILY_BY_NAME)
"""Edge-case family names, in the order used for ids, contact sheets and reports."""
NEEDS_FIELD = frozenset({"rain", "snow", "sensor_fault"})
"""Families that draw a per-pixel texture field (drops, flakes, dead pixels)."""


def family_id(name: str) -> int:
    """Stable small integer for a family (0 = normal), part of each frame's seed."""
    if name == NORMAL:
        return 0
    if name not in FAMILY_BY_NAME:
        raise ValueError(f"unknown family {name!r}; valid: {', '.join((NORMAL, *FAMILIES))}")
    return 1 + FAMILIES.index(name)
