"""Evaluation: metrics per family, the report files, and `edgecase evaluate` on a tiny real run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from edgecase.cli import main
from training.calibrate import calibrate_scores
from training.evaluate import ScorerResult, binary_metrics, evaluate_scores, fpr_at_tpr
from training.report import write_report


def test_perfectly_separated_scores_have_auroc_one_and_no_false_positives_at_95_tpr() -> None:
    m = binary_metrics(normal_scores=np.arange(100), anomaly_scores=np.arange(100) + 1000, threshold=500)
    assert m["auroc"] == 1.0 and m["aupr"] == 1.0 and m["fpr_at_95tpr"] == 0.0
    assert m["detection_rate"] == 1.0 and m["false_positive_rate"] == 0.0


def test_indistinguishable_scores_have_auroc_near_one_half() -> None:
    rng = np.random.default_rng(0)
    m = binary_metrics(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(m["auroc"] - 0.5) < 0.03
    assert abs(m["fpr_at_95tpr"] - 0.95) < 0.03
    assert abs(m["aupr"] - 0.5) < 0.03  # the positive fraction


def test_inverted_scores_have_auroc_zero() -> None:
    assert binary_metrics([5.0, 6.0], [1.0, 2.0])["auroc"] == 0.0


def test_fpr_at_95_tpr_on_a_known_ranking() -> None:
    # 20 positives at 1..20, normals at 0.5 and 10.5: reaching 19 of 20 positives (95%) needs the
    # threshold at 2, which lets through one of the two normals.
    labels = np.r_[np.ones(20), np.zeros(2)]
    scores = np.r_[np.arange(1, 21), 0.5, 10.5]
    assert fpr_at_tpr(labels, scores, 0.95) == 0.5
    assert fpr_at_tpr(labels, scores, 0.5) == 0.0


def test_rates_at_the_threshold_count_strictly_greater_scores() -> None:
    m = binary_metrics([0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0], threshold=2.0)
    assert m["false_positive_rate"] == 0.25 and m["detection_rate"] == 0.75


def test_evaluate_scores_reports_each_family_against_the_normals() -> None:
    families = ["normal"] * 4 + ["fog"] * 2 + ["pedestrian"] * 2
    scores = [0, 1, 2, 3, 10, 11, 0.5, 2.5]
    result = evaluate_scores(scores, families, threshold=2.5)
    assert set(result["families"]) == {"fog", "pedestrian"}
    assert result["families"]["fog"]["auroc"] == 1.0
    assert result["families"]["pedestrian"]["auroc"] == 0.5
    assert result["mean_auroc"] == 0.75  # families weigh the same whatever their size
    assert result["overall"]["n_anomaly"] == 4 and result["overall"]["false_positive_rate"] == 0.25


@pytest.mark.parametrize(
    ("families", "message"), [(["fog", "fog"], "no 'normal' frames"), (["normal", "normal"], "only 'normal'")]
)
def test_a_labelled_set_without_both_kinds_is_a_clear_error(families: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_scores([0.0, 1.0], families)


def fake_result(name: str, source: str, scores: np.ndarray, families: list[str]) -> ScorerResult:
    normals = scores[np.asarray(families) == "normal"]
    result = ScorerResult(name, source, scores, calibrate_scores(normals, 0.1, head=name))
    result.metrics = evaluate_scores(scores, families, result.calibration.threshold)
    return result


def test_report_writes_markdown_json_and_figures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    families = ["normal"] * 30 + ["fog"] * 10 + ["pedestrian"] * 10
    frames = rng.integers(0, 256, (50, 16, 16, 3), dtype=np.uint8)
    good = np.r_[rng.normal(size=30), rng.normal(3, 1, 20)]
    results = [
        fake_result("vae-elbo", "head", rng.normal(size=50), families),
        fake_result("vae-combo", "head", good, families),
        fake_result("pca", "baseline", rng.normal(size=50), families),
    ]
    results[1].top_indices = np.argsort(-good)[:8]
    results[1].maps = rng.random((8, 16, 16)).astype(np.float32)
    path = write_report(tmp_path, results, families, frames, {"run_dir": "runs/x", "data": "d"})
    text = path.read_text()
    assert "**Best head: `vae-combo`**" in text and "| `pca` |" in text and "pedestrian" in text
    for name in ("roc.png", "top_frames.png", "hist_vae-elbo.png", "hist_pca.png", "report.json"):
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["best_head"] == "vae-combo" and data["counts"] == {"fog": 10, "normal": 30, "pedestrian": 10}
    assert (
        data["scorers"]["pca"]["families"]["fog"]["auroc"] == results[2].metrics["families"]["fog"]["auroc"]
    )


def test_evaluate_help_works(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--data" in out and "--max-per-family" in out and "Example:" in out


def test_evaluate_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_evaluate_a_tiny_gan_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    from eval_helpers import write_labelled_folder, write_tiny_gan_run

    data = write_labelled_folder(tmp_path / "data")
    run = write_tiny_gan_run(tmp_path / "run", data)
    out = tmp_path / "report"
    code = main(
        ["evaluate", str(run), "--data", str(data), "--heads", "gan-disc", "gan-patch", "--out", str(out)]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["scorers"]) == {"gan-disc", "gan-patch", "pca", "iforest", "knn"}
    assert report["counts"] == {"blob": 16, "fog": 16, "normal": 16}
    # The patch head sees a 4-pixel square even with an untrained discriminator's features.
    assert report["scorers"]["gan-patch"]["families"]["blob"]["auroc"] > 0.9
    assert (run / "calibration" / "gan-patch.json").is_file()  # calibrated on the run's val normals
    assert "best head:" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--data", str(data), "--heads", "vae-elbo"]) == 2


def test_evaluate_recalibrates_a_head_whose_threshold_was_computed_with_another_graph(tmp_path: Path) -> None:
    """A threshold belongs to the graph it was computed with; a rebuilt head must not keep a stale one."""
    pytest.importorskip("torch")
    from eval_helpers import write_labelled_folder, write_tiny_gan_run

    from training.calibrate import graph_fingerprint, load_calibration, save_calibration
    from training.evaluate import evaluate_run
    from training.heads import build_score_graph

    data = write_labelled_folder(tmp_path / "data")
    run = write_tiny_gan_run(tmp_path / "run", data)
    evaluate_run(run, data, heads=["gan-disc"], baselines=False)
    fresh = load_calibration(run, "gan-disc")
    assert fresh.graph_fingerprint == graph_fingerprint(build_score_graph(run, "gan-disc"))
    stale = dataclasses.replace(fresh, threshold=1e9, graph_fingerprint="another graph")
    save_calibration(run, stale)
    results, _, _, _ = evaluate_run(run, data, heads=["gan-disc"], baselines=False)
    assert results[0].calibration.threshold == fresh.threshold
    assert load_calibration(run, "gan-disc") == fresh
