"""Calibration of a score head on held-out normal frames: a threshold at a target false-positive rate.

Only normal frames are needed. The calibration scores are kept, so a p-value can be computed for any
score later: the conformal one, ``contract.manifest.conformal_p_values`` (the one definition, which
the service uses too). The quantiles stored beside the threshold are ``contract.manifest.quantiles_of``.

Threshold rule: the threshold is the empirical ``1 - target_fpr`` quantile with the *inverted CDF*
definition (numpy ``method="inverted_cdf"``): the smallest calibration score ``t`` with
``#{c_i <= t} >= (1 - target_fpr) * n``. A frame is flagged when ``score > threshold`` (strictly), so
at most ``target_fpr`` of the calibration normals are flagged.

Files: ``RUN_DIR/calibration/<head>.json`` with
``{"head", "target_fpr", "threshold", "n", "scores": [...], "quantiles": {...}, "graph_fingerprint"}``.
The fingerprint (:func:`graph_fingerprint`) ties a threshold to the graph it was computed with: a
head rebuilt differently (a re-fitted combo, a retrained seg net) is recalibrated by ``evaluate``
instead of being judged against a stale threshold.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from contract.manifest import quantiles_of

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """Threshold and reference scores of one head on held-out normal frames."""

    threshold: float
    quantiles: dict[str, float]
    n: int
    scores: list[float] = field(repr=False)
    target_fpr: float = 0.01
    head: str = ""
    graph_fingerprint: str = ""

    def to_json(self) -> dict[str, Any]:
        """The on-disk form (see the module docstring)."""
        return {
            "head": self.head,
            "target_fpr": self.target_fpr,
            "threshold": self.threshold,
            "n": self.n,
            "scores": self.scores,
            "quantiles": self.quantiles,
            "graph_fingerprint": self.graph_fingerprint,
        }


def graph_fingerprint(graph: nn.Module) -> str:
    """sha256 of what decides a graph's scores: every tensor of its state and every module's plain
    settings (a combo's rule, a smoothing size), in a fixed order."""
    import hashlib

    digest = hashlib.sha256()
    for name, module in graph.named_modules():
        plain = {
            key: value
            for key, value in vars(module).items()
            if not key.startswith("_") and key != "training" and isinstance(value, str | int | float | tuple)
        }
        digest.update(f"{name}:{type(module).__name__}:{sorted(plain.items())!r}".encode())
    for key, tensor in sorted(graph.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_scores(scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("calibration needs at least one normal score, got none")
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"calibration scores must be finite, got {int((~np.isfinite(values)).sum())} non-finite"
        )
    return values


def threshold_of_sorted(values: npt.NDArray[np.float64], target_fpr: float) -> float:
    """The calibration threshold of ascending ``values``: the smallest order statistic c_(k) with
    k >= (1 - fpr) n, so at most n - k <= fpr * n scores exceed it (flag when ``score > threshold``)."""
    # The epsilon keeps e.g. (1 - 0.01) * 100 = 99.00000000000001 from rounding up to k = 100.
    k = max(1, math.ceil((1.0 - target_fpr) * values.size - 1e-9))
    return float(values[k - 1])


def calibrate_scores(scores: npt.ArrayLike, target_fpr: float = 0.01, head: str = "") -> Calibration:
    """Threshold at ``target_fpr`` (inverted-CDF quantile, flag when ``score > threshold``)."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    values = np.sort(_check_scores(scores))
    n = values.size
    threshold = threshold_of_sorted(values, target_fpr)
    quantiles = quantiles_of(values)
    return Calibration(
        threshold=threshold,
        quantiles=quantiles,
        n=int(n),
        scores=[float(v) for v in values],
        target_fpr=float(target_fpr),
        head=head,
    )


def save_calibration(run_dir: str | Path, calibration: Calibration) -> Path:
    """Write ``RUN_DIR/calibration/<head>.json``; returns its path."""
    if not calibration.head:
        raise ValueError("a calibration needs a head name to be saved")
    out = Path(run_dir) / "calibration" / f"{calibration.head}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(calibration.to_json(), indent=1))
    tmp.replace(out)
    return out


def load_calibration(run_dir: str | Path, head: str) -> Calibration:
    """Read ``RUN_DIR/calibration/<head>.json`` (FileNotFoundError names the missing file)."""
    path = Path(run_dir) / "calibration" / f"{head}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no calibration for head {head!r}: {path} (run `edgecase calibrate`)")
    data = json.loads(path.read_text())
    return Calibration(
        threshold=float(data["threshold"]),
        quantiles={str(k): float(v) for k, v in data.get("quantiles", {}).items()},
        n=int(data["n"]),
        scores=[float(v) for v in data["scores"]],
        target_fpr=float(data["target_fpr"]),
        head=str(data.get("head", head)),
        graph_fingerprint=str(data.get("graph_fingerprint", "")),
    )


def score_frames(
    graph: nn.Module, frames: npt.NDArray[np.uint8], batch_size: int = 64, desc: str = "scoring"
) -> npt.NDArray[np.float64]:
    """Run a score graph over NHWC uint8 frames in batches (no_grad); returns the scores [N]."""
    import torch
    from tqdm import tqdm

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    out: list[np.ndarray] = []
    graph.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(frames), batch_size), desc=desc, unit="batch", leave=False):
            result = graph(torch.from_numpy(np.ascontiguousarray(frames[start : start + batch_size])))
            score = result[0] if isinstance(result, tuple | list) else result
            out.append(score.detach().double().cpu().numpy().reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def calibrate_graph(
    run_dir: str | Path,
    graph: nn.Module,
    head: str,
    val_frames: npt.NDArray[np.uint8],
    target_fpr: float = 0.01,
    batch_size: int = 64,
) -> Calibration:
    """Calibrate one built head on held-out normals and save it, fingerprinted with its graph."""
    scores = score_frames(graph, val_frames, batch_size=batch_size, desc=f"calibrating {head}")
    calibration = replace(
        calibrate_scores(scores, target_fpr=target_fpr, head=head), graph_fingerprint=graph_fingerprint(graph)
    )
    save_calibration(run_dir, calibration)
    return calibration
