"""The camera in metres, for frames that are not square: a pinhole with a stated field of view.

A wide frame (``256x144``, ``1920x1080``) is rendered as a dashcam sees the road: a pinhole camera
with a horizontal field of view of ``HFOV_DEG`` mounted ``CAMERA_HEIGHT_M`` above a road of
``LANE_WIDTH_M`` lanes, so an object ``h`` metres tall ``Z`` metres ahead is ``f h / Z`` pixels
tall, with the focal length ``f = (W / 2) / tan(HFOV / 2)`` pixels. At 256x144 a 1.7 m pedestrian
is about 25 px tall at 15 m and 6 px at 60 m; at 1920x1080 the same person is 7.5 times larger.

The scene model (``scene.py``) is already a pinhole, in its own units: ground depth ``t = 1 / z``
and one screen scale ``lane_w t`` for both axes. A pinhole in metres fixes its two free numbers:
the camera height sets ``lane_w = (1 - horizon) L / h_cam`` (the ground below the horizon and the
lane's width come from the same projection), and the focal length sets how many metres one unit of
``z`` is, ``f_h L / lane_w`` (``f_h``: focal length in frame heights). Distances the square scene
draws in ``z`` (vehicles, trees, lamps, dash period) are kept in metres when ``lane_w`` changes, so
traffic is as far away as before, and haze is divided by the same factor, so the air is as clear
per metre as in a square frame.

Square frames keep the object-size rule they were tuned with (sizes stated in pixels of a 64 px
frame, see ``figures.py``): their benchmark figures are the reference, and a 64x64 frame under the
physical rule would show a pedestrian at 60 m as a fraction of a pixel.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

HFOV_DEG = 60.0
"""Horizontal field of view of a wide frame (a typical dashcam's is 60 to 70 degrees)."""
CAMERA_HEIGHT_M = (1.3, 1.5)
"""Camera height above the road, drawn per frame (a car's windscreen camera)."""
LANE_WIDTH_M = 3.5
"""The world's unit: scene sizes are stated in lane widths."""
OBJECT_DISTANCE_M = (15.0, 60.0)
"""Default distance range of pedestrians, animals and the first cone of a work zone."""
DISTANCE_LIMITS_M = (5.0, 250.0)
"""Distances a range may name: nearer, an object's feet fall below the frame; farther, the ground ends."""
STRENGTH_SPAN = (0.3, 1.0)
"""Strengths mapped onto the distance range: 0.3 (or less) is the far end, 1.0 the near end."""


def is_pinhole(height: int, width: int) -> bool:
    """Whether a frame of this shape is rendered with the physical camera (every non-square frame)."""
    return height != width


def focal_heights(height: int, width: int) -> float:
    """The focal length in units of the frame's height: ``(W / H) / (2 tan(HFOV / 2))``."""
    return (width / height) / (2.0 * math.tan(math.radians(HFOV_DEG) / 2.0))


def focal_pixels(height: int, width: int) -> float:
    """The focal length in pixels; an object ``h`` m tall ``Z`` m away is ``focal_pixels * h / Z`` px tall."""
    return focal_heights(height, width) * height


def distance_range(value: str | tuple[float, float] | list[float]) -> tuple[float, float]:
    """Parse ``"15-60"`` (metres) or a ``(near, far)`` pair; ValueError with the accepted form otherwise."""
    form = f"object distance must be NEAR-FAR in metres (e.g. 15-60), got {value!r}"
    if isinstance(value, str):
        try:
            near, far = (float(p) for p in value.strip().split("-"))
        except ValueError:
            raise ValueError(form) from None
    elif isinstance(value, tuple | list) and len(value) == 2:
        near, far = float(value[0]), float(value[1])
    else:
        raise ValueError(form)
    lo, hi = DISTANCE_LIMITS_M
    if not (math.isfinite(near) and math.isfinite(far) and lo <= near < far <= hi):
        bounds = f"{lo:g} <= NEAR < FAR <= {hi:g} metres"
        raise ValueError(f"object distance must satisfy {bounds}, got {near:g}-{far:g}")
    return (near, far)


def distance_for_strength(strength: F32, near: float, far: float) -> F32:
    """Distance in metres of an object of ``strength``: the far end at 0.3, the near end at 1.0.

    Interpolated in log distance, so strengths drawn uniformly give objects whose pixel sizes are
    spread evenly in log scale over the range (as many 6-8 px pedestrians as 20-25 px ones).
    """
    lo, hi = STRENGTH_SPAN
    q = np.clip((strength - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
    return (np.float32(far) * np.float32(near / far) ** q).astype(np.float32)
