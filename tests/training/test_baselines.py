"""Pixel baselines (PCA reconstruction, IsolationForest, kNN): fitted on normals, higher = stranger."""

from __future__ import annotations

import numpy as np
import pytest
from eval_helpers import edge_frames, normal_frames

from training.baselines import BASELINE_NAMES, PixelBaseline, fit_baselines, pixel_features


def test_pixel_features_block_average_down_to_at_most_32_a_side() -> None:
    assert pixel_features(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, 32 * 32 * 3)
    assert pixel_features(np.zeros((2, 128, 128, 3), np.uint8)).shape == (2, 32 * 32 * 3)
    assert pixel_features(np.zeros((1, 24, 24, 3), np.uint8)).shape == (1, 24 * 24 * 3)
    x = pixel_features(np.full((1, 64, 64, 3), 255, np.uint8))
    np.testing.assert_allclose(x, 1.0)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        pixel_features(np.zeros((2, 8, 8), np.uint8))


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_baseline_scores_one_value_per_frame_and_ranks_an_obvious_outlier_highest(name: str) -> None:
    model = PixelBaseline(name).fit(normal_frames(60, seed=0))
    test = np.concatenate([normal_frames(10, seed=1), edge_frames("fog", 1, seed=2)])
    scores = model.score(test)
    assert scores.shape == (11,) and scores.dtype == np.float64
    assert np.argmax(scores) == 10


def test_fit_baselines_fits_all_three() -> None:
    models = fit_baselines(normal_frames(20, seed=0))
    assert set(models) == set(BASELINE_NAMES)
    assert all(m.model is not None for m in models.values())


def test_misuse_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown baseline 'svm'"):
        PixelBaseline("svm")
    with pytest.raises(RuntimeError, match="not fitted"):
        PixelBaseline("knn").score(normal_frames(2))
    with pytest.raises(ValueError, match="at least 2"):
        PixelBaseline("pca").fit(normal_frames(1))
