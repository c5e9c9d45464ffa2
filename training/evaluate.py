"""Evaluation of score heads and pixel baselines on labelled frames, per edge-case family.

For every scorer (each head's torch graph, and each baseline fitted on the run's training normals)
and every family ``f`` other than ``normal``, the positives are the frames of ``f`` and the
negatives are the normal frames of the same labelled set. Reported per family and overall (all
edge cases against the normals):

- AUROC and AUPR (average precision) from ``sklearn.metrics``;
- FPR at 95% TPR: the smallest false-positive rate on the ROC curve whose TPR is >= 0.95;
- at the calibrated threshold (``RUN_DIR/calibration/<head>.json``, held-out normals only; baselines
  are calibrated the same way on the run's validation normals): the detection rate of the family
  and the false-positive rate on the normal test frames (flag when ``score > threshold``);
- the mean AUROC over families (each family weighs the same, however many frames it has).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from contract.manifest import is_edge_case
from training.calibrate import Calibration, calibrate_scores

log = logging.getLogger(__name__)

NORMAL = "normal"
TOP_FRAMES = 32


def fpr_at_tpr(labels: npt.ArrayLike, scores: npt.ArrayLike, tpr_level: float = 0.95) -> float:
    """The smallest false-positive rate at which the true-positive rate reaches ``tpr_level``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return float(fpr[np.searchsorted(tpr, tpr_level - 1e-12, side="left")])


def binary_metrics(
    normal_scores: npt.ArrayLike, anomaly_scores: npt.ArrayLike, threshold: float | None = None
) -> dict[str, float]:
    """AUROC, AUPR, FPR@95%TPR and (with a threshold) detection and false-positive rates."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    neg = np.asarray(normal_scores, dtype=np.float64)
    pos = np.asarray(anomaly_scores, dtype=np.float64)
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError(f"metrics need normal and anomalous frames, got {len(neg)} and {len(pos)}")
    labels = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    scores = np.nan_to_num(np.r_[neg, pos], nan=np.inf)  # a NaN score is treated as maximally anomalous
    out = {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr": float(average_precision_score(labels, scores)),
        "fpr_at_95tpr": fpr_at_tpr(labels, scores, 0.95),
        "n_normal": len(neg),
        "n_anomaly": len(pos),
    }
    if threshold is not None:
        out["detection_rate"] = float(np.mean(is_edge_case(pos, threshold)))
        out["false_positive_rate"] = float(np.mean(is_edge_case(neg, threshold)))
    return out


def evaluate_scores(
    scores: npt.ArrayLike, families: list[str], threshold: float | None = None
) -> dict[str, Any]:
    """Metrics of one scorer: ``{"overall": {...}, "families": {family: {...}}, "mean_auroc"}``."""
    values = np.asarray(scores, dtype=np.float64)
    fam = np.asarray(families)
    if len(values) != len(fam):
        raise ValueError(f"{len(values)} scores for {len(fam)} family labels")
    is_normal = fam == NORMAL
    if not is_normal.any():
        raise ValueError("the labelled set has no 'normal' frames: nothing to compare edge cases with")
    names = sorted(set(fam[~is_normal].tolist()))
    if not names:
        raise ValueError("the labelled set has only 'normal' frames: no edge case to detect")
    per_family = {f: binary_metrics(values[is_normal], values[fam == f], threshold) for f in names}
    return {
        "overall": binary_metrics(values[is_normal], values[~is_normal], threshold),
        "families": per_family,
        "mean_auroc": float(np.mean([m["auroc"] for m in per_family.values()])),
        "threshold": threshold,
    }


@dataclass
class ScorerResult:
    """One scorer's scores on the labelled frames, its calibration, metrics and (heads) maps."""

    name: str
    source: str  # "head" or "baseline"
    scores: npt.NDArray[np.float64]
    calibration: Calibration
    metrics: dict[str, Any] = field(default_factory=dict)
    maps: npt.NDArray[np.float32] | None = field(default=None, repr=False)  # of ``top_indices``
    top_indices: npt.NDArray[np.int64] | None = None


def score_with_maps(
    graph: Any,
    frames: npt.NDArray[np.uint8],
    batch_size: int = 64,
    desc: str = "scoring",
    keep_maps: bool = False,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]:
    """Scores [N] of a graph and, with ``keep_maps`` and a graph that has them, its anomaly maps [N, H, W]."""
    import torch
    from tqdm import tqdm

    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    graph.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(frames), batch_size), desc=desc, unit="batch", leave=False):
            out = graph(torch.from_numpy(np.ascontiguousarray(frames[start : start + batch_size])))
            if isinstance(out, tuple | list):
                scores.append(out[0].double().numpy())
                if keep_maps and len(out) > 1:
                    maps.append(out[1].float().numpy())
            else:
                scores.append(out.double().numpy())
    return np.concatenate(scores), (np.concatenate(maps) if maps else None)


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    *,
    heads: list[str] | None = None,
    max_per_family: int | None = None,
    baselines: bool = True,
    target_fpr: float = 0.01,
    batch_size: int = 64,
) -> tuple[list[ScorerResult], list[str], npt.NDArray[np.uint8], list[str]]:
    """Score the labelled frames of ``data`` with every head of the run and every baseline.

    Returns ``(results, families, frames, keys)``. A head without a calibration file, or whose file
    was written for another graph (its fingerprint differs), is calibrated here on the run's
    validation normals (and the file is written, as ``edgecase calibrate`` would).
    """
    from contract.labels import is_normal
    from training.baselines import fit_baselines
    from training.calibrate import calibrate_graph, graph_fingerprint, load_calibration
    from training.data import load_labelled_frames
    from training.heads import available_heads, build_score_graph
    from training.runs import load_config, run_normals, run_size

    config = load_config(run_dir)
    size = run_size(config)  # "WxH" (an int side in runs made before H x W sizes)
    names = available_heads(run_dir) if heads is None else list(heads)
    valid = set(available_heads(run_dir))
    unknown = [h for h in names if h not in valid]
    if unknown:
        raise ValueError(
            f"unknown head(s) {', '.join(unknown)} for this run; valid: {', '.join(sorted(valid))}"
        )
    frames, families, keys, _ = load_labelled_frames(data, size, max_per_family=max_per_family)
    families = [NORMAL if is_normal(f) else f for f in families]  # "Normal", " normal " -> "normal"
    log.info("evaluating %d labelled frames (%s)", len(frames), ", ".join(sorted(set(families))))
    val: npt.NDArray[np.uint8] | None = None
    results: list[ScorerResult] = []
    for head in names:
        graph = build_score_graph(run_dir, head)
        try:
            calibration = load_calibration(run_dir, head)
            stale = calibration.graph_fingerprint != graph_fingerprint(graph)
        except FileNotFoundError:
            calibration, stale = None, True
        if calibration is None or stale:
            if val is None:
                val = run_normals(run_dir, "val")
            why = "has no calibration yet" if calibration is None else "was calibrated with another graph"
            log.info("%s %s: calibrating on %d validation normals", head, why, len(val))
            calibration = calibrate_graph(run_dir, graph, head, val, target_fpr, batch_size)
        scores, _ = score_with_maps(graph, frames, batch_size, desc=f"evaluating {head}")
        results.append(ScorerResult(head, "head", scores, calibration))
    if baselines:
        train = run_normals(run_dir, "train")
        val = run_normals(run_dir, "val") if val is None else val
        for name, model in fit_baselines(train, seed=int(config.get("seed", 0))).items():
            calibration = calibrate_scores(model.score(val), target_fpr=target_fpr, head=name)
            results.append(ScorerResult(name, "baseline", model.score(frames), calibration))
    for result in results:
        result.metrics = evaluate_scores(result.scores, families, result.calibration.threshold)
    heads_only = [r for r in results if r.source == "head"]
    if heads_only:  # anomaly maps of the best head's top-scoring frames, for the report's image grid
        best = best_result(heads_only)
        best.top_indices = np.argsort(-best.scores, kind="stable")[:TOP_FRAMES]
        graph = build_score_graph(run_dir, best.name)
        _, best.maps = score_with_maps(
            graph, frames[best.top_indices], batch_size, desc="maps", keep_maps=True
        )
    return results, families, frames, keys


def best_result(results: list[ScorerResult], source: str = "head") -> ScorerResult:
    """The scorer of ``source`` with the highest mean AUROC over families."""
    pool = [r for r in results if r.source == source] or results
    return max(pool, key=lambda r: r.metrics["mean_auroc"])
