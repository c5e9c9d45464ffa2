"""Cheap, Inception-free measurements of a generator, logged every GAN epoch.

- Diversity: mean pairwise distance among generated frames over that among real frames. Mode collapse
  drives it towards 0 long before a loss curve shows anything.
- Quality: the Fréchet distance (Heusel et al. 2017, the "FID" formula) between generated and held-out
  real frames, computed in a fixed PCA space of 16x16 average-pooled pixels instead of Inception
  features: no download, milliseconds on CPU, and comparable across runs on the same data. It sees
  colour layout and coarse structure, not fine texture; ``fd_real`` (train vs val frames through the
  same space) is its noise floor.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from training.pixels import to_unit_range

POOLED = 16  # frames are average-pooled to POOLED x POOLED before PCA
PCA_DIMS = 32


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean L2 distance over distinct pairs, divided by sqrt(dim) (an RMS per value, size-free)."""
    flat = x.flatten(1).double()
    if len(flat) < 2:
        return 0.0
    n = len(flat)
    return float(torch.cdist(flat, flat).sum() / (n * (n - 1)) / math.sqrt(flat.shape[1]))


def frechet_distance(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two samples [n, d] (Heusel et al. 2017).

    The trace of the matrix square root is computed as the sum of square roots of the eigenvalues of
    the symmetric ``S_a^(1/2) S_b S_a^(1/2)``, which is stable without scipy.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two samples [n >= 2, d] of the same d, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


class PixelFrechet:
    """Fréchet distance in a PCA space of pooled pixels, fitted once on training frames."""

    def __init__(self, train: npt.NDArray[np.uint8], max_frames: int = 2000) -> None:
        feats = self._pooled(to_unit_range(torch.from_numpy(train[:max_frames])))
        self.mean = feats.mean(0)
        # Principal axes of the training frames: rows of vt (economy SVD of the centred data).
        _, _, vt = np.linalg.svd(feats - self.mean, full_matrices=False)
        self.axes = vt[: min(PCA_DIMS, len(vt))].T

    @staticmethod
    def _pooled(x: torch.Tensor) -> npt.NDArray[np.float64]:
        size = min(POOLED, x.shape[-1])
        return F.adaptive_avg_pool2d(x.float().cpu(), size).flatten(1).double().numpy()

    def embed(self, images: torch.Tensor) -> npt.NDArray[np.float64]:
        """[-1, 1] NCHW images -> [N, PCA_DIMS] coordinates."""
        return (self._pooled(images) - self.mean) @ self.axes

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Fréchet distance between two batches of [-1, 1] NCHW images."""
        return frechet_distance(self.embed(a), self.embed(b))
