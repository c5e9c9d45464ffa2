"""The plots of a VAE run: losses every epoch, reconstructions and samples, and a t-SNE of latents.

t-SNE (van der Maaten & Hinton 2008) of the posterior means of validation normals and, when a data
source is labelled, of edge-case test frames: how far the encoder separates them, at a glance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from training import runs
from training.data import TrainingData, is_labelled_folder, load_labelled_frames
from training.pixels import to_uint8_frames, to_unit_range
from training.plots import plot_losses, plot_tsne, save_image_grid
from training.vae import VAE

log = logging.getLogger(__name__)


@torch.no_grad()
def write_plots(
    vae: VAE,
    run_dir: Path,
    data: TrainingData,
    device: torch.device,
    history: list[dict[str, Any]],
    *,
    tsne: bool,
    seed: int = 0,
) -> None:
    """loss.png every epoch; reconstructions and samples; t-SNE of val latents at the end."""
    plots = run_dir / runs.PLOTS
    plot_losses(history, plots / "loss.png")
    vae.eval()
    originals = data.val[:8]
    x = to_unit_range(torch.from_numpy(originals).to(device))
    recon = to_uint8_frames(vae.decode(vae.encode(x)[0])).cpu().numpy()
    save_image_grid(
        np.concatenate([originals, recon]), plots / "reconstructions.png", nrow=len(originals), scale=2
    )
    samples = to_uint8_frames(vae.sample(32, torch.Generator().manual_seed(seed))).cpu().numpy()
    save_image_grid(samples, plots / "samples.png", nrow=8, scale=2)
    if tsne:
        frames, labels = _tsne_frames(data, seed)
        latents = torch.cat(
            [
                vae.encode(to_unit_range(torch.from_numpy(frames[i : i + 256]).to(device)))[0].float().cpu()
                for i in range(0, len(frames), 256)
            ]
        )
        plot_tsne(latents.numpy(), labels, plots / "tsne.png", seed=seed, title="t-SNE of posterior means")


def _tsne_frames(data: TrainingData, seed: int) -> tuple[npt.NDArray[np.uint8], list[str]]:
    """Val normals (up to 600) plus, from a labelled source, up to 40 test frames per family
    (about 1,000 points: t-SNE stays within seconds)."""
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(data.val), min(600, len(data.val)), replace=False))
    frames = [data.val[keep]]
    labels = [data.labels[i] for i in keep] if data.labels is not None else ["val"] * len(keep)
    for source in data.sources:
        if not is_labelled_folder(source):
            continue
        try:
            test, families, _, _ = load_labelled_frames(source, data.val.shape[1:3], max_per_family=40)
        except ValueError as exc:
            log.info("t-SNE without test frames of %s: %s", source, exc)
            continue
        anomalous = np.array([f != "normal" for f in families])
        frames.append(test[anomalous])
        labels += [f for f in families if f != "normal"]
    return np.concatenate(frames), labels
