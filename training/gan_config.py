"""The configuration of ``edgecase train gan``: hyper-parameters, their checks and the resolved config.

Defaults and their reasons are in training/gan_train.py's docstring; ``config_from_saved`` is what a
``--resume`` keeps from the run (everything but budgets and where it runs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from contract.frames import RESIZE_RULE
from training import runs
from training.data import TrainingData, fingerprint_frames
from training.shapes import SizedConfig, check_size

# Fields a --resume may change (budgets and where it runs); the rest come from the run's config.json.
_RESUMABLE_FIELDS = (
    "epochs",
    "encoder_epochs",
    "patience",
    "max_minutes",
    "device",
    "amp",
    "num_workers",
    "calibrate",
)
STABILISERS = ("none", "spectral", "r1", "label-smoothing")
DRY_RUN_FRAMES = 16  # train frames in a dry run (val gets 10% more, at least 1)


@dataclass
class GANConfig(SizedConfig):
    """Hyper-parameters of ``edgecase train gan``; defaults: the 256x144 CPU budgets (training/budgets.py)."""

    size: int | str = "256x144"  # "WxH" (an int: square); stored as "WxH"
    batch_size: int = 64
    epochs: int = 10
    lr: float = 2e-4
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bfloat16 autocast, CUDA only
    patience: int = 3  # encoder phase only (the GAN phase has no validation loss to stop on)
    max_minutes: float | None = 7.0  # whole run (GAN phase: GAN_TIME_SHARE); 256x144 budget, 15 at 64x64
    dry_run: bool = False
    num_workers: int = 0  # frames live in memory; kept for a common CLI with the VAE
    latent_dim: int = 100
    width: int = 16  # 256x144 budget (a step at width 32 costs 7x as much); 32 at 64x64
    stabiliser: str = "r1"  # measured best (docs/benchmarks.md, "GAN stabilisers")
    r1_gamma: float = 0.1  # 10 (the StyleGAN default at 1024 px) stalls learning at 32-64 px
    r1_every: int = 4
    label_smoothing: float = 0.1
    beta1: float = 0.5
    beta2: float = 0.999
    encoder_epochs: int = 8
    encoder_lr: float = 5e-4
    kappa: float = 1.0
    bank_size: int = 4000
    knn_k: int = 5
    max_frames: int | None = None  # cap on training frames per source (quick experiments)
    calibrate: bool = True  # calibrate every head on the val normals at the end
    seg_steps: int = 250  # steps of the <kind>-seg head's net (0: none); 256x144 budget, 2400 at 64x64

    def stabilisers(self) -> frozenset[str]:
        """The parsed ``stabiliser`` spec ("spectral+r1" -> {"spectral", "r1"})."""
        parts = frozenset(p.strip() for p in self.stabiliser.split("+") if p.strip())
        unknown = parts - set(STABILISERS)
        if not parts or unknown:
            raise ValueError(
                f"unknown stabiliser {self.stabiliser!r}; valid: {', '.join(STABILISERS)} (join with +)"
            )
        if "none" in parts and len(parts) > 1:
            raise ValueError(f"stabiliser 'none' cannot be combined: {self.stabiliser!r}")
        return parts - {"none"}

    def validate(self) -> None:
        """Clear errors for bad values before any work starts."""
        check_size(self.size, what="GAN")
        self.stabilisers()
        for name in ("batch_size", "latent_dim", "width", "r1_every", "knn_k", "bank_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "encoder_epochs", "patience", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.lr <= 0 or self.encoder_lr <= 0 or self.r1_gamma < 0 or self.kappa < 0:
            raise ValueError("lr and encoder_lr must be > 0, r1_gamma and kappa >= 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 (or None), got {self.max_minutes}")


def noise_data(cfg: GANConfig) -> TrainingData:
    """Seeded noise frames: a dry run without ``--data`` still pushes a batch through every step."""
    rng = np.random.default_rng(cfg.seed)
    frames = rng.integers(0, 256, (DRY_RUN_FRAMES + 4, *cfg.frame_size, 3), dtype=np.uint8)
    train, val = frames[:DRY_RUN_FRAMES], frames[DRY_RUN_FRAMES:]
    return TrainingData(train, val, sources=[], fingerprint=fingerprint_frames(train, val))


def resolved_config(cfg: GANConfig, data: TrainingData, device: torch.device) -> dict[str, Any]:
    stabilisers = sorted(cfg.stabilisers())
    return {
        **asdict(cfg),
        "kind": "gan",
        "d_norm": "spectral" if "spectral" in stabilisers else "batch",
        "stabilisers": stabilisers,
        "encoder_trained": False,
        "resize_rule": RESIZE_RULE,  # how the frames were brought to size (training/data.py)
        "data": data.sources,
        "data_fingerprint": data.fingerprint,
        "n_train": len(data.train),
        "n_val": len(data.val),
        "resolved_device": str(device),
        "versions": runs.package_versions(),
    }


def config_from_saved(saved: dict[str, Any], cfg: GANConfig) -> GANConfig:
    """On --resume the run's own hyper-parameters win, except budgets and where it runs."""
    names = {f.name for f in fields(GANConfig)}
    resumed = GANConfig(**{k: v for k, v in saved.items() if k in names})
    for name in _RESUMABLE_FIELDS:
        setattr(resumed, name, getattr(cfg, name))
    return resumed
