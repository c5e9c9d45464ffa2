"""``render_batch``: frames of one family as a uint8 NHWC array, for tests, notebooks and other code."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from contract.frames import frame_size
from training.synth.draws import frame_generators
from training.synth.families import FAMILY_BY_NAME, NORMAL, family_id
from training.synth.pinhole import OBJECT_DISTANCE_M, distance_range
from training.synth.render import check_size, render_frames

SizeLike = int | str | tuple[int, int]


def chunk_frames(size: SizeLike) -> int:
    """Frames rendered at once: 512 at 64x64 (numpy call overhead amortised), fewer when larger.

    Counted in pixels, so a chunk's float buffers stay around 25 MB whatever the frame's shape: 113
    frames at 256x144, one at 1920x1080 (whose own buffers are then a few hundred MB at most).
    """
    pixels = frame_size(size).pixels
    return max(1, min(512, 512 * 64 * 64 // pixels))


def _generators(
    rng_or_seed: int | np.random.Generator, n: int, stream: tuple[int, ...]
) -> list[np.random.Generator]:
    if isinstance(rng_or_seed, np.random.Generator):
        return list(rng_or_seed.spawn(n))
    if isinstance(rng_or_seed, bool) or not isinstance(rng_or_seed, int | np.integer):
        raise TypeError(
            f"rng_or_seed must be an int seed or a numpy Generator, got {type(rng_or_seed).__name__}"
        )
    return frame_generators(int(rng_or_seed), stream, range(n))


def check_strength(
    family: str, strength: float | npt.ArrayLike | None, n: int
) -> npt.NDArray[np.float32] | None:
    """Per-frame strengths from the caller's value(s), or None to draw them per frame."""
    if strength is None:
        return None
    values = np.broadcast_to(np.asarray(strength, np.float32), (n,)).copy()
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"strength must be in [0, 1], got {values.min():g}..{values.max():g}")
    if family == NORMAL and np.any(values != 0):
        raise ValueError("normal frames have strength 0")
    return values


def render_generators(
    generators: list[np.random.Generator],
    size: SizeLike,
    family: str,
    strengths: npt.NDArray[np.float32] | None,
    object_distance: tuple[float, float] = OBJECT_DISTANCE_M,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Render one frame per generator, in chunks (chunking never changes a pixel)."""
    fam = None if family == NORMAL else FAMILY_BY_NAME[family]
    height, width = check_size(size)
    out = np.empty((len(generators), height, width, 3), np.uint8)
    used = np.zeros(len(generators), np.float32)
    chunk = chunk_frames((height, width))
    for start in range(0, len(generators), chunk):
        stop = start + chunk
        given = None if strengths is None else strengths[start:stop]
        part = render_frames(
            generators[start:stop], (height, width), fam, given, object_distance=object_distance
        )
        out[start:stop], used[start:stop] = part.frames, part.strength
    return out, used


def render_batch(
    rng_or_seed: int | np.random.Generator,
    n: int,
    size: SizeLike,
    family: str = NORMAL,
    strength: float | npt.ArrayLike | None = None,
    *,
    object_distance: tuple[float, float] | str = OBJECT_DISTANCE_M,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Render ``n`` frames of ``family``: ``(frames uint8 [n, H, W, 3], strengths float32 [n])``.

    ``size`` is a side (``64``: square), ``"WxH"`` (``"256x144"``) or ``(height, width)``. With an
    int seed, frame ``i`` is the same whatever ``n`` is (its seed is (seed, family, i)). With a
    Generator, per-frame generators are spawned from it. ``strength`` is a float or one value per
    frame in [0, 1]; None draws uniform strengths in 0.3..1.0 (0 for normal frames).
    ``object_distance`` (metres, ``(near, far)`` or ``"15-60"``) places objects in wide frames.
    """
    family_id(family)  # validates the name
    parsed = check_size(size)
    distances = distance_range(object_distance)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    generators = _generators(rng_or_seed, int(n), (RENDER_STREAM, family_id(family)))
    return render_generators(generators, parsed, family, check_strength(family, strength, int(n)), distances)


RENDER_STREAM = 99
"""Stream id of ``render_batch`` with an int seed (dataset splits use 0, 1, 2)."""
