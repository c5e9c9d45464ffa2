"""The one pixel scaling: uint8 NHWC frames <-> float NCHW in [-1, 1].

Every network (VAE, DCGAN, the seg net, the patch features) and every score graph scales with
:func:`to_unit_range`, paired with a Tanh output (pytorch/examples' ``Normalize(0.5, 0.5)``); the
service never scales, because the exported graph does (docs/architecture.md, "Score graphs").
"""

from __future__ import annotations

import torch


def to_unit_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]: ``x = frames / 127.5 - 1``."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8_frames(x: torch.Tensor) -> torch.Tensor:
    """float NCHW in [-1, 1] -> uint8 NHWC (clamped, rounded): the inverse, for plots and sample grids."""
    return ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
