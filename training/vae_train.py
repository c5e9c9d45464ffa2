"""Training loop of the VAE: Adam on the negative ELBO, early stopping on validation bits/dim.

Read top to bottom: config -> data -> network -> epochs (train, validate, checkpoint, keep the best)
-> plots -> the heads (``fit_heads``). The run directory layout is in training/runs.py.

Defaults fit the issue's budget, 8,000 frames of 64x64 in at most 10 minutes on 2 CPU cores:
``max_minutes`` = 7 stops the loop cleanly (after the batch in progress; a cut epoch is validated,
saved and marked partial in the history) so loading, plots and fitting the heads fit in the rest
(timings: docs/benchmarks.md, "VAE training budget").
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from contract.frames import RESIZE_RULE
from training import runs
from training.budgets import deferred_heads
from training.data import (
    TrainingData,
    fingerprint_frames,
    load_training_frames,
)
from training.heads import fit_heads, model_heads
from training.heads.vae import load_vae
from training.pixels import to_unit_range
from training.shapes import SizedConfig
from training.vae import VAE, VAEArch, nats_to_bits_per_dim
from training.vae_plots import write_plots

log = logging.getLogger(__name__)

DRY_RUN_FRAMES = 8


@dataclass
class VAEConfig(SizedConfig):
    """Everything that decides a VAE run; saved resolved in config.json and model.pt."""

    size: int | str = "256x144"  # "WxH" (an int: square); stored as "WxH"
    width: int = 32
    depth: int | None = None  # None: stride-2 stages down to 4x4
    latent_dim: int = 64
    batch_size: int = 64
    epochs: int = 40
    lr: float = 2e-3
    beta: float = 1.0  # KL weight (1 = the ELBO; Higgins et al. 2017 for beta != 1)
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # autocast, CUDA only
    patience: int = 5
    max_minutes: float | None = 5.0  # 256x144 budget (training/budgets.py: 7 at 64x64)
    dry_run: bool = False
    num_workers: int = 0  # frames live in memory; kept for a common CLI with the GAN
    calibrate: bool = True  # calibrate every head on the val normals at the end
    seg_steps: int = 250  # steps of the <kind>-seg head's net (0: none); 256x144 budget, 2400 at 64x64

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        """Build from a saved config, ignoring keys that are not config fields (data, versions...)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# Run control that a resumed run may change; everything else comes from the saved config.
_RESUMABLE_FIELDS = ("epochs", "patience", "max_minutes", "device", "amp", "num_workers", "calibrate")


def _noise_data(cfg: VAEConfig) -> TrainingData:
    """Seeded noise frames so a dry run works without any data."""
    rng = np.random.default_rng(cfg.seed)
    frames = rng.integers(0, 256, (DRY_RUN_FRAMES + 2, *cfg.frame_size, 3), dtype=np.uint8)
    return TrainingData(frames[:DRY_RUN_FRAMES], frames[DRY_RUN_FRAMES:], [], fingerprint_frames(frames))


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Mixed precision on CUDA only: bfloat16 where supported (no loss scaling), else float16."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """torch.autocast for ``dtype``; a no-op context when None (CPU, or amp off)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


@torch.no_grad()
def evaluate_vae(
    vae: VAE,
    frames: npt.NDArray[np.uint8],
    device: torch.device,
    batch_size: int = 256,
    amp: bool = False,
) -> dict[str, float]:
    """Mean -ELBO bits/dim (z = mu, deterministic), reconstruction and KL parts, on ``frames``."""
    vae.eval()
    dims = 3 * vae.frame_size.pixels
    total = recon_sum = kl_sum = 0.0
    for idx in _batches(len(frames), batch_size, None):
        x = to_unit_range(torch.from_numpy(frames[idx.numpy()]).to(device))
        with _autocast(device, _amp_dtype(device, amp)):
            recon, kl, _ = vae.elbo_terms(x, sample=False)
        recon_sum += float(nats_to_bits_per_dim(recon, dims).sum())
        kl_sum += float(nats_to_bits_per_dim(kl, dims).sum())
    total = recon_sum + kl_sum
    n = max(1, len(frames))
    return {"val_bpd": total / n, "val_recon_bpd": recon_sum / n, "val_kl_bpd": kl_sum / n}


def _train_epoch(
    vae: VAE,
    opt: torch.optim.Optimizer,
    frames: npt.NDArray[np.uint8],
    cfg: VAEConfig,
    device: torch.device,
    epoch: int,
    deadline: float = math.inf,
) -> dict[str, Any]:
    """One pass over the training frames in a seeded order (seed + epoch: resumable exactly).

    Past ``deadline`` (time.monotonic) the pass ends after the current batch, marked partial, so a
    time budget holds even when one epoch is long (a busy, shared CPU).
    """
    vae.train()
    dims = 3 * cfg.frame_size.pixels
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    batches = _batches(len(frames), cfg.batch_size, gen)
    if cfg.dry_run:
        batches = batches[:1]
    loss_sum = recon_sum = kl_sum = 0.0
    seen = 0
    partial = False
    amp_dtype = _amp_dtype(device, cfg.amp)
    # float16 needs loss scaling against gradient underflow; bfloat16 and float32 do not
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
    for idx in bar:
        x = to_unit_range(torch.from_numpy(frames[idx.numpy()]).to(device))
        with _autocast(device, amp_dtype):
            recon, kl, _ = vae.elbo_terms(x, sample=True)
        # -ELBO with a KL weight, per dim so the learning rate does not depend on the image size
        loss = nats_to_bits_per_dim(recon + cfg.beta * kl, dims).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch}; try a lower --lr")
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        n = len(idx)
        seen += n
        loss_sum += float(loss.detach()) * n
        recon_sum += float(nats_to_bits_per_dim(recon.detach(), dims).sum())
        kl_sum += float(nats_to_bits_per_dim(kl.detach(), dims).sum())
        bar.set_postfix(bpd=f"{loss_sum / seen:.3f}")
        if time.monotonic() > deadline and seen < len(frames):
            partial = True
            break
    bar.close()
    record: dict[str, Any] = {
        "train_bpd": loss_sum / seen,
        "train_recon_bpd": recon_sum / seen,
        "train_kl_bpd": kl_sum / seen,
    }
    if partial:
        record["partial_epoch_frames"] = seen
    return record


def _resolved_config(cfg: VAEConfig, data: TrainingData, device: torch.device, vae: VAE) -> dict[str, Any]:
    return {
        "kind": "vae",
        **asdict(cfg),
        "depth": vae.depth,
        "resolved_device": str(device),
        "resize_rule": RESIZE_RULE,  # how the frames were brought to size (training/data.py)
        "data": data.sources,
        "data_fingerprint": data.fingerprint,
        "n_train": int(len(data.train)),
        "n_val": int(len(data.val)),
        "versions": runs.package_versions(),
    }


def train_vae(cfg: VAEConfig, data_sources: list[str], out_dir: str | Path, resume: bool = False) -> Path:
    """Train (or resume) a VAE run in ``out_dir`` and return the run directory.

    Writes config.json, history.jsonl, checkpoint.pt every epoch, model.pt whenever validation
    bits/dim improve, the plots, and the fitted and calibrated heads (:func:`fit_heads`).
    ``resume`` continues after the last checkpointed epoch with the saved config and data; only run
    control (epochs, patience, max_minutes, device, amp, calibrate) is taken from ``cfg``.
    """
    VAEArch(size=cfg.size, width=cfg.width, depth=cfg.depth, latent_dim=cfg.latent_dim).validate()
    run_dir = runs.create_run_dir(out_dir, resume=resume)
    if resume:
        saved = runs.load_config(run_dir)
        overrides = {k: getattr(cfg, k) for k in _RESUMABLE_FIELDS}
        cfg = VAEConfig.from_dict({**saved, **overrides})
        data_sources = list(saved["data"]) or data_sources
    device = runs.resolve_device(cfg.device)
    runs.seed_everything(cfg.seed, deterministic=device.type == "cpu")

    if cfg.dry_run and not data_sources:
        data = _noise_data(cfg)
    else:
        limit = DRY_RUN_FRAMES if cfg.dry_run else None
        data = load_training_frames(data_sources, cfg.size, seed=cfg.seed, max_frames=limit)
    if resume and data.fingerprint != saved.get("data_fingerprint"):
        log.warning("data changed since the run started (fingerprint differs); resuming anyway")

    vae = VAE(size=cfg.size, width=cfg.width, depth=cfg.depth, latent_dim=cfg.latent_dim).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    config = _resolved_config(cfg, data, device, vae)
    start_epoch, best_val, since_best, history = 1, math.inf, 0, []
    if resume:
        ckpt = runs.load_checkpoint(run_dir, map_location=device)
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        runs.set_rng_state(ckpt["rng"])
        start_epoch, best_val, since_best = ckpt["epoch"] + 1, ckpt["best_val"], ckpt["since_best"]
        history = ckpt["history"]
        runs.write_history(run_dir, history)
        config["data_fingerprint_at_start"] = saved.get("data_fingerprint")
        log.info("resuming %s after epoch %d (best val %.4f bits/dim)", run_dir, ckpt["epoch"], best_val)
    runs.save_config(run_dir, config)
    log.info(
        "VAE %s width %d depth %d latent %d: %d train / %d val frames on %s",
        cfg.size, cfg.width, vae.depth, cfg.latent_dim, len(data.train), len(data.val), device,
    )  # fmt: skip

    started = time.monotonic()
    deadline = started + cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf
    last_epoch = 1 if cfg.dry_run else cfg.epochs
    epoch = start_epoch - 1
    for epoch in range(start_epoch, last_epoch + 1):
        t0 = time.monotonic()
        record: dict[str, Any] = {"epoch": epoch}
        record |= _train_epoch(vae, opt, data.train, cfg, device, epoch, deadline)
        record |= evaluate_vae(vae, data.val, device, amp=cfg.amp)
        record["seconds"] = round(time.monotonic() - t0, 2)
        history.append(record)
        runs.append_history(run_dir, record)
        improved = record["val_bpd"] < best_val
        if improved:
            best_val, since_best = record["val_bpd"], 0
            runs.save_model(
                run_dir, "vae", config, vae.state_dict(), arch=vae.config(), epoch=epoch, val_bpd=best_val
            )
        else:
            since_best += 1
        runs.save_checkpoint(
            run_dir,
            {
                "model": vae.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "best_val": best_val,
                "since_best": since_best,
                "history": history,
                "rng": runs.rng_state(),
            },
        )
        write_plots(vae, run_dir, data, device, history, tsne=False, seed=cfg.seed)
        log.info(
            "epoch %d: train %.4f, val %.4f bits/dim%s (%.1fs)",
            epoch, record["train_bpd"], record["val_bpd"], " (best)" if improved else "", record["seconds"],
        )  # fmt: skip
        if since_best >= cfg.patience:
            log.info("early stop: no val improvement for %d epochs", cfg.patience)
            break
        if time.monotonic() > deadline:
            log.info("time budget of %.1f min reached in epoch %d", cfg.max_minutes, epoch)
            break

    if not (run_dir / runs.MODEL).is_file():
        raise RuntimeError(f"no epoch finished in {run_dir}; nothing to save")
    best, _ = load_vae(run_dir)
    best.to(device)
    write_plots(best, run_dir, data, device, history, tsne=True, seed=cfg.seed)
    # A dry run fits and calibrates only the model heads: the others read the whole data set.
    heads = model_heads("vae") if cfg.dry_run else None
    defer = deferred_heads(cfg.size)
    fit_heads(run_dir, data.val, heads=heads, calibrate=cfg.calibrate, check=cfg.dry_run, defer=defer)
    log.info("done: %s (best val %.4f bits/dim after %d epochs)", run_dir, best_val, epoch)
    return run_dir
