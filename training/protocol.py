"""The validation protocol: how heads, settings and combination rules are chosen without edge cases.

No edge-case family is ever used (issue 3's rules). The run's validation normals are split in two
halves by a fixed seed (:func:`validation_halves`). Half A gives statistics (the combo's medians and
MADs). Half B is kept as normals and also turned into pseudo-anomalies by generic self-supervised
corruptions:

- :func:`pseudo_anomalies`: CutPaste (Li et al. 2021: a rectangle cut from another normal frame of
  half A pasted at a random place) and noise patches (a rectangle of uniform noise or of one random
  colour, as in DRAEM's synthetic defects, Zavrtanik et al. 2021), sizes from 2 px to a third of
  the frame, so that both small-object-like and large corruptions occur;
- :func:`heldout_anomalies`: corruptions no head trains on (local light changes, thin scars, global
  changes of contrast, blur, colour; ImageNet-C style, Hendrycks & Dietterich 2019), so that a head
  trained on pasted defects (``<kind>-seg``) cannot choose a rule by itself and global changes
  count as much as local ones.

A score's protocol AUROC is that of normals-B against the corrupted copies (:func:`pseudo_auroc`).
A ranking is not an operating point: a head is used at its calibrated threshold, so rules and
components are chosen by the **protocol score** (:func:`protocol_score`), the mean of the AUROC and
the detection rate at the threshold that lets ``PROTOCOL_FPR`` of the normals through (the
calibration rule, training/calibrate.py). Two scores with the same AUROC differ there when one puts
its corrupted frames just above the normals' bulk and the other above their tail.
Combination rules (:func:`combine`): ``max`` (a union of detectors), ``mean`` (Stouffer-like: evidence
adds up), ``top2`` (between the two). The rule with the highest protocol score is used; rules within
``MIN_GAIN`` of the best are a tie, settled by fewer components, then in the order ``mean``,
``top2``, ``max`` (:func:`preferred`). :func:`select_components` also chooses the components, by
greedy forward selection: one joins only if it buys at least ``MIN_GAIN``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from training.calibrate import calibrate_scores, score_frames

if TYPE_CHECKING:
    from torch import nn

RULES = ("max", "mean", "top2")
# Protocol AUROCs closer than MIN_GAIN are a tie (at 500 validation normals the standard error of an
# AUROC near 0.9 is about 0.01): a component must buy at least this much to join a selected combo, and
# among rules within it of the best, the one with fewer components, then earlier here, is taken.
MIN_GAIN = 0.005
RULE_PREFERENCE = ("mean", "top2", "max")  # mean first: Stouffer's combination of evidence
CORRUPTIONS = ("patches", "heldout", "all")
# The operating point the protocol weighs next to AUROC: the service's default target FPR.
PROTOCOL_FPR = 0.01


def pseudo_anomalies(
    frames: npt.NDArray[np.uint8], donors: npt.NDArray[np.uint8], seed: int = 0
) -> npt.NDArray[np.uint8]:
    """One corrupted copy of each frame: CutPaste from a donor or a noise/colour patch (50/50)."""
    if len(donors) == 0:
        raise ValueError("pseudo-anomalies need at least one donor frame")
    rng = np.random.default_rng(seed)
    out = frames.copy()
    n, h, w, _ = frames.shape
    for i in range(n):
        # Log-uniform side lengths from 2 px to a third of the frame: small objects are most frames' case.
        ph = int(np.clip(np.exp(rng.uniform(np.log(2), np.log(max(3, h // 3)))), 2, h))
        pw = int(np.clip(ph * np.exp(rng.uniform(-0.7, 0.7)), 2, w))
        y, x = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        if rng.random() < 0.5:
            donor = donors[rng.integers(len(donors))]
            sy, sx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
            out[i, y : y + ph, x : x + pw] = donor[sy : sy + ph, sx : sx + pw]
        elif rng.random() < 0.5:
            out[i, y : y + ph, x : x + pw] = rng.integers(0, 256, (ph, pw, 3), dtype=np.uint8)
        else:
            out[i, y : y + ph, x : x + pw] = rng.integers(0, 256, 3, dtype=np.uint8)
    return out


def _box_blur(frame: npt.NDArray[np.float32], radius: int) -> npt.NDArray[np.float32]:
    """Separable box blur with edge padding (no scipy needed)."""
    k = 2 * radius + 1
    padded = np.pad(frame, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    cums = np.cumsum(np.pad(padded, ((1, 0), (0, 0), (0, 0))), axis=0)
    rows = (cums[k:] - cums[:-k]) / k
    cums = np.cumsum(np.pad(rows, ((0, 0), (1, 0), (0, 0))), axis=1)
    return ((cums[:, k:] - cums[:, :-k]) / k).astype(np.float32)


def heldout_anomalies(frames: npt.NDArray[np.uint8], seed: int = 2) -> npt.NDArray[np.uint8]:
    """One corrupted copy of each frame by corruptions *no head trains on* (a third each):

    - local light change: an ellipse (2 px to a third of the frame) darkened to 30-60% or brightened
      1.5-2.5x, a shadow or a reflection rather than a foreign texture;
    - scar: a straight line 1-2 px wide, 4 px to half the frame long, at any angle, in one colour
      (CutPaste's "scar" variant);
    - global change (ImageNet-C style, Hendrycks & Dietterich 2019): contrast reduced to 40-70%,
      a box blur, or a colour cast of 25-50 levels on one channel.

    The seg head (training/seg_net.py) trains on blob-shaped texture/noise/colour pastes; these
    corruptions test whether a head's sensitivity transfers to defects it never saw.
    """
    rng = np.random.default_rng(seed)
    out = frames.copy()
    n, h, w, _ = frames.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    for i in range(n):
        frame = frames[i].astype(np.float32)
        kind = int(rng.integers(3))
        if kind == 0:
            a = float(np.exp(rng.uniform(np.log(1.0), np.log(max(1.5, h / 6)))))
            b = a * float(np.exp(rng.uniform(-0.7, 0.7)))
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            mask = ((yy - cy) / a) ** 2 + ((xx - cx) / max(b, 0.8)) ** 2 <= 1.0
            if not mask.any():
                mask[min(h - 1, int(cy)), min(w - 1, int(cx))] = True
            gain = rng.uniform(0.3, 0.6) if rng.random() < 0.5 else rng.uniform(1.5, 2.5)
            frame[mask] = frame[mask] * gain
        elif kind == 1:
            length = rng.uniform(4, max(5, h / 2))
            theta = rng.uniform(0, np.pi)
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            t = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
            d = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
            mask = (np.abs(t) <= length / 2) & (np.abs(d) <= rng.uniform(0.5, 1.0))
            if not mask.any():
                mask[min(h - 1, int(cy)), min(w - 1, int(cx))] = True
            frame[mask] = rng.integers(0, 256, 3).astype(np.float32)
        else:
            which = int(rng.integers(3))
            if which == 0:
                mean = frame.mean(axis=(0, 1), keepdims=True)
                frame = mean + rng.uniform(0.4, 0.7) * (frame - mean)
            elif which == 1:
                frame = _box_blur(frame, int(rng.integers(1, 3)))
            else:
                frame[..., int(rng.integers(3))] += rng.choice([-1.0, 1.0]) * rng.uniform(25, 50)
        out[i] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return out


def validation_halves(
    val: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """The protocol's split of validation normals: (half A, half B, pseudo-anomalies of half B)."""
    order = np.random.default_rng(0).permutation(len(val))
    half_a, half_b = val[np.sort(order[: len(val) // 2])], val[np.sort(order[len(val) // 2 :])]
    return half_a, half_b, pseudo_anomalies(half_b, half_a, seed=1)


def pseudo_auroc(
    graph: nn.Module, val: npt.NDArray[np.uint8], name: str = "graph", corruptions: str = "patches"
) -> float:
    """AUROC of one graph on the validation protocol: normals of half B vs corrupted copies of them.

    ``corruptions``: ``patches`` (CutPaste / noise / colour rectangles, :func:`pseudo_anomalies`),
    ``heldout`` (light changes, scars, global changes, :func:`heldout_anomalies`) or ``all`` (both).
    How a setting of a head (a grid, a normalisation) is chosen without looking at edge-case families.
    """
    from sklearn.metrics import roc_auc_score

    if corruptions not in CORRUPTIONS:
        raise ValueError(f"unknown corruptions {corruptions!r}; valid: {', '.join(CORRUPTIONS)}")
    _, half_b, pseudo = validation_halves(val)
    sets = {"patches": [pseudo], "heldout": [heldout_anomalies(half_b)]}
    sets["all"] = sets["patches"] + sets["heldout"]
    normal = score_frames(graph, half_b, desc=f"protocol normals {name}")
    corrupted = np.concatenate(
        [score_frames(graph, frames, desc=f"protocol {corruptions} {name}") for frames in sets[corruptions]]
    )
    labels = np.r_[np.zeros(len(normal)), np.ones(len(corrupted))]
    return float(roc_auc_score(labels, np.nan_to_num(np.r_[normal, corrupted], nan=np.inf)))


def combine(z: np.ndarray | torch.Tensor, rule: str) -> Any:
    """Combine z-scores [N, K] into [N] by ``rule`` (numpy or torch; same math as the graph)."""
    if rule not in RULES:
        raise ValueError(f"unknown combination rule {rule!r}; valid: {', '.join(RULES)}")
    lib = torch if isinstance(z, torch.Tensor) else np
    if rule == "max":
        return z.max(1).values if lib is torch else z.max(1)
    if rule == "mean":
        return z.mean(1)
    k = min(2, z.shape[1])
    top = torch.topk(z, k, dim=1).values if lib is torch else -np.sort(-z, axis=1)[:, :k]
    return top.mean(1)


def detection_at_threshold(
    normal: npt.ArrayLike, corrupted: npt.ArrayLike, target_fpr: float = PROTOCOL_FPR
) -> float:
    """Fraction of ``corrupted`` scored above the threshold calibrated on ``normal`` at ``target_fpr``."""
    threshold = calibrate_scores(normal, target_fpr=target_fpr).threshold
    return float(np.mean(np.asarray(corrupted, dtype=np.float64) > threshold))


def protocol_score(
    normal: npt.ArrayLike, corrupted: npt.ArrayLike, target_fpr: float = PROTOCOL_FPR
) -> float:
    """What the protocol maximises: (AUROC + detection rate at the ``target_fpr`` threshold) / 2."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(normal, dtype=np.float64), np.asarray(corrupted, dtype=np.float64)
    auroc = roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b])
    return float((auroc + detection_at_threshold(a, b, target_fpr)) / 2)


def rule_score(z_normal: np.ndarray, z_pseudo: np.ndarray, rule: str) -> float:
    """:func:`protocol_score` of normals vs pseudo-anomalies for z-scores [N, K] combined by ``rule``."""
    return protocol_score(combine(z_normal, rule), combine(z_pseudo, rule))


def preferred(results: dict[str, tuple[float, int]]) -> str:
    """The rule to use given ``rule -> (protocol score, components)``: the best score, where rules
    within ``MIN_GAIN`` of it tie; ties go to fewer components, then to ``RULE_PREFERENCE`` order."""
    top = max(auroc for auroc, _ in results.values())
    near = [rule for rule, (auroc, _) in results.items() if auroc >= top - MIN_GAIN]
    return min(near, key=lambda rule: (results[rule][1], RULE_PREFERENCE.index(rule)))


def choose_rule(z_normal: np.ndarray, z_pseudo: np.ndarray) -> tuple[str, dict[str, float], list[float]]:
    """The rule for a fixed set of components (:func:`preferred`); all rules' and components' protocol
    scores (:func:`protocol_score`)."""
    by_rule = {rule: rule_score(z_normal, z_pseudo, rule) for rule in RULES}
    k = z_normal.shape[1]
    per_component = [rule_score(z_normal[:, [i]], z_pseudo[:, [i]], "max") for i in range(k)]
    best = preferred({rule: (auroc, k) for rule, auroc in by_rule.items()})
    return best, by_rule, per_component


def select_components(z_normal: np.ndarray, z_pseudo: np.ndarray) -> tuple[str, list[int], dict[str, float]]:
    """Greedy forward selection of components for each rule, then :func:`preferred` across rules.

    Per rule: start from the component with the best protocol score, add the one that raises it most,
    stop when the best addition buys less than ``MIN_GAIN``. Returns (rule, chosen column indices in
    order of selection, the protocol score each rule's selection reached).
    """
    paths: dict[str, tuple[float, list[int]]] = {}
    for rule in RULES:
        chosen: list[int] = []
        best = -np.inf
        while len(chosen) < z_normal.shape[1]:
            trials = [
                (rule_score(z_normal[:, [*chosen, k]], z_pseudo[:, [*chosen, k]], rule), -k)
                for k in range(z_normal.shape[1])
                if k not in chosen
            ]
            auroc, neg_k = max(trials)  # ties: the earlier candidate
            if auroc < best + MIN_GAIN:
                break
            chosen.append(-neg_k)
            best = auroc
        paths[rule] = (float(best), chosen)
    rule = preferred({r: (auroc, len(cols)) for r, (auroc, cols) in paths.items()})
    return rule, paths[rule][1], {r: auroc for r, (auroc, _) in paths.items()}
