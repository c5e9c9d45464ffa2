"""Per-frame random streams, so a frame depends only on (seed, split, family, index).

Every frame owns a numpy ``Generator`` seeded with ``SeedSequence(seed, spawn_key=(split, family,
index))``. Its uniforms are drawn in one Python loop per batch and then mapped to scene parameters
column by column, vectorised over the batch. The same frame therefore comes out bit-identical
whatever the batch size or the order in which batches are rendered.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

BASE_UNIFORMS = 160
"""Uniforms per frame for the normal scene (sky, road, vehicles, camera); unused ones are spare."""
FAMILY_UNIFORMS = 64
"""Uniforms per frame for the edge-case family (strength, positions, modes)."""

F32 = npt.NDArray[np.float32]


class Uniforms:
    """Hands out columns of an ``(N, K)`` matrix of uniforms in a fixed order.

    Consuming columns in code order (rather than calling a Generator per parameter) keeps every
    parameter vectorised over the batch while each row still comes from that frame's own stream.
    """

    def __init__(self, matrix: npt.NDArray[np.float64]) -> None:
        self._m = matrix
        self._next = 0

    @property
    def n(self) -> int:
        return int(self._m.shape[0])

    def take(self, k: int = 1) -> npt.NDArray[np.float64]:
        """The next ``k`` columns, shape ``(N, k)``."""
        if self._next + k > self._m.shape[1]:
            raise RuntimeError(f"ran out of per-frame uniforms ({self._m.shape[1]}); raise the budget")
        cols = self._m[:, self._next : self._next + k]
        self._next += k
        return cols

    def uniform(self, lo: float | F32 = 0.0, hi: float | F32 = 1.0) -> F32:
        """One value per frame, uniform in ``[lo, hi)``."""
        u = self.take(1)[:, 0].astype(np.float32)
        return np.float32(lo) + u * (np.float32(hi) - np.float32(lo))

    def uniform_k(self, k: int, lo: float = 0.0, hi: float = 1.0) -> F32:
        """``k`` values per frame, shape ``(N, k)``."""
        return (lo + self.take(k) * (hi - lo)).astype(np.float32)

    def bernoulli(self, p: float | F32) -> npt.NDArray[np.bool_]:
        """True with probability ``p`` (per frame)."""
        return self.take(1)[:, 0] < p

    def integers(self, lo: int, hi: int) -> npt.NDArray[np.int64]:
        """Integers in ``[lo, hi)``, one per frame."""
        return np.minimum(lo + np.floor(self.take(1)[:, 0] * (hi - lo)).astype(np.int64), hi - 1)

    def sign(self) -> F32:
        """-1 or +1 with equal odds."""
        return np.where(self.take(1)[:, 0] < 0.5, -1.0, 1.0).astype(np.float32)


@dataclass
class FrameDraws:
    """Everything random about a batch of frames, drawn from the frames' own generators."""

    base: Uniforms
    family: Uniforms
    noise: npt.NDArray[np.uint8]
    """``(N, 3, H, W)`` uniform random bytes for sensor noise (256 levels are plenty for noise)."""
    field: F32
    """``(N, H, W)`` uniforms for family textures (rain, snow, dead pixels)."""


def frame_generators(seed: int, stream: tuple[int, ...], indices: Iterable[int]) -> list[np.random.Generator]:
    """One independent Generator per frame index within ``stream`` (e.g. ``(split_id, family_id)``)."""
    return [np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*stream, int(i)))) for i in indices]


def draw_frames(
    generators: list[np.random.Generator], size: int | tuple[int, int], with_field: bool = False
) -> FrameDraws:
    """Draw each frame's uniforms and noise fields in a fixed order from its own generator.

    ``with_field`` adds a per-pixel texture field for the families that need one; it is drawn
    last, so it does not change the other draws.
    """
    h, w = (size, size) if isinstance(size, int) else size
    n = len(generators)
    uniforms = np.empty((n, BASE_UNIFORMS + FAMILY_UNIFORMS))
    noise = np.empty((n, 3 * h * w), np.uint8)
    field = np.empty((n, h, w) if with_field else (n, 0, 0), np.float32)
    for i, gen in enumerate(generators):
        gen.random(out=uniforms[i])
        noise[i] = np.frombuffer(gen.bytes(3 * h * w), np.uint8)
        if with_field:
            gen.random(out=field[i], dtype=np.float32)
    base, family = uniforms[:, :BASE_UNIFORMS], uniforms[:, BASE_UNIFORMS:]
    return FrameDraws(Uniforms(base), Uniforms(family), noise.reshape(n, 3, h, w), field)
