"""Score graphs of a DCGAN run: uint8 NHWC frames in, ``score [N]`` (and an anomaly map) out.

Every graph scales inside (``x / 127.5 - 1``), runs its networks in eval mode (batch norm on running
statistics, spectral norm folded into plain weights) and has no batch-dependent Python control flow,
so ``torch.onnx.export`` with a dynamic batch axis gives the same numbers as torch.

Heads (higher = more anomalous):
- ``gan-disc``: ``-log D(x) = softplus(-logit)``, the discriminator's disbelief that x is real.
- ``gan-feat``: f-AnoGAN izi_f score (Schlegl et al. 2019): ``mean |x - G(E(x))|^2 + kappa *
  mean |f_D(x) - f_D(G(E(x)))|^2`` with the encoder E trained after the GAN; one pass, no latent search.
- ``gan-dfeat-knn``: mean cosine distance to the k nearest training normals in discriminator-feature
  space (per-stage channel mean and std of D's feature maps). A prior study on frames like ours found
  this family of score the strongest single head; a kNN distance needs no density model, so smooth
  low-complexity frames (fog, rain) are not mistaken for likely ones (Nalisnick et al. 2019).

Small objects stay near chance for every global score: that needs local evidence (the ``gan-patch``
head). Accuracy of each head: docs/benchmarks.md, "## Accuracy".

``load_gan(run_dir)`` and ``pooled_dfeatures`` are public: other heads (patch, combo) reuse them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.dcgan import DCGAN, Discriminator, Encoder, Generator, fold_spectral_norm
from training.heads.base import HeadSpec
from training.pixels import to_unit_range
from training.runs import load_model_file

log = logging.getLogger(__name__)

BANK_DIR = "banks"
DFEAT_BANK = "dfeat.pt"
DEFAULT_KNN_K = 5
DEFAULT_KAPPA = 1.0
_STD_EPS = 1e-6


def build_dcgan(config: dict[str, Any]) -> DCGAN:
    """The (untrained) DCGAN a resolved GAN config describes."""
    return DCGAN(
        size=config["size"],  # "WxH", or an int side in runs made before H x W sizes
        latent_dim=int(config["latent_dim"]),
        width=int(config["width"]),
        d_norm=str(config.get("d_norm", "batch")),
    )


def load_gan(run_dir: str | Path) -> tuple[DCGAN, dict[str, Any]]:
    """The trained DCGAN of a run (CPU, eval mode, spectral norm folded) and its resolved config."""
    payload = load_model_file(run_dir)
    if payload.get("kind") != "gan":
        raise ValueError(f"{run_dir} holds a {payload.get('kind')!r} model, not a GAN run")
    config = dict(payload["config"])
    model = build_dcgan(config)
    model.load_state_dict(payload["state_dict"])
    fold_spectral_norm(model)
    return model.eval(), config


def pooled_dfeatures(discriminator: Discriminator, x: torch.Tensor) -> torch.Tensor:
    """Unit-norm descriptor [N, F] of images in [-1, 1]: channel mean and std of every D stage.

    Mean and std per channel summarise each stage's feature map independently of position (the
    statistics style-transfer work matches, Huang & Belongie 2017); each stage's block is
    L2-normalised so that no stage dominates, then the whole vector, so dot products are cosines.
    """
    blocks = []
    for fmap in discriminator.features(x):
        flat = fmap.flatten(2)  # [N, C, H*W]
        mean = flat.mean(2)
        std = (flat.var(2, unbiased=False) + _STD_EPS).sqrt()
        blocks += [F.normalize(mean, dim=1), F.normalize(std, dim=1)]
    return F.normalize(torch.cat(blocks, dim=1), dim=1)


class DiscScoreGraph(nn.Module):
    """``gan-disc``: -log D(x) = softplus(-logit), numerically stable for confident logits."""

    def __init__(self, discriminator: Discriminator) -> None:
        super().__init__()
        self.discriminator = discriminator.eval()

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return F.softplus(-self.discriminator(to_unit_range(frames)))


class FeatResidualGraph(nn.Module):
    """``gan-feat``: f-AnoGAN izi_f score and the per-pixel squared residual summed over channels."""

    def __init__(
        self, generator: Generator, discriminator: Discriminator, encoder: Encoder, kappa: float
    ) -> None:
        super().__init__()
        self.generator = generator.eval()
        self.discriminator = discriminator.eval()
        self.encoder = encoder.eval()
        self.kappa = float(kappa)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_unit_range(frames)
        rec = self.generator(self.encoder(x))
        pixel = (x - rec).pow(2)  # [N, 3, H, W]
        feat = (self.discriminator.features(x)[-1] - self.discriminator.features(rec)[-1]).pow(2)
        score = pixel.mean(dim=(1, 2, 3)) + self.kappa * feat.mean(dim=(1, 2, 3))
        return score, pixel.sum(dim=1)


class DFeatKnnGraph(nn.Module):
    """``gan-dfeat-knn``: mean cosine distance to the k nearest bank descriptors (matmul + topk)."""

    def __init__(self, discriminator: Discriminator, bank: torch.Tensor, k: int) -> None:
        super().__init__()
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"the feature bank must be a non-empty [M, F] matrix, got {tuple(bank.shape)}")
        self.discriminator = discriminator.eval()
        self.register_buffer("bank_t", F.normalize(bank.float(), dim=1).t().contiguous())
        self.k = int(min(k, len(bank)))  # a constant, so topk exports with a fixed k

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        feats = pooled_dfeatures(self.discriminator, to_unit_range(frames))
        nearest = torch.topk(feats @ self.bank_t, self.k, dim=1).values  # [N, k] cosine similarities
        return (1.0 - nearest).mean(dim=1)


@torch.no_grad()
def compute_dfeat_bank(
    discriminator: Discriminator,
    frames: npt.NDArray[np.uint8],
    *,
    max_frames: int = 4000,
    seed: int = 0,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Descriptors [M, F] of up to ``max_frames`` training normals (a seeded random subset)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    idx = np.arange(len(frames))
    if len(idx) > max_frames:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), max_frames, replace=False))
    was_training = discriminator.training
    discriminator.eval()
    out = []
    for start in tqdm(range(0, len(idx), batch_size), desc="D-feature bank", unit="batch", leave=False):
        batch = torch.from_numpy(frames[idx[start : start + batch_size]]).to(device)
        out.append(pooled_dfeatures(discriminator, to_unit_range(batch)).cpu())
    discriminator.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def save_dfeat_bank(run_dir: str | Path, bank: torch.Tensor) -> Path:
    """Write ``RUN_DIR/banks/dfeat.pt`` = {"features": [M, F] float32, "pooling": ...}."""
    path = Path(run_dir) / BANK_DIR / DFEAT_BANK
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"features": bank.float().contiguous(), "pooling": "stage-channel-mean-std"}, tmp)
    tmp.replace(path)
    return path


def load_dfeat_bank(run_dir: str | Path) -> torch.Tensor:
    """Read the bank ``save_dfeat_bank`` wrote; a clear error when the run has none."""
    path = Path(run_dir) / BANK_DIR / DFEAT_BANK
    if not path.is_file():
        raise FileNotFoundError(
            f"no D-feature bank at {path}: it is written at the end of `edgecase train gan`"
        )
    return torch.load(path, map_location="cpu", weights_only=True)["features"]


def build_gan_disc(run_dir: Path) -> nn.Module:
    """Score graph of ``gan-disc``."""
    model, _ = load_gan(run_dir)
    return DiscScoreGraph(model.discriminator).eval()


def build_gan_feat(run_dir: Path) -> nn.Module:
    """Score graph of ``gan-feat`` (needs the encoder trained after the GAN)."""
    model, config = load_gan(run_dir)
    if not config.get("encoder_trained", False):
        log.warning("%s: the f-AnoGAN encoder was not trained (encoder_epochs=0); gan-feat is noise", run_dir)
    kappa = float(config.get("kappa", DEFAULT_KAPPA))
    return FeatResidualGraph(model.generator, model.discriminator, model.encoder, kappa).eval()


def build_gan_dfeat_knn(run_dir: Path) -> nn.Module:
    """Score graph of ``gan-dfeat-knn`` (needs ``RUN_DIR/banks/dfeat.pt``)."""
    model, config = load_gan(run_dir)
    bank = load_dfeat_bank(run_dir)
    return DFeatKnnGraph(model.discriminator, bank, int(config.get("knn_k", DEFAULT_KNN_K))).eval()


GAN_HEADS = [
    HeadSpec(
        name="gan-disc",
        kind="gan",
        units="nats",
        definition="-log D(x): the discriminator's negative log-probability that the frame is real",
        has_map=False,
        build=build_gan_disc,
    ),
    HeadSpec(
        name="gan-feat",
        kind="gan",
        units="mean squared residual",
        definition="f-AnoGAN izi_f (Schlegl et al. 2019): mean |x - G(E(x))|^2 over pixels plus kappa "
        "times mean squared discriminator-feature residual; map = per-pixel residual summed over channels",
        has_map=True,
        build=build_gan_feat,
    ),
    # The D-feature bank is part of training (phase 3 of training/gan_train.py, on the frames the
    # GAN trained on), so this head has no fit step of its own.
    HeadSpec(
        name="gan-dfeat-knn",
        kind="gan",
        units="cosine distance",
        definition="mean cosine distance to the k nearest training normals in discriminator-feature "
        "space (per-stage channel mean and std of D's feature maps)",
        has_map=False,
        build=build_gan_dfeat_knn,
    ),
]
