"""Score graphs of a trained VAE: uint8 NHWC frames in, per-frame score (and anomaly map) out.

Every head is higher = more anomalous, scales inside the graph (x = frames / 127.5 - 1) and is
export-friendly: fixed shapes except the batch, no Python branching on data, sampling through noise
buffers fixed at build time (so a frame always gets the same score, in torch and in onnxruntime).

- ``vae-elbo``: negative ELBO (Kingma & Welling 2014) in bits/dim, reconstruction at the posterior
  mean plus the closed-form KL; map = reconstruction NLL per pixel (bits, summed over channels).
- ``vae-recon``: mean squared reconstruction error at z = mu; map = squared error per pixel summed
  over channels; score = the mean of the map over pixels / 3 (the plain MSE). The mean is kept over
  pooled or top-k reductions: the validation protocol's pseudo-anomalies are all local patches, so
  it favours local rules by construction and cannot see global changes (weather, exposure, sensor
  faults); local evidence is the patch head's job (measurements: docs/benchmarks.md, "Score-head
  design history").
- ``vae-iwae``: importance-weighted bound on -log p(x) (Burda et al., ICLR 2016) with K fixed noise
  draws, bits/dim: -log (1/K sum_k p(x|z_k) p(z_k) / q(z_k|x)); tighter than the ELBO, more so with K.
- ``vae-complexity``: Serrà et al. (ICLR 2020): S(x) = -log2 p(x) - L(x) in bits/dim, with the
  negative ELBO of ``vae-elbo`` for -log2 p(x) and L(x) from the in-graph lossless coder of
  training/complexity.py; map = the per-pixel difference of the two code lengths.
  It is the remedy for data where smooth frames look likely (Nalisnick et al. 2019); on the synth
  generator it does not beat the plain ELBO (docs/benchmarks.md, "Score-head design history").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.complexity import ComplexityCoder
from training.heads.base import HeadSpec
from training.pixels import to_unit_range
from training.runs import load_model_file
from training.vae import VAE

_LN2 = math.log(2.0)
_LOG_2PI = math.log(2.0 * math.pi)
IWAE_SAMPLES = 16
NOISE_SEED = 0
# Reduction of the vae-recon map to a score: "mean" (MSE) or "topk" (mean of the top 1% of pixels).
RECON_REDUCE = "mean"
TOPK_FRACTION = 0.01


def load_vae(run_dir: str | Path) -> tuple[VAE, dict[str, Any]]:
    """Rebuild the run's VAE from ``model.pt`` alone, in eval mode: (network, resolved run config)."""
    payload = load_model_file(run_dir)
    if payload.get("kind") != "vae":
        raise ValueError(f"{run_dir} holds a {payload.get('kind')!r} model, not a VAE")
    vae = VAE(**payload["arch"])
    vae.load_state_dict(payload["state_dict"])
    return vae.eval(), dict(payload["config"])


class _VAEHead(nn.Module):
    """Shared plumbing: the frozen network and the number of values per frame."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae.eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.dims = 3 * vae.frame_size.pixels

    def recon_at_mean(
        self, frames: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, mean image at z = mu, mu, logvar)."""
        x = to_unit_range(frames)
        mu, logvar = self.vae.encode(x)
        return x, self.vae.decode(mu), mu, logvar


class ELBOHead(_VAEHead):
    """Negative ELBO at the posterior mean, bits/dim; map: reconstruction bits per pixel."""

    def elbo_and_map(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, mean, mu, logvar = self.recon_at_mean(frames)
        nll = self.vae.pixel_nll(x, mean)  # [N, 3, H, W] nats
        nats = nll.flatten(1).sum(dim=1) + self.vae.kl(mu, logvar)
        return nats / (self.dims * _LN2), nll.sum(dim=1) / _LN2

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.elbo_and_map(frames)


class ReconHead(_VAEHead):
    """Squared reconstruction error at z = mu; score = mean of the map / 3, or its top-k mean."""

    def __init__(self, vae: VAE, reduce: str = RECON_REDUCE, topk_fraction: float = TOPK_FRACTION):
        super().__init__(vae)
        if reduce not in ("mean", "topk"):
            raise ValueError(f"reduce must be 'mean' or 'topk', got {reduce!r}")
        self.reduce = reduce
        self.k = max(1, int(round(topk_fraction * vae.frame_size.pixels)))

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, mean, _, _ = self.recon_at_mean(frames)
        err = (x - mean).pow(2).sum(dim=1)  # [N, H, W]
        if self.reduce == "topk":
            score = torch.topk(err.flatten(1), self.k, dim=1).values.mean(dim=1) / 3.0
        else:
            score = err.flatten(1).mean(dim=1) / 3.0
        return score, err


class IWAEHead(_VAEHead):
    """Importance-weighted bound on -log p(x), bits/dim, with K noise draws fixed at build time."""

    def __init__(self, vae: VAE, samples: int = IWAE_SAMPLES, seed: int = NOISE_SEED):
        super().__init__(vae)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("eps", torch.randn(samples, vae.latent_dim, generator=gen))
        self.samples = samples

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = to_unit_range(frames)
        mu, logvar = self.vae.encode(x)
        std = torch.exp(0.5 * logvar)
        z = mu.unsqueeze(1) + std.unsqueeze(1) * self.eps.unsqueeze(0)  # [N, K, L]
        k, latent = self.samples, self.vae.latent_dim
        mean = self.vae.decode(z.reshape(-1, latent))  # [N*K, 3, H, W]
        xk = x.unsqueeze(1).expand(-1, k, -1, -1, -1).reshape(mean.shape)
        log_px_z = -self.vae.pixel_nll(xk, mean).flatten(1).sum(dim=1).reshape(-1, k)  # [N, K]
        log_pz = -0.5 * (z.pow(2) + _LOG_2PI).sum(dim=2)
        # (z - mu) / std = eps, so log q(z|x) needs no division
        log_qz = -0.5 * (self.eps.pow(2).unsqueeze(0) + logvar.unsqueeze(1) + _LOG_2PI).sum(dim=2)
        log_w = log_px_z + log_pz - log_qz
        log_px = torch.logsumexp(log_w, dim=1) - math.log(k)
        return -log_px / (self.dims * _LN2)


class ComplexityHead(ELBOHead):
    """Serrà et al. 2020: negative ELBO minus the lossless code length, both bits/dim."""

    def __init__(self, vae: VAE):
        super().__init__(vae)
        self.coder = ComplexityCoder(vae.frame_size)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        elbo, elbo_map = self.elbo_and_map(frames)
        length, length_map = self.coder(frames)
        return elbo - length, elbo_map - length_map


def build_elbo(run_dir: Path) -> nn.Module:
    """``vae-elbo`` graph of a run."""
    return ELBOHead(load_vae(run_dir)[0]).eval()


def build_recon(run_dir: Path) -> nn.Module:
    """``vae-recon`` graph of a run."""
    return ReconHead(load_vae(run_dir)[0]).eval()


def build_iwae(run_dir: Path) -> nn.Module:
    """``vae-iwae`` graph of a run (K = IWAE_SAMPLES fixed draws)."""
    return IWAEHead(load_vae(run_dir)[0]).eval()


def build_complexity(run_dir: Path) -> nn.Module:
    """``vae-complexity`` graph of a run."""
    return ComplexityHead(load_vae(run_dir)[0]).eval()


VAE_HEADS = [
    HeadSpec(
        name="vae-elbo",
        kind="vae",
        units="bits/dim",
        definition="negative ELBO: reconstruction NLL at z = mu (discretised logistic) + KL, per dim",
        has_map=True,
        build=build_elbo,
    ),
    HeadSpec(
        name="vae-recon",
        kind="vae",
        units="mean squared error (pixels in [-1, 1])",
        definition="|x - decode(mu)|^2; map summed over channels, score = map mean / 3 (the MSE)",
        has_map=True,
        build=build_recon,
    ),
    HeadSpec(
        name="vae-iwae",
        kind="vae",
        units="bits/dim",
        definition=f"importance-weighted bound on -log p(x), K = {IWAE_SAMPLES} fixed noise draws",
        has_map=False,
        build=build_iwae,
    ),
    HeadSpec(
        name="vae-complexity",
        kind="vae",
        units="bits/dim",
        definition="negative ELBO minus lossless predictive-coder length (Serra et al. 2020)",
        has_map=True,
        build=build_complexity,
    ),
]
