"""One step of DCGAN and f-AnoGAN training, their losses, and the per-epoch measurements.

The losses are the lecture's: D's binary cross-entropy, G's non-saturating ``-log D(G(z))`` (the
"-log D trick", Goodfellow et al. 2014), the R1 penalty that keeps D from saturating (Mescheder et
al. 2018), and f-AnoGAN's izi_f encoder loss (Schlegl et al. 2019). The measurements watch for mode
collapse (diversity of generated vs real frames) and sample quality (pixel-PCA Fréchet distance).
The loop that calls them, with budgets, checkpoints and resume, is training/gan_train.py.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from training.dcgan import DCGAN, Discriminator, Generator, recalibrate_batchnorm
from training.gan_metrics import PixelFrechet, mean_pairwise_distance
from training.pixels import to_uint8_frames, to_unit_range

if TYPE_CHECKING:
    from training.gan_config import GANConfig

N_DIVERSITY = 64  # frames in the diversity figure and the sample grid
N_VAL_METRICS = 256  # val frames in the per-epoch D/G losses
N_QUALITY = 512  # generated and val frames in the per-epoch Fréchet distance
N_BN_BATCHES = 8  # batches used to re-estimate batch-norm statistics


# -- losses ---------------------------------------------------------------------------------------


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, real_target: float = 1.0
) -> torch.Tensor:
    """Binary cross-entropy of D: real frames towards ``real_target`` (1, or 1 - smoothing), fakes to 0."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_target))
    return real + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss -log D(G(z)) = softplus(-logit) (Goodfellow et al. 2014, sec. 3): it has
    strong gradients early, when D easily rejects fakes and log(1 - D(G(z))) would saturate."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """E |grad_x D(x)|^2 on real frames (Mescheder et al. 2018); ``real`` must require grad."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def encoder_loss(model: DCGAN, x: torch.Tensor, kappa: float) -> torch.Tensor:
    """f-AnoGAN izi_f loss (Schlegl et al. 2019): pixel MSE plus kappa times last-D-feature MSE."""
    rec = model.generator(model.encoder(x))
    d = model.discriminator
    return F.mse_loss(rec, x) + kappa * F.mse_loss(d.features(rec)[-1], d.features(x)[-1])


# -- measurements ---------------------------------------------------------------------------------


def frame_batches(frames: npt.NDArray[np.uint8], size: int, device: torch.device) -> list[torch.Tensor]:
    return [
        to_unit_range(torch.from_numpy(frames[i : i + size]).to(device)) for i in range(0, len(frames), size)
    ]


@torch.no_grad()
def refresh_batchnorm(
    model: DCGAN, train: npt.NDArray[np.uint8], z_bank: torch.Tensor, cfg: GANConfig
) -> None:
    """Exact batch-norm statistics for eval mode: G on fixed latent codes, D on real training frames."""
    device = z_bank.device
    recalibrate_batchnorm(model.generator, list(z_bank.split(cfg.batch_size)))
    real = frame_batches(train[: N_BN_BATCHES * cfg.batch_size], cfg.batch_size, device)
    recalibrate_batchnorm(model.discriminator, real)


@torch.no_grad()
def gan_epoch_metrics(
    model: DCGAN,
    train: npt.NDArray[np.uint8],
    val: npt.NDArray[np.uint8],
    z_fixed: torch.Tensor,
    quality: PixelFrechet,
) -> tuple[dict[str, float], npt.NDArray[np.uint8]]:
    """Eval-mode D/G losses on val normals, D's train/val gap, diversity and Fréchet distance of
    samples from the fixed codes ``z_fixed`` (the first ``N_DIVERSITY`` are returned as uint8)."""
    G, D = model.generator.eval(), model.discriminator.eval()
    device = z_fixed.device
    fakes = torch.cat([G(z) for z in z_fixed.split(128)])
    fake = fakes[:N_DIVERSITY]
    val_x = torch.cat(frame_batches(val[:N_VAL_METRICS], 128, device))
    train_x = torch.cat(frame_batches(train[:N_VAL_METRICS], 128, device))
    val_logits, fake_logits = D(val_x), D(fake)
    real_div = mean_pairwise_distance(val_x[:N_DIVERSITY])
    fake_div = mean_pairwise_distance(fake)
    metrics = {
        "val_d_loss": float(discriminator_loss(val_logits, fake_logits)),
        "val_g_loss": float(generator_loss(fake_logits)),
        "d_real_prob_train": float(torch.sigmoid(D(train_x)).mean()),
        "d_real_prob_val": float(torch.sigmoid(val_logits).mean()),
        "d_fake_prob": float(torch.sigmoid(fake_logits).mean()),
        "diversity_fake": fake_div,
        "diversity_real": real_div,
        "diversity_ratio": fake_div / real_div if real_div > 0 else float("nan"),
        "fd_pixels": quality.distance(fakes, torch.cat(frame_batches(val[:N_QUALITY], 128, device))),
    }
    G.train(), D.train()
    return metrics, to_uint8_frames(fake).cpu().numpy()


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on CUDA where the GPU supports it (no loss scaling needed); a no-op on CPU
    and on GPUs without bfloat16 (float16 would need a GradScaler through the R1 penalty)."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def gan_step(
    G: Generator,
    D: Discriminator,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    cfg: GANConfig,
    step: int,
    amp: bool = False,
) -> dict[str, float]:
    """One D update then one G update on a batch of real frames in [-1, 1]; returns the losses."""
    stabilisers = cfg.stabilisers()
    real_target = 1.0 - cfg.label_smoothing if "label-smoothing" in stabilisers else 1.0
    use_r1 = "r1" in stabilisers and cfg.r1_gamma > 0 and step % cfg.r1_every == 0
    z = torch.randn(len(real), cfg.latent_dim, device=real.device)
    set_requires_grad(D, True)
    if use_r1:
        real = real.detach().requires_grad_(True)
    with _autocast(real.device, amp):
        fake = G(z)
        real_logits = D(real).float()
        fake_logits = D(fake.detach()).float()
        loss_d = discriminator_loss(real_logits, fake_logits, real_target)
    total_d = loss_d
    stats = {"d_loss": loss_d.item(), "d_real_prob": torch.sigmoid(real_logits.detach()).mean().item()}
    if use_r1:
        penalty = r1_penalty(real_logits, real)
        total_d = loss_d + 0.5 * cfg.r1_gamma * cfg.r1_every * penalty
        stats["r1"] = penalty.item()
    opt_d.zero_grad(set_to_none=True)
    total_d.backward()
    opt_d.step()

    set_requires_grad(D, False)  # G's step needs gradients through D, not for D's weights
    with _autocast(real.device, amp):
        loss_g = generator_loss(D(fake).float())
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    set_requires_grad(D, True)
    stats["g_loss"] = loss_g.item()
    return stats


def encoder_step(
    model: DCGAN, opt_e: torch.optim.Optimizer, x: torch.Tensor, kappa: float, amp: bool = False
) -> float:
    """One izi_f update of the encoder with G and D frozen (eval mode, no weight gradients)."""
    with _autocast(x.device, amp):
        loss = encoder_loss(model, x, kappa).float()
    opt_e.zero_grad(set_to_none=True)
    loss.backward()
    opt_e.step()
    return loss.item()
