"""Default CPU budgets of ``edgecase train`` per frame size: what a run gets for flags left out.

At 256x144 (the default size) both runs together, with every head fitted and calibrated, are meant to
take at most 30 minutes on a 2-core machine (8,000 training and 1,000 validation frames). Estimated
from per-step times measured on the shared machine (2026-12-07, load 1.5-4): VAE run about 13
minutes (5 training, seg 1.5, patch bank 1, combo statistics 2.5, calibration 2.5), GAN run about 13
(7-9 training with the encoder's last epoch, seg 1, patch bank 0.7, combo 2, calibration 2); the
measured 30-minute run belongs in docs/benchmarks.md. Square sizes up to 64x64 keep the budgets
the 64x64 accuracy figures were measured with.

The dataclass defaults (``VAEConfig``, ``GANConfig``) are the 256x144 budgets; :func:`size_budgets`
is what the CLI applies for other sizes, field by field, only where the user gave no value. Above
64x64 the trainers also leave :data:`DEFERRED_LARGE` heads uncalibrated (evaluate and export
calibrate them on demand).
"""

from __future__ import annotations

from typing import Any

from training.shapes import parse_size

SMALL_PIXELS = 64 * 64

# kind -> field -> value, for frames of at most SMALL_PIXELS pixels (the budgets before H x W sizes)
SMALL: dict[str, dict[str, Any]] = {
    "vae": {"max_minutes": 7.0, "seg_steps": 2400},
    "gan": {"max_minutes": 15.0, "seg_steps": 2400, "width": 32},
}
# and above. 256x144 per step on the shared 2-core machine: VAE 1.6-5.3 s (batch 64), GAN width 16
# 1.1-1.3 s (width 32: 9.5 s, so 16 here), f-AnoGAN encoder 1.0-1.1 s, seg net 0.23-0.84 s (32 windows)
LARGE: dict[str, dict[str, Any]] = {
    "vae": {"max_minutes": 5.0, "seg_steps": 250},
    "gan": {"max_minutes": 7.0, "seg_steps": 250, "width": 16},
}


# Heads the trainers leave for evaluate/export to calibrate at sizes above SMALL_PIXELS: vae-iwae decodes
# 16 samples per frame (about 0.3-0.6 s a frame at 256x144 on 2 cores, 5-10 minutes on 1,000 val
# normals), more than the rest of the VAE run's calibration together.
DEFERRED_LARGE = ("vae-iwae",)


def deferred_heads(size: Any) -> tuple[str, ...]:
    """Heads whose calibration the trainers leave to evaluate/export at ``size``."""
    return () if parse_size(size).pixels <= SMALL_PIXELS else DEFERRED_LARGE


def size_budgets(kind: str, size: Any) -> dict[str, Any]:
    """The default budget fields of a ``kind`` run at ``size`` (``"WxH"``, int or ``(h, w)``)."""
    if kind not in SMALL:
        raise ValueError(f"unknown run kind {kind!r}; valid: {', '.join(SMALL)}")
    table = SMALL if parse_size(size).pixels <= SMALL_PIXELS else LARGE
    return dict(table[kind])
