"""Calibration on held-out normals: threshold at a target false-positive rate (p-values: contract)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from contract.manifest import is_edge_case
from training.calibrate import calibrate_scores, load_calibration, save_calibration


def test_threshold_is_the_inverted_cdf_quantile() -> None:
    cal = calibrate_scores(np.arange(100.0)[::-1], target_fpr=0.01)
    assert cal.threshold == 98.0 and cal.n == 100  # exactly 1 of 100 normals (99) exceeds it
    assert calibrate_scores(np.arange(100.0), target_fpr=0.05).threshold == 94.0


@pytest.mark.parametrize("n", [1, 7, 37, 100, 1001])
@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_at_most_the_target_fpr_of_calibration_normals_exceed_the_threshold(n: int, fpr: float) -> None:
    scores = np.random.default_rng(n).normal(size=n)
    cal = calibrate_scores(scores, target_fpr=fpr)
    exceed = np.mean(is_edge_case(scores, cal.threshold))  # the flag rule service and evaluation use
    assert exceed <= fpr + 1e-12
    assert exceed > fpr - 1.0 / n - 1e-12  # and not needlessly conservative


def test_a_score_equal_to_the_threshold_is_not_flagged() -> None:
    """With ties (quantised scores) '>=' would flag more normals than the target allows."""
    scores = np.r_[np.zeros(95), np.ones(5)]
    cal = calibrate_scores(scores, target_fpr=0.01)
    assert cal.threshold == 1.0
    assert not is_edge_case(scores, cal.threshold).any()
    assert is_edge_case([1.0 + 1e-9], cal.threshold).all()


def test_quantiles_and_scores_are_stored_sorted() -> None:
    cal = calibrate_scores([3.0, 1.0, 2.0], target_fpr=0.5)
    assert cal.scores == [1.0, 2.0, 3.0]
    assert cal.quantiles["0.5"] == 2.0 and cal.quantiles["0.999"] == 3.0


@pytest.mark.parametrize(
    ("scores", "fpr", "message"),
    [
        ([], 0.01, "at least one"),
        ([1.0, float("nan")], 0.01, "finite"),
        ([1.0], 0.0, "target_fpr"),
        ([1.0], 1.0, "target_fpr"),
    ],
)
def test_bad_input_is_a_clear_error(scores: list[float], fpr: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        calibrate_scores(scores, target_fpr=fpr)


def test_calibration_file_round_trips(tmp_path: Path) -> None:
    cal = calibrate_scores(np.linspace(0, 1, 11), target_fpr=0.1, head="vae-elbo")
    path = save_calibration(tmp_path, cal)
    assert path == tmp_path / "calibration" / "vae-elbo.json"
    data = json.loads(path.read_text())
    assert set(data) == {"head", "target_fpr", "threshold", "n", "scores", "quantiles", "graph_fingerprint"}
    assert load_calibration(tmp_path, "vae-elbo") == cal
    with pytest.raises(FileNotFoundError, match="no calibration for head 'gan-disc'"):
        load_calibration(tmp_path, "gan-disc")


def test_calibrate_heads_scores_held_out_normals_with_each_head(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from eval_helpers import normal_frames, write_labelled_folder, write_tiny_gan_run

    from training.calibrate import score_frames
    from training.heads import build_score_graph, calibrate_heads

    run = write_tiny_gan_run(tmp_path / "run", write_labelled_folder(tmp_path / "data"))
    val = normal_frames(30, seed=21)
    result = calibrate_heads(run, val, heads=["gan-disc", "gan-patch"], target_fpr=0.1)
    assert set(result) == {"gan-disc", "gan-patch"}
    for head, cal in result.items():
        saved = json.loads((run / "calibration" / f"{head}.json").read_text())
        assert saved["n"] == 30 and saved["target_fpr"] == 0.1 and saved["head"] == head
        expected = np.sort(score_frames(build_score_graph(run, head), val, batch_size=7))
        np.testing.assert_allclose(saved["scores"], expected, rtol=1e-5)  # float32, other batching
        assert np.mean(expected > cal.threshold) <= 0.1


def test_calibrate_heads_rejects_an_unknown_head(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from eval_helpers import normal_frames, write_labelled_folder, write_tiny_gan_run

    from training.heads import calibrate_heads

    run = write_tiny_gan_run(tmp_path / "run", write_labelled_folder(tmp_path / "data"))
    with pytest.raises(ValueError, match="unknown score head 'vae-elbo'"):
        calibrate_heads(run, normal_frames(4), heads=["vae-elbo"])
