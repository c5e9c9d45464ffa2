"""Helpers for the evaluation tests: tiny labelled folders and tiny real GAN runs (seconds to build).

Normal frames are a blue sky over a grey road with mild noise; edge cases are ``fog`` (blended to
flat grey) and ``blob`` (a 4-pixel magenta square on the road), so a working scorer separates them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from contract.frames import encode_png
from contract.labels import LabelRow, write_labels


def normal_frames(n: int, size: int = 32, seed: int = 0) -> npt.NDArray[np.uint8]:
    """Sky over road, horizon jittered by a few pixels, Gaussian pixel noise."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        horizon = size // 2 + int(rng.integers(-2, 3))
        img = np.zeros((size, size, 3), dtype=np.float32)
        img[:horizon] = (90, 140, 220)
        img[horizon:] = (90, 90, 90)
        img += rng.normal(0, 6, img.shape)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def edge_frames(family: str, n: int, size: int = 32, seed: int = 1) -> npt.NDArray[np.uint8]:
    """Edge cases: ``fog`` or ``blob``."""
    frames = normal_frames(n, size, seed)
    if family == "fog":
        return (0.25 * frames + 0.75 * 180).astype(np.uint8)
    if family == "blob":
        rng = np.random.default_rng(seed)
        for f in frames:
            y, x = int(rng.integers(size // 2 + 3, size - 4)), int(rng.integers(0, size - 4))
            f[y : y + 4, x : x + 4] = (255, 0, 255)
        return frames
    raise ValueError(family)


def write_labelled_folder(
    root: Path, size: int = 32, n_train: int = 48, n_val: int = 24, n_test: int = 16
) -> Path:
    """A synth-like folder: train/val normals, test normals plus ``fog`` and ``blob``; labels.csv."""
    groups = [
        ("train", "normal", normal_frames(n_train, size, seed=10)),
        ("val", "normal", normal_frames(n_val, size, seed=11)),
        ("test", "normal", normal_frames(n_test, size, seed=12)),
        ("test", "fog", edge_frames("fog", n_test, size, seed=13)),
        ("test", "blob", edge_frames("blob", n_test, size, seed=14)),
    ]
    return write_groups(root, groups)


def write_groups(root: Path, groups: list[tuple[str, str, np.ndarray]]) -> Path:
    """Write ``(split, family, frames)`` groups as a synth-like PNG folder with labels.csv."""
    rows = []
    for split, family, frames in groups:
        for i, frame in enumerate(frames):
            key = f"{split}/{family}/{family}_{i:06d}"
            path = root / f"{key}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(frame))
            rows.append(LabelRow(key, f"{key}.png", split, family, 0.0 if family == "normal" else 1.0))
    write_labels(root, rows)
    return root


def write_tiny_gan_run(run_dir: Path, data: Path, size: int = 32) -> Path:
    """An untrained but complete GAN run (config.json, model.pt, D-feature bank) over ``data``."""
    import torch

    from training.dcgan import DCGAN
    from training.heads.gan import compute_dfeat_bank, save_dfeat_bank
    from training.runs import save_config, save_model

    torch.manual_seed(0)
    config = {
        "kind": "gan",
        "size": size,
        "latent_dim": 8,
        "width": 4,
        "d_norm": "batch",
        "seed": 0,
        "data": [str(data)],
        "encoder_trained": True,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_dir, config)
    model = DCGAN(size=size, latent_dim=8, width=4).eval()
    save_model(run_dir, "gan", config, model.state_dict())
    train = normal_frames(32, size, seed=10)
    save_dfeat_bank(run_dir, compute_dfeat_bank(model.discriminator, train))
    return run_dir


def write_tiny_vae_run(run_dir: Path, data: Path, size: int = 32) -> Path:
    """An untrained but complete VAE run (config.json, model.pt) over ``data``."""
    import torch

    from training.runs import save_config, save_model
    from training.vae import VAE

    torch.manual_seed(0)
    vae = VAE(size=size, width=4, latent_dim=8).eval()
    config = {"kind": "vae", "size": size, "seed": 0, "data": [str(data)], **vae.config()}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_dir, config)
    save_model(run_dir, "vae", config, vae.state_dict(), arch=vae.config())
    return run_dir
