"""The frames an export calibrates and checks on, and the evaluation summary it records.

Calibration needs held-out normals: the run's own validation split, exactly as the trainer split it
(never trained on), or a folder/shard/Parquet given with ``--data``. Parity and the summary also
need edge cases: the test split of a labelled data source, else generic perturbations of normals.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from contract.frames import RESIZE_RULE, FrameSize
from training.onnx_graph import ExportError, Frames

log = logging.getLogger(__name__)

N_PARITY_FRAMES = 37  # per kind (normal, edge case): one full batch of 37 each


def read_normal_frames(source: str | Path, size: FrameSize, limit: int | None = None) -> Frames:
    """Frames of a folder/shard/Parquet of held-out normals; frames labelled as another family are skipped."""
    from contract.readers import ReadReport, count_frames, iter_frames

    report = ReadReport()
    frames = []
    total = count_frames(source)
    for frame in tqdm(
        iter_frames(source, size=size, rule=RESIZE_RULE, report=report),
        total=total,
        desc="read normals",
        leave=False,
    ):
        if str(frame.meta.get("family", "normal")) != "normal":
            continue
        frames.append(frame.image)
        if limit is not None and len(frames) >= limit:
            break
    if not frames:
        raise ExportError(f"no normal frames found in {source} ({report.failed} failed to decode)")
    return np.stack(frames)


def run_data_sources(config: dict[str, Any]) -> list[str]:
    sources = config.get("data") or config.get("data_sources") or []
    return [str(s) for s in ([sources] if isinstance(sources, str | Path) else sources)]


def held_out_normals(config: dict[str, Any], size: FrameSize) -> Frames:
    """The run's own validation normals, split exactly as the trainer split them (never trained on)."""
    from training.data import load_training_frames

    sources = run_data_sources(config)
    if not sources:
        if not config.get("dry_run"):
            raise ExportError("the run's config.json names no data sources; pass --data NORMALS")
        log.warning("dry run without data: calibrating on noise frames (the threshold means nothing)")
        return np.random.default_rng(0).integers(0, 256, (N_PARITY_FRAMES, *size, 3), dtype=np.uint8)
    max_frames = config.get("max_frames")
    if config.get("dry_run"):  # the trainer read only its first few frames; split the same ones
        max_frames = _dry_run_frames(str(config["kind"]))
    data = load_training_frames(
        sources,
        size,
        seed=int(config.get("seed", 0)),
        val_fraction=float(config.get("val_fraction", 0.1)),
        max_frames=max_frames,
    )
    return data.val


def _dry_run_frames(kind: str) -> int:
    """How many frames the trainer of ``kind`` reads in a dry run."""
    if kind == "vae":
        from training.vae_train import DRY_RUN_FRAMES as VAE_FRAMES

        return VAE_FRAMES
    from training.gan_config import DRY_RUN_FRAMES as GAN_FRAMES

    return GAN_FRAMES


def edge_case_frames(
    config: dict[str, Any], size: FrameSize, normals: Frames, n: int
) -> tuple[Frames, list[str]]:
    """Edge-case frames with families: the test split of a labelled data source, else perturbed normals."""
    from training.data import is_labelled_folder, load_labelled_frames

    for source in run_data_sources(config):
        if is_labelled_folder(source):
            frames, families, _, _ = load_labelled_frames(source, size, max_per_family=max(1, n // 8))
            mask = np.array([f != "normal" for f in families])
            if mask.any():
                return frames[mask][:n], [f for f, m in zip(families, mask, strict=True) if m][:n]
    return perturbed_frames(normals, n)


def perturbed_frames(normals: Frames, n: int, seed: int = 0) -> tuple[Frames, list[str]]:
    """Generic out-of-distribution frames made from normals (dark, washed out, noisy, dead rows)."""
    rng = np.random.default_rng(seed)
    base = normals[rng.integers(0, len(normals), n)].astype(np.float32)
    kinds = ["dark", "washed-out", "noise", "dead-rows"]
    families = [kinds[i % len(kinds)] for i in range(n)]
    out = base.copy()
    for i, family in enumerate(families):
        if family == "dark":
            out[i] *= 0.2
        elif family == "washed-out":
            out[i] = 0.3 * out[i] + 0.7 * 200.0
        elif family == "noise":
            out[i] += rng.normal(0, 60, out[i].shape)
        else:
            out[i, ::4] = 0.0
    return np.clip(out, 0, 255).astype(np.uint8), families


def auroc(normal: np.ndarray, edge: np.ndarray) -> float:
    """P(edge score > normal score) + half the ties (Mann-Whitney form of the ROC AUC)."""
    greater = (edge[:, None] > normal[None, :]).mean()
    ties = (edge[:, None] == normal[None, :]).mean()
    return float(greater + 0.5 * ties)


def evaluation_summary(
    normal: np.ndarray, edge: np.ndarray, families: list[str], source: str
) -> dict[str, Any]:
    """AUROC of the exported graph (onnxruntime scores) on the parity frames, overall and per family."""
    fam = np.array(families)
    return {
        "frames": source,
        "scored_with": "onnxruntime",
        "n_normal": int(len(normal)),
        "n_edge": int(len(edge)),
        "auroc": auroc(normal, edge),
        "auroc_by_family": {f: auroc(normal, edge[fam == f]) for f in sorted(set(families))},
    }
