"""DCGAN training, then the f-AnoGAN encoder, then the D-feature bank: ``edgecase train gan``.

Phase 1, the GAN (Radford et al. 2016): Adam(2e-4, betas (0.5, 0.999)) for G and D, D loss is the
usual binary cross-entropy, G uses the non-saturating loss (Goodfellow et al. 2014). Stabilisers,
selectable and combinable with ``+`` (e.g. ``spectral+r1``):
- ``spectral``: spectral norm on every D layer and no batch norm in D (Miyato et al. 2018);
- ``r1``: gradient penalty ``gamma/2 E|grad_x D(x)|^2`` on real frames (Mescheder et al. 2018),
  applied lazily every ``r1_every`` D steps and scaled up by it (Karras et al. 2020, StyleGAN2);
- ``label-smoothing``: one-sided, real target ``1 - label_smoothing`` (Salimans et al. 2016);
- ``none``.

``r1`` with gamma 0.1 is the default: in a comparison of the stabilisers it halved the pixel
Fréchet distance of the plain DCGAN and kept D from saturating, so ``-log D(x)`` keeps a usable
range (the table and its history: docs/benchmarks.md, "GAN stabilisers").

Early stopping: a GAN has no validation loss that tracks sample quality, so phase 1 runs a fixed
epoch budget bounded by ``max_minutes`` (phase 1 gets ``GAN_TIME_SHARE`` of it) and keeps the last
epoch. Each epoch still records, on validation normals, D's loss, G's loss and D's mean belief
that val frames are real next to training frames (a gap means D memorises, Karras et al. 2020 ADA),
plus a mode-collapse watch: mean pairwise distance among generated frames over that among real
frames (``diversity_ratio``; near 0 means collapse), with a sample grid per epoch.

Phase 2, the encoder (Schlegl et al. 2019, izi_f): with G and D frozen in eval mode, E minimises
``|x - G(E(x))|^2 / n_pixels + kappa |f_D(x) - f_D(G(E(x)))|^2 / n_features`` on training normals,
with real early stopping (``patience``) on the same loss over validation normals.

Phase 3: pooled D features of up to ``bank_size`` training normals go to ``RUN_DIR/banks/dfeat.pt``
for the ``gan-dfeat-knn`` head, and the heads are calibrated on validation normals.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from training import runs
from training.data import load_training_frames
from training.dcgan import DCGAN
from training.gan_config import DRY_RUN_FRAMES, GANConfig, config_from_saved, noise_data, resolved_config
from training.gan_metrics import PixelFrechet
from training.gan_steps import (
    N_BN_BATCHES,
    N_QUALITY,
    encoder_loss,
    encoder_step,
    frame_batches,
    gan_epoch_metrics,
    gan_step,
    refresh_batchnorm,
    set_requires_grad,
)
from training.heads import fit_heads
from training.heads.gan import build_dcgan, compute_dfeat_bank, save_dfeat_bank
from training.pixels import to_uint8_frames, to_unit_range
from training.plots import plot_losses, save_image_grid

log = logging.getLogger(__name__)

GAN_TIME_SHARE = 0.75  # of max_minutes; the rest is for the encoder, the bank and calibration


def _steps(n: int, batch_size: int, dry_run: bool) -> int:
    return 1 if dry_run else max(1, n // batch_size)


def _order(n: int, seed: int, epoch: int) -> npt.NDArray[np.int64]:
    """The frame order of one epoch: a function of (seed, epoch) only, so resume replays it exactly."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class _Budget:
    """Wall-clock budget across resumes: phase 1 may use ``GAN_TIME_SHARE`` of ``max_minutes``."""

    def __init__(self, max_minutes: float | None, spent_s: float) -> None:
        self.limit_s = None if max_minutes is None else 60.0 * max_minutes
        self.start, self.before = time.monotonic(), spent_s

    def spent(self) -> float:
        return self.before + time.monotonic() - self.start

    def over(self, share: float = 1.0) -> bool:
        return self.limit_s is not None and self.spent() >= share * self.limit_s


def _checkpoint(
    run_dir: Path, model: DCGAN, opts: dict[str, torch.optim.Optimizer], state: dict[str, Any]
) -> None:
    runs.save_checkpoint(
        run_dir,
        {
            **state,
            "model": model.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in opts.items()},
            "rng": runs.rng_state(),
        },
    )


def _plot_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    gan = [r for r in history if r.get("phase") == "gan"]
    enc = [r for r in history if r.get("phase") == "encoder"]
    plots = run_dir / runs.PLOTS
    if gan:
        keys = [
            "train_d_loss",
            "train_g_loss",
            "val_d_loss",
            "val_g_loss",
            "diversity_ratio",
            "fd_pixels",
        ]
        plot_losses(gan, plots / "loss.png", keys=[k for k in keys if k in gan[-1]])
    if enc:
        plot_losses(enc, plots / "encoder_loss.png", keys=["train_encoder_loss", "val_encoder_loss"])


@torch.no_grad()
def _mean_encoder_loss(
    model: DCGAN, frames: npt.NDArray[np.uint8], cfg: GANConfig, device: torch.device
) -> float:
    model.encoder.eval()
    total, n = 0.0, 0
    for x in frame_batches(frames, 128, device):
        total += float(encoder_loss(model, x, cfg.kappa)) * len(x)
        n += len(x)
    model.encoder.train()
    return total / max(n, 1)


def train_gan(cfg: GANConfig, data_sources: list[str], out_dir: Path, resume: bool = False) -> Path:
    """Train a DCGAN, its f-AnoGAN encoder and the D-feature bank into ``out_dir``; returns the run dir.

    Writes config.json, checkpoint.pt (every epoch of both phases), model.pt, history.jsonl,
    plots/{loss,encoder_loss,samples,samples_epoch_XXX,reconstructions}.png, banks/dfeat.pt, and the
    fitted and calibrated heads (:func:`fit_heads`: banks/, calibration/<head>.json).
    """
    cfg.validate()
    run_dir = runs.create_run_dir(out_dir, resume=resume)
    checkpoint: dict[str, Any] | None = None
    if resume:
        saved = runs.load_config(run_dir)
        cfg = config_from_saved(saved, cfg)
        data_sources = list(saved.get("data") or data_sources)
        checkpoint = runs.load_checkpoint(run_dir)
    device = runs.resolve_device(cfg.device)
    amp = cfg.amp and device.type == "cuda"
    runs.seed_everything(cfg.seed)
    if cfg.dry_run and not data_sources:
        data = noise_data(cfg)
    else:
        max_frames = DRY_RUN_FRAMES if cfg.dry_run else cfg.max_frames
        data = load_training_frames(data_sources, cfg.size, seed=cfg.seed, max_frames=max_frames)
    train, val = data.train, data.val
    config = resolved_config(cfg, data, device)
    if checkpoint is None:
        runs.save_config(run_dir, config)
    elif runs.load_config(run_dir).get("data_fingerprint") != data.fingerprint:
        raise ValueError(f"cannot resume {run_dir}: the data differ from the run's (fingerprint mismatch)")
    gan_epochs = 1 if cfg.dry_run else cfg.epochs
    encoder_epochs = min(1, cfg.encoder_epochs) if cfg.dry_run else cfg.encoder_epochs
    log.info(
        "GAN run %s: %d train / %d val frames of %s on %s, stabiliser %s",
        run_dir,
        len(train),
        len(val),
        cfg.size,
        device,
        cfg.stabiliser,
    )

    model = build_dcgan(config).to(device)
    G, D, E = model.generator, model.discriminator, model.encoder
    betas = (cfg.beta1, cfg.beta2)
    opts = {
        "g": torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=betas),
        "d": torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=betas),
        "e": torch.optim.Adam(E.parameters(), lr=cfg.encoder_lr, betas=(0.9, 0.999)),
    }
    fixed = torch.Generator().manual_seed(cfg.seed)
    # Fixed codes: the sample grids of all epochs show the same latents; diversity uses the first
    # N_DIVERSITY, the Fréchet distance as many as there are val frames (up to N_QUALITY).
    z_fixed = torch.randn(min(N_QUALITY, max(2, len(val))), cfg.latent_dim, generator=fixed).to(device)
    z_bank = torch.randn(N_BN_BATCHES * cfg.batch_size, cfg.latent_dim, generator=fixed).to(device)
    state: dict[str, Any] = {
        "gan_epoch": 0,
        "encoder_epoch": 0,
        "step": 0,
        "elapsed_s": 0.0,
        "best_val": math.inf,
        "bad_epochs": 0,
        "best_encoder": None,
        "gan_done": False,
    }
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        for name, opt in opts.items():
            opt.load_state_dict(checkpoint["optimizers"][name])
        state.update({k: checkpoint[k] for k in state})
        runs.set_rng_state(checkpoint["rng"])
        history = [
            r
            for r in runs.read_history(run_dir)
            if r["epoch"] <= state["gan_epoch" if r.get("phase") == "gan" else "encoder_epoch"]
        ]
        runs.write_history(run_dir, history)
        log.info(
            "resumed %s after GAN epoch %d, encoder epoch %d",
            run_dir,
            state["gan_epoch"],
            state["encoder_epoch"],
        )
    budget = _Budget(cfg.max_minutes, state["elapsed_s"])
    quality = PixelFrechet(train)
    # The Fréchet distance's noise floor: held-out real frames against training frames.
    fd_floor = quality.distance(*(torch.cat(frame_batches(f[:N_QUALITY], 128, device)) for f in (train, val)))
    plots = run_dir / runs.PLOTS

    # Phase 1: the GAN, a fixed epoch budget (see the module docstring for why there is no early stop).
    while not state["gan_done"] and state["gan_epoch"] < gan_epochs:
        epoch = state["gan_epoch"] + 1
        order = _order(len(train), cfg.seed, epoch)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # r1 is logged only on the steps that apply it
        steps = _steps(len(train), cfg.batch_size, cfg.dry_run)
        started = time.monotonic()
        for i in tqdm(range(steps), desc=f"GAN epoch {epoch}/{gan_epochs}", unit="step", leave=False):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            real = to_unit_range(torch.from_numpy(train[idx]).to(device))
            for k, v in gan_step(G, D, opts["g"], opts["d"], real, cfg, state["step"], amp).items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            state["step"] += 1
        refresh_batchnorm(model, train, z_bank, cfg)
        metrics, samples = gan_epoch_metrics(model, train, val, z_fixed, quality)
        record = {
            "phase": "gan",
            "epoch": epoch,
            **{f"train_{k}": v / counts[k] for k, v in sums.items()},
            **metrics,
            "fd_pixels_floor": fd_floor,
            "epoch_s": time.monotonic() - started,
            "lr": cfg.lr,
        }
        history.append(record)
        runs.append_history(run_dir, record)
        save_image_grid(samples, plots / f"samples_epoch_{epoch:03d}.png")
        save_image_grid(samples, plots / "samples.png")
        _plot_history(run_dir, history)
        log.info(
            "GAN epoch %d: D %.3f G %.3f val D %.3f diversity ratio %.3f FD %.2f (floor %.2f)",
            epoch,
            record.get("train_d_loss", math.nan),
            record.get("train_g_loss", math.nan),
            metrics["val_d_loss"],
            metrics["diversity_ratio"],
            metrics["fd_pixels"],
            fd_floor,
        )
        state["gan_epoch"] = epoch
        if budget.over(GAN_TIME_SHARE):
            log.info(
                "GAN phase stops after epoch %d: time budget (%.1f of %s min)",
                epoch,
                budget.spent() / 60,
                cfg.max_minutes,
            )
            state["gan_done"] = True
        state["elapsed_s"] = budget.spent()
        _checkpoint(run_dir, model, opts, state)
    if not state["gan_done"]:
        state["gan_done"] = True
        _checkpoint(run_dir, model, opts, state)
    runs.save_model(run_dir, "gan", config, model.state_dict(), epoch=state["gan_epoch"])

    # Phase 2: the f-AnoGAN encoder, G and D frozen, early stopping on validation normals.
    G.eval(), D.eval()
    set_requires_grad(G, False), set_requires_grad(D, False)
    E.train()
    while state["encoder_epoch"] < encoder_epochs and (
        not cfg.patience or state["bad_epochs"] < cfg.patience
    ):
        if budget.over():
            log.info("encoder phase stops: time budget (%s min) spent", cfg.max_minutes)
            break
        epoch = state["encoder_epoch"] + 1
        order = _order(len(train), cfg.seed + 1, epoch)
        steps = _steps(len(train), cfg.batch_size, cfg.dry_run)
        total = 0.0
        for i in tqdm(range(steps), desc=f"encoder epoch {epoch}/{encoder_epochs}", unit="step", leave=False):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            total += encoder_step(
                model, opts["e"], to_unit_range(torch.from_numpy(train[idx]).to(device)), cfg.kappa, amp
            )
        val_loss = _mean_encoder_loss(model, val, cfg, device)
        if val_loss < state["best_val"]:
            state["best_val"], state["bad_epochs"] = val_loss, 0
            state["best_encoder"] = {k: v.detach().clone() for k, v in E.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        record = {
            "phase": "encoder",
            "epoch": epoch,
            "train_encoder_loss": total / steps,
            "val_encoder_loss": val_loss,
            "best_val_encoder_loss": state["best_val"],
        }
        history.append(record)
        runs.append_history(run_dir, record)
        _plot_history(run_dir, history)
        log.info("encoder epoch %d: train %.4f val %.4f", epoch, record["train_encoder_loss"], val_loss)
        state["encoder_epoch"] = epoch
        state["elapsed_s"] = budget.spent()
        _checkpoint(run_dir, model, opts, state)
    if state["best_encoder"] is not None:
        E.load_state_dict(state["best_encoder"])
        config["encoder_trained"] = True
    E.eval()
    with torch.no_grad():
        x = frame_batches(val[:8], 8, device)[0]
        save_image_grid(
            np.concatenate([to_uint8_frames(t).cpu().numpy() for t in (x, G(E(x)))]),
            plots / "reconstructions.png",
            nrow=len(x),
        )

    # Phase 3: the D-feature bank for gan-dfeat-knn, the final model file, calibration.
    bank = compute_dfeat_bank(D, train, max_frames=cfg.bank_size, seed=cfg.seed, device=device)
    save_dfeat_bank(run_dir, bank)
    config["elapsed_s"] = budget.spent()
    runs.save_config(run_dir, config)
    runs.save_model(
        run_dir,
        "gan",
        config,
        model.state_dict(),
        epoch=state["gan_epoch"],
        encoder_epoch=state["encoder_epoch"],
    )
    fit_heads(run_dir, val, calibrate=cfg.calibrate, check=cfg.dry_run)
    log.info("GAN run done in %.1f min: %s", budget.spent() / 60, run_dir)
    return run_dir
