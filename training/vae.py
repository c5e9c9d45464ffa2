"""Convolutional variational autoencoder (Kingma & Welling, ICLR 2014) for H x W RGB frames.

Pixels enter in [-1, 1] (``x = uint8 / 127.5 - 1``, the scaling the score graphs do). The decoder
outputs the mean image through a Tanh and the likelihood is a *discretised logistic* over the 256
pixel levels (Salimans et al., PixelCNN++, ICLR 2017) with a learned per-channel log-scale. Being
discretised, -log p(x|z) is a true code length in nats, so bits/dim = nats / (D ln 2), D = 3 H W, is
comparable across models and with a lossless coder (training/complexity.py). The logistic rather
than the Gaussian CDF is used because its log-CDF is a softplus: stable for tiny scales and built
from ops that export to ONNX (the Gaussian log-CDF is not).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.shapes import check_size, core, max_stages, parse_size, size_text


@dataclass(frozen=True)
class VAEArch:
    """What it takes to rebuild the network (stored in model.pt). ``size`` is ``"WxH"`` (an int in old
    model files: a square side)."""

    size: int | str = 64
    width: int = 32
    depth: int | None = None  # stride-2 stages; None: down to a small core (64 px -> 4 stages, 4x4)
    latent_dim: int = 64

    def resolved_depth(self) -> int:
        """Stages down to the core unless given explicitly."""
        if self.depth is not None:
            return self.depth
        size = parse_size(self.size)
        if size.height == size.width:  # the rule square runs were trained with (96 px -> 5 stages)
            return int(round(math.log2(size.height / 4)))
        return max_stages(size)

    def validate(self) -> None:
        """Clear errors for sizes the network cannot take."""
        if self.depth is None:
            check_size(self.size, what="VAE")  # the default depth needs a small core
        check_size(self.size, stages=self.resolved_depth(), what="VAE")
        if self.width < 1 or self.latent_dim < 1:
            raise ValueError("width and latent_dim must be positive")


def _channels(width: int, stage: int) -> int:
    # doubles per stage, capped at 8x width so 256 px stays affordable
    return width * 2 ** min(stage, 3)


class VAE(nn.Module):
    """Encoder -> diagonal Gaussian q(z|x); decoder -> mean image and a per-channel logistic scale."""

    def __init__(
        self,
        size: int | str | tuple[int, int] = 64,
        width: int = 32,
        depth: int | None = None,
        latent_dim: int = 64,
    ):
        super().__init__()
        frame = parse_size(size)
        # an int stays an int in model.pt, so files written before H x W rebuild byte for byte
        self.arch = VAEArch(size=size if isinstance(size, int) else size_text(frame), width=width,
                            depth=depth, latent_dim=latent_dim)  # fmt: skip
        self.arch.validate()
        d = self.arch.resolved_depth()
        self.frame_size, self.latent_dim, self.depth = frame, latent_dim, d
        self.bottom = core(frame, d)  # (h, w): 64 px, 4 stages -> (4, 4); 144x256 -> (9, 16)
        self.bottom_channels = _channels(width, d - 1)

        layers: list[nn.Module] = []
        c_in = 3
        for i in range(d):  # [N, c_in, h, w] -> [N, c, h/2, w/2]
            c = _channels(width, i)
            layers += [nn.Conv2d(c_in, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.LeakyReLU(0.2)]
            c_in = c
        self.encoder = nn.Sequential(*layers)
        flat = self.bottom_channels * self.bottom[0] * self.bottom[1]
        self.to_stats = nn.Linear(flat, 2 * latent_dim)  # [N, flat] -> [N, 2L] (mu, logvar)

        self.from_z = nn.Linear(latent_dim, flat)  # [N, L] -> [N, C * bh * bw]
        layers = []
        for i in reversed(range(1, d)):  # [N, c_i, h, w] -> [N, c_{i-1}, 2h, 2w]
            c, c_out = _channels(width, i), _channels(width, i - 1)
            layers += [nn.ConvTranspose2d(c, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        # last stage: [N, width, H/2, W/2] -> [N, 3, H, W]
        layers += [nn.ConvTranspose2d(_channels(width, 0), 3, 4, 2, 1), nn.Tanh()]
        self.decoder = nn.Sequential(*layers)
        # per-channel log-scale of the logistic; starts at scale ~0.1 (about 13 grey levels)
        self.log_scale = nn.Parameter(torch.full((1, 3, 1, 1), math.log(0.1)))

    def config(self) -> dict[str, int | str | None]:
        """Constructor arguments, for model.pt."""
        return asdict(self.arch)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,3,H,W] in [-1,1] -> (mu, logvar), each [N, L]; logvar clamped for stability."""
        h = self.encoder(x).flatten(1)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, L] -> mean image [N, 3, H, W] in [-1, 1]."""
        h = self.from_z(z).view(-1, self.bottom_channels, *self.bottom)
        return self.decoder(F.leaky_relu(h, 0.2))

    def pixel_nll(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """-log P(x | mean) per value [N,3,H,W] in nats, discretised logistic over 256 levels.

        PixelCNN++ (Salimans et al. 2017): mass of the bin [x - 1/255, x + 1/255], the edge bins
        extended to -inf / +inf; computed in float32 whatever the autocast dtype. Inner bins use
        sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - exp(a - b)), whose log has no
        cancellation, so torch and onnxruntime agree even far in the tails.
        """
        x, mean = x.float(), mean.float()
        log_s = self.log_scale.float().clamp(min=-7.0)
        inv_s = torch.exp(-log_s)
        centred = x - mean
        plus_in = inv_s * (centred + 1.0 / 255.0)
        min_in = inv_s * (centred - 1.0 / 255.0)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): bin at x = -1
        log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in)): bin at x = +1
        log_width = torch.log(1.0 - torch.exp(-2.0 / 255.0 * inv_s))  # [1, 3, 1, 1]
        log_mid = -F.softplus(-plus_in) - F.softplus(min_in) + log_width
        log_p = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))
        return -log_p

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per frame [N] in nats, closed form (Kingma & Welling 2014, App. B)."""
        return 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum(dim=1)

    def elbo_terms(
        self, x: torch.Tensor, *, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(recon_nll [N], kl [N], mean image) in nats; -ELBO = recon_nll + kl.

        ``sample=True`` draws z ~ q(z|x) (the training estimator, reparameterised); ``False`` decodes
        the posterior mean (deterministic, what the vae-elbo head reports).
        """
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        mean = self.decode(z)
        recon = self.pixel_nll(x, mean).flatten(1).sum(dim=1)
        return recon, self.kl(mu, logvar), mean

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative ELBO in bits/dim per frame [N] (z sampled) and the mean image."""
        recon, kl, mean = self.elbo_terms(x)
        return nats_to_bits_per_dim(recon + kl, x[0].numel()), mean

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoded prior samples (mean images) [n, 3, H, W] in [-1, 1]."""
        z = torch.randn(n, self.latent_dim, generator=generator).to(self.log_scale.device)
        return self.decode(z)


def nats_to_bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Code length per value in bits: nats / (D ln 2)."""
    return nats / (dims * math.log(2.0))
