"""Pixel baselines that every score head must beat, fitted on the run's training normals only.

- ``pca``: reconstruction error of a PCA model, the linear autoencoder (a linear AE with squared
  error learns the principal subspace; Baldi & Hornik 1989). Components keep 95% of the variance.
- ``iforest``: IsolationForest (Liu et al. 2008) on pixels; score = minus sklearn's ``score_samples``.
- ``knn``: mean Euclidean distance to the k = 5 nearest training normals in pixel space.

Pixels are downsampled before fitting, for speed: frames are block-averaged by the largest integer
factor that brings them to at most ``BASELINE_SIDE`` (32) pixels a side (64 -> 32, 128 -> 32), then
scaled to [0, 1] and flattened (3 * 32 * 32 = 3,072 values). Training sets larger than
``MAX_FIT_FRAMES`` are subsampled (fixed seed) so that kNN and IsolationForest stay seconds-long.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

BASELINE_SIDE = 32
MAX_FIT_FRAMES = 4000
BASELINE_NAMES = ("pca", "iforest", "knn")


def pixel_features(frames: npt.NDArray[np.uint8], side: int = BASELINE_SIDE) -> npt.NDArray[np.float32]:
    """Block-average NHWC uint8 frames down to at most ``side`` pixels a side, flatten to [N, D]."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3], got shape {frames.shape}")
    n, h, w, c = frames.shape
    factor = max(1, -(-max(h, w) // side))  # ceil: the smallest factor that fits
    while h % factor or w % factor:  # block averaging needs an exact divisor
        factor += 1
    x = frames.astype(np.float32) / 255.0
    if factor > 1:
        x = x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return x.reshape(n, -1)


@dataclass
class PixelBaseline:
    """One baseline: ``fit`` on normal frames, ``score`` returns [N] floats, higher = more anomalous."""

    name: str
    seed: int = 0
    model: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.name not in BASELINE_NAMES:
            raise ValueError(f"unknown baseline {self.name!r}; valid: {', '.join(BASELINE_NAMES)}")

    def fit(self, frames: npt.NDArray[np.uint8]) -> PixelBaseline:
        """Fit on normal frames (subsampled to ``MAX_FIT_FRAMES``)."""
        if len(frames) < 2:
            raise ValueError(f"baseline {self.name} needs at least 2 training frames, got {len(frames)}")
        if len(frames) > MAX_FIT_FRAMES:
            pick = np.random.default_rng(self.seed).choice(len(frames), MAX_FIT_FRAMES, replace=False)
            frames = frames[np.sort(pick)]
        x = pixel_features(frames)
        if self.name == "pca":
            from sklearn.decomposition import PCA

            self.model = PCA(n_components=0.95, svd_solver="full", random_state=self.seed).fit(x)
        elif self.name == "iforest":
            from sklearn.ensemble import IsolationForest

            self.model = IsolationForest(n_estimators=200, random_state=self.seed).fit(x)
        else:
            from sklearn.neighbors import NearestNeighbors

            self.model = NearestNeighbors(n_neighbors=min(5, len(x))).fit(x)
        return self

    def score(self, frames: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
        """Anomaly scores of frames, higher = more anomalous."""
        if self.model is None:
            raise RuntimeError(f"baseline {self.name} is not fitted; call fit() first")
        x = pixel_features(frames)
        if self.name == "pca":
            recon = self.model.inverse_transform(self.model.transform(x))
            return ((x - recon) ** 2).mean(axis=1).astype(np.float64)
        if self.name == "iforest":
            return -self.model.score_samples(x).astype(np.float64)
        distances, _ = self.model.kneighbors(x)
        return distances.mean(axis=1).astype(np.float64)


def fit_baselines(
    train_frames: npt.NDArray[np.uint8], names: tuple[str, ...] = BASELINE_NAMES, seed: int = 0
) -> dict[str, PixelBaseline]:
    """Fit every named baseline on the same training normals."""
    return {name: PixelBaseline(name, seed=seed).fit(train_frames) for name in names}
