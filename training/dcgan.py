"""DCGAN networks (Radford et al. 2016) and the f-AnoGAN encoder (Schlegl et al. 2019).

Generator: z -> transposed convolutions with batch norm and ReLU, doubling the resolution per stage,
Tanh output in [-1, 1] (pixels are scaled ``x / 127.5 - 1`` everywhere, see docs/architecture.md).
Discriminator: strided convolutions with LeakyReLU(0.2), batch norm, or no batch norm and spectral norm
on every layer (Miyato et al. 2018, SN-GAN), which is the stabiliser that removes batch-statistics
coupling from D altogether. Encoder: the discriminator's body with ``latent_dim`` outputs.

Frames are H x W (``size``: ``"WxH"``, an int side, or ``(H, W)``; training/shapes.py): the stride-2
stages go down to a small core (64x64 -> 4x4 in 4 stages, 256x144 -> 16x9 in 4); the generator's
first layer and D's and E's heads are core-sized kernels. Channels are ``width * 2**stage``, capped at
``width * 8``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from training.shapes import check_size, core, max_stages


def num_stages(size: Any) -> int:
    """Resolution stages between ``size`` and the core (64 -> 4, 256x144 -> 4); clear error for bad sizes."""
    return max_stages(check_size(size, what="GAN"))


def core_size(size: Any) -> tuple[int, int]:
    """(h, w) of the core: 64 -> (4, 4), 256x144 -> (9, 16)."""
    frame = check_size(size, what="GAN")
    return core(frame, max_stages(frame))


def stage_channels(size: Any, width: int) -> list[int]:
    """Channels after each discriminator stage, high resolution first (64, w=32: 32, 64, 128, 256)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return [width * 2 ** min(i, 3) for i in range(num_stages(size))]


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), batch-norm scale N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z [N, latent_dim] -> image [N, 3, H, W] in [-1, 1]."""

    def __init__(self, size: Any = 64, latent_dim: int = 100, width: int = 32) -> None:
        super().__init__()
        self.size, self.latent_dim = size, latent_dim
        chans = stage_channels(size, width)[::-1]  # low resolution (wide) first
        layers: list[nn.Module] = [
            # [N, z, 1, 1] -> [N, chans[0], ch, cw] (the core, 4x4 at 64 px)
            nn.ConvTranspose2d(latent_dim, chans[0], core_size(size), 1, 0, bias=False),
            nn.BatchNorm2d(chans[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            # [N, c_in, h, w] -> [N, c_out, 2h, 2w]
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            ]
        # [N, chans[-1], H/2, W/2] -> [N, 3, H, W]
        layers += [nn.ConvTranspose2d(chans[-1], 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], self.latent_dim, 1, 1))


class _ConvBody(nn.Module):
    """Strided 4x4 convs halving the resolution per stage down to the core; shared by D and the encoder."""

    def __init__(self, size: Any, width: int, norm: str) -> None:
        super().__init__()
        if norm not in ("batch", "spectral", "none"):
            raise ValueError(f"norm must be 'batch', 'spectral' or 'none', got {norm!r}")
        self.norm = norm
        chans = stage_channels(size, width)
        self.stages = nn.ModuleList()
        c_in = 3
        for i, c_out in enumerate(chans):
            conv = nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm != "batch")
            # [N, c_in, h, w] -> [N, c_out, h/2, w/2]; no batch norm on the input layer (Radford et al.)
            block: list[nn.Module] = [spectral_norm(conv) if norm == "spectral" else conv]
            if norm == "batch" and i > 0:
                block.append(nn.BatchNorm2d(c_out))
            block.append(nn.LeakyReLU(0.2, inplace=False))
            self.stages.append(nn.Sequential(*block))
            c_in = c_out
        self.out_channels = c_in

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class Discriminator(nn.Module):
    """image [N, 3, H, W] in [-1, 1] -> logit [N] (D(x) = sigmoid(logit) = P(real))."""

    def __init__(self, size: Any = 64, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        self.size = size
        self.body = _ConvBody(size, width, norm)
        head = nn.Conv2d(self.body.out_channels, 1, core_size(size), 1, 0)  # [N, C, ch, cw] -> [N, 1, 1, 1]
        self.head = spectral_norm(head) if norm == "spectral" else head
        init_dcgan_weights(self)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature map after every stage, high resolution first (the f-AnoGAN and kNN heads use them)."""
        return self.body.features(x)

    def logit_from_features(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.head(feats[-1]).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit_from_features(self.features(x))


class Encoder(nn.Module):
    """image [N, 3, H, W] -> z [N, latent_dim]: the f-AnoGAN encoder, D's architecture (izi_f)."""

    def __init__(self, size: Any = 64, latent_dim: int = 100, width: int = 32) -> None:
        super().__init__()
        self.body = _ConvBody(size, width, "batch")
        # [N, C, ch, cw] -> [N, z, 1, 1]; linear output because the prior is N(0, I), not uniform.
        self.head = nn.Conv2d(self.body.out_channels, latent_dim, core_size(size), 1, 0)
        init_dcgan_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body.features(x)[-1]).flatten(1)


class DCGAN(nn.Module):
    """Generator, discriminator and encoder in one module, so ``model.pt`` holds one state dict."""

    def __init__(self, size: Any = 64, latent_dim: int = 100, width: int = 32, d_norm: str = "batch") -> None:
        super().__init__()
        self.size, self.latent_dim = size, latent_dim
        self.generator = Generator(size, latent_dim, width)
        self.discriminator = Discriminator(size, width, d_norm)
        self.encoder = Encoder(size, latent_dim, width)


def fold_spectral_norm(module: nn.Module) -> nn.Module:
    """Bake spectral-norm weights into plain tensors (in place): the exported graph needs no power
    iteration, and eval-mode outputs are unchanged (eval mode uses the stored u, v as they are)."""
    for m in list(module.modules()):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return module


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, batches: list[torch.Tensor]) -> None:
    """Reset and re-estimate batch-norm running statistics as exact averages over ``batches``.

    D is trained on all-real and all-fake batches in turn, so its running stats are a blend of both;
    scoring runs D in eval mode on real frames, so the stats are re-estimated on real frames only.
    For G the batches are fixed latent codes, replacing an exponential average with an exact one.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms or not batches:
        return
    saved = [(m, m.momentum) for m in norms]
    was_training = module.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    module.train()
    for batch in batches:
        module(batch)
    for m, momentum in saved:
        m.momentum = momentum
    module.train(was_training)
