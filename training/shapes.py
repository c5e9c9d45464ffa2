"""Model input sizes of the networks: H x W frames, halved by stride-2 stages down to a small core.

Sizes are parsed by ``contract.frames.frame_size`` (``64`` square, ``"256x144"`` W x H) and stored in
run configs as ``"WxH"`` strings; old configs with an int side still load. A network with ``s``
stride-2 stages needs both sides divisible by ``2**s``; its core is ``H / 2**s x W / 2**s``
(144x256 with 4 stages: 9x16; 64x64 with 4: 4x4).
"""

from __future__ import annotations

from typing import Any

from contract.frames import FrameSize, frame_size

MIN_SIDE, MAX_SIDE = 32, 512
MIN_CORE = 4  # the core's shorter side stays at least this (a 4x4 core at 64 px, as before)
MIN_STAGES = 3


def parse_size(value: Any) -> FrameSize:
    """A FrameSize from an int, ``"WxH"``, ``(h, w)`` or a FrameSize; ValueError with the forms."""
    return value if isinstance(value, FrameSize) else frame_size(value)


def size_text(value: Any) -> str:
    """The config form of a size: ``"WxH"`` (``"64x64"`` for an old int 64)."""
    return str(parse_size(value))


class SizedConfig:
    """What both trainers' configs do with their ``size`` field: store it as ``"WxH"`` (an old int 64
    reads as ``"64x64"``) and give it back parsed. A mixin for dataclasses with a ``size`` field."""

    size: Any

    def __post_init__(self) -> None:
        self.size = size_text(self.size)

    @property
    def frame_size(self) -> FrameSize:
        return parse_size(self.size)


def max_stages(size: FrameSize) -> int:
    """Stride-2 stages that keep both sides integral and the core's shorter side >= MIN_CORE."""
    h, w, stages = size.height, size.width, 0
    while h % 2 == 0 and w % 2 == 0 and min(h, w) // 2 >= MIN_CORE:
        h, w, stages = h // 2, w // 2, stages + 1
    return stages


def check_size(value: Any, *, stages: int | None = None, what: str = "network") -> FrameSize:
    """The parsed size, or a clear ValueError when the networks cannot take it.

    Without ``stages`` the default (:func:`max_stages`) must reach at least MIN_STAGES, so the core
    stays small; with ``stages`` both sides must be divisible by ``2**stages``.
    """
    size = parse_size(value)
    if not (MIN_SIDE <= size.height <= MAX_SIDE and MIN_SIDE <= size.width <= MAX_SIDE):
        raise ValueError(f"{what} size {size}: each side must be in {MIN_SIDE}..{MAX_SIDE}")
    if stages is None:
        if max_stages(size) < MIN_STAGES:
            raise ValueError(
                f"{what} size {size}: both sides must be divisible by {2**MIN_STAGES} (stride-2 stages "
                f"down to a small core), e.g. 256x144, 64x36, 48x32 or 64"
            )
    elif stages < 1 or size.height % 2**stages or size.width % 2**stages:
        raise ValueError(f"{what} size {size} is not divisible by 2**depth = {2**stages} on both sides")
    return size


def core(size: FrameSize, stages: int) -> tuple[int, int]:
    """(height, width) of the core after ``stages`` stride-2 stages."""
    return size.height // 2**stages, size.width // 2**stages
