"""The validation protocol: how heads, settings and combination rules are chosen without edge cases.

No edge-case family is ever used (issue 3's rules). The run's validation normals are split in two
halves by a fixed seed (:func:`validation_halves`). Half A gives statistics (the combo's medians and
MADs). Half B is kept as normals and also turned into pseudo-anomalies by generic self-supervised
corruptions:

- :func:`pseudo_anomalies`: CutPaste (Li et al. 2021: a rectangle cut from another normal frame of
  half A pasted at a random place) and noise patches (a rectangle of uniform noise or of one random
  colour, as in DRAEM's synthetic defects, Zavrtanik et al. 2021), sizes from 2 px to a third of
  the frame, so that both small-object-like and large corruptions occur;
- :func:`heldout_corruptions`: corruptions no head trains on (local light changes, thin scars, global
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
adds up), ``top2`` (between the two). Corruptions come in four groups (:data:`GROUPS`: pasted
patches, local light changes, scars, global changes) that weigh equally in the protocol score
whatever their frame counts.

For a fixed set of components the rule with the highest protocol score is used; rules whose score is
within the *noise* of the best are a tie, settled by fewer components, then in the order ``mean``,
``top2``, ``max`` (:func:`preferred`). :func:`select_components` also chooses the components (the
ensemble's nine candidates): every subset of up to ``MAX_COMPONENTS`` under every rule, and the
preferred rule's best subset unless another rule's beats it beyond the noise.

The noise: a detection rate at 1% FPR on 500 normals rests on the 5 highest normal scores, so it
moves by several points between two draws of the same frames, far more than an AUROC does. A
difference of protocol scores counts only when it exceeds ``NOISE_Z`` standard errors of itself,
estimated by a paired bootstrap of the validation frames (:func:`difference_noise`; Efron &
Tibshirani 1993), and at least ``MIN_GAIN``. The seventh session's greedy selection without it kept
``max(gan-seg, vae-complexity)`` (protocol score 0.701) over a mean of four heads it could not reach
by adding one head at a time (0.695): 0.864 mean AUROC on the 64x64 test families against 0.910
(docs/benchmarks.md, the 64x64 regression).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from training.calibrate import calibrate_scores, score_frames, threshold_of_sorted

if TYPE_CHECKING:
    from torch import nn

RULES = ("max", "mean", "top2")
# Protocol scores closer than MIN_GAIN are a tie whatever their bootstrap noise (beyond_noise): among
# rules within it of the best, the one with fewer components, then earlier in RULE_PREFERENCE, is taken.
MIN_GAIN = 0.005
# A protocol-score difference smaller than NOISE_Z bootstrap standard errors of itself is a tie
# (a one-sided test at about 2.5%); BOOTSTRAP_ROUNDS paired resamples estimate the standard error.
NOISE_Z = 2.0
BOOTSTRAP_ROUNDS = 200
# select_components: the largest combination searched (of nine candidates: 255 subsets per rule).
MAX_COMPONENTS = 4
RULE_PREFERENCE = ("mean", "top2", "max")  # mean first: Stouffer's combination of evidence
CORRUPTIONS = ("patches", "heldout", "all")
# The protocol's corruption groups, weighed equally whatever their frame counts: pasted patches
# (pseudo_anomalies), and the three kinds of held-out corruption (heldout_corruptions).
GROUPS = ("patch", "light", "scar", "global")
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


def heldout_corruptions(
    frames: npt.NDArray[np.uint8], seed: int = 2
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.str_]]:
    """One corrupted copy of each frame by corruptions *no head trains on* (a third each):

    - local light change: an ellipse (2 px to a third of the frame) darkened to 30-60% or brightened
      1.5-2.5x, a shadow or a reflection rather than a foreign texture;
    - scar: a straight line 1-2 px wide, 4 px to half the frame long, at any angle, in one colour
      (CutPaste's "scar" variant);
    - global change (ImageNet-C style, Hendrycks & Dietterich 2019): contrast reduced to 40-70%,
      a box blur, or a colour cast of 25-50 levels on one channel.

    The seg head (training/seg_net.py) trains on blob-shaped texture/noise/colour pastes; these
    corruptions test whether a head's sensitivity transfers to defects it never saw. Returns the
    corrupted frames and each one's group (``light``, ``scar`` or ``global``, :data:`GROUPS`).
    """
    rng = np.random.default_rng(seed)
    out = frames.copy()
    groups = np.empty(len(frames), dtype="<U8")
    n, h, w, _ = frames.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    for i in range(n):
        frame = frames[i].astype(np.float32)
        kind = int(rng.integers(3))
        groups[i] = GROUPS[1 + kind]
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
    return out, groups


def heldout_anomalies(frames: npt.NDArray[np.uint8], seed: int = 2) -> npt.NDArray[np.uint8]:
    """The frames of :func:`heldout_corruptions` without their groups."""
    return heldout_corruptions(frames, seed)[0]


def validation_halves(
    val: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """The protocol's split of validation normals: (half A, half B, pseudo-anomalies of half B)."""
    order = np.random.default_rng(0).permutation(len(val))
    half_a, half_b = val[np.sort(order[: len(val) // 2])], val[np.sort(order[len(val) // 2 :])]
    return half_a, half_b, pseudo_anomalies(half_b, half_a, seed=1)


def protocol_frames(
    val: npt.NDArray[np.uint8],
) -> tuple[
    npt.NDArray[np.uint8],
    npt.NDArray[np.uint8],
    npt.NDArray[np.uint8],
    npt.NDArray[np.uint8],
    npt.NDArray[np.str_],
]:
    """Everything a combo is fitted on: (half A for statistics, half B's normals, its pasted patches,
    its held-out corruptions, the group of each corrupted frame: patches first, then held-out)."""
    half_a, half_b, pseudo = validation_halves(val)
    heldout, heldout_groups = heldout_corruptions(half_b)
    return half_a, half_b, pseudo, heldout, np.r_[np.full(len(pseudo), GROUPS[0]), heldout_groups]


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


def _auroc(normal: np.ndarray, corrupted: np.ndarray) -> float:
    """AUROC by the Mann-Whitney rank sum (ties averaged): sklearn's value, cheap enough to bootstrap."""
    from scipy.stats import rankdata

    ranks = rankdata(np.r_[normal, corrupted])
    n, m = len(normal), len(corrupted)
    return float((ranks[n:].sum() - m * (m + 1) / 2) / (n * m))


def _group_index(groups: npt.ArrayLike | None, m: int) -> list[np.ndarray]:
    """The corrupted frames' indices per group (one group of all when ``groups`` is None)."""
    if groups is None:
        return [np.arange(m)]
    labels = np.asarray(groups)
    if len(labels) != m:
        raise ValueError(f"{len(labels)} group labels for {m} corrupted frames")
    return [np.flatnonzero(labels == g) for g in np.unique(labels)]


def _score(normal: np.ndarray, corrupted: np.ndarray, index: list[np.ndarray], target_fpr: float) -> float:
    """:func:`protocol_score` on float arrays, groups given as index arrays (the bootstrap's inner loop)."""
    threshold = threshold_of_sorted(np.sort(normal), target_fpr)
    per_group = [(_auroc(normal, corrupted[i]) + float(np.mean(corrupted[i] > threshold))) / 2 for i in index]
    return float(np.mean(per_group))


def protocol_score(
    normal: npt.ArrayLike,
    corrupted: npt.ArrayLike,
    target_fpr: float = PROTOCOL_FPR,
    groups: npt.ArrayLike | None = None,
) -> float:
    """What the protocol maximises: (AUROC + detection rate at the ``target_fpr`` threshold) / 2.

    With ``groups`` (one label per corrupted frame), the mean of that score over the groups, each
    weighed equally: the protocol's corrupted set holds five local corruptions for each global one,
    and a head that sees only local defects must not win for that reason alone.
    """
    a = np.nan_to_num(np.asarray(normal, dtype=np.float64), nan=np.inf)
    b = np.nan_to_num(np.asarray(corrupted, dtype=np.float64), nan=np.inf)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("the protocol score needs normal and corrupted frames")
    return _score(a, b, _group_index(groups, len(b)), target_fpr)


Selection = tuple[list[int], str]  # (component columns, rule)


def bootstrap_scores(
    z_normal: np.ndarray,
    z_corrupted: np.ndarray,
    selection: Selection,
    groups: npt.ArrayLike | None = None,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> np.ndarray:
    """Protocol scores of ``selection`` on ``rounds`` bootstrap draws (the same draws for every
    selection with the same ``seed``: normals resampled, corrupted frames resampled within groups)."""
    cols, rule = selection
    s_n, s_c = combine(z_normal[:, cols], rule), combine(z_corrupted[:, cols], rule)
    index = _group_index(groups, len(z_corrupted))
    ends = np.cumsum([len(g) for g in index])
    draw = [np.arange(end - len(g), end) for g, end in zip(index, ends, strict=True)]  # groups in j
    rng = np.random.default_rng(seed)
    n = len(z_normal)
    out = np.empty(rounds)
    for r in range(rounds):
        i = rng.integers(0, n, n)
        j = np.concatenate([rng.choice(g, len(g)) for g in index])
        out[r] = _score(s_n[i], s_c[j], draw, PROTOCOL_FPR)
    return out


def difference_noise(
    z_normal: np.ndarray,
    z_corrupted: np.ndarray,
    a: Selection,
    b: Selection,
    groups: npt.ArrayLike | None = None,
    rounds: int = BOOTSTRAP_ROUNDS,
) -> float:
    """Bootstrap standard error of ``protocol score(b) - protocol score(a)``.

    Paired: both selections are scored on the same draws (:func:`bootstrap_scores`), so what they
    share cancels.
    """
    draws = [bootstrap_scores(z_normal, z_corrupted, sel, groups, rounds) for sel in (a, b)]
    return float((draws[1] - draws[0]).std(ddof=1))


def beyond_noise(gain: float, noise: float) -> bool:
    """Whether a protocol-score gain counts: at least ``MIN_GAIN`` and ``NOISE_Z`` standard errors."""
    return gain >= max(MIN_GAIN, NOISE_Z * noise)


def rule_score(
    z_normal: np.ndarray, z_pseudo: np.ndarray, rule: str, groups: npt.ArrayLike | None = None
) -> float:
    """:func:`protocol_score` of normals vs pseudo-anomalies for z-scores [N, K] combined by ``rule``."""
    return protocol_score(combine(z_normal, rule), combine(z_pseudo, rule), groups=groups)


def component_scores(
    z_normal: np.ndarray, z_pseudo: np.ndarray, groups: npt.ArrayLike | None = None
) -> list[float]:
    """Each component's own protocol score (of one column every rule gives the same score)."""
    return [rule_score(z_normal[:, [i]], z_pseudo[:, [i]], "max", groups) for i in range(z_normal.shape[1])]


def preferred(results: dict[str, tuple[float, int]], noise: dict[str, float] | None = None) -> str:
    """The rule to use given ``rule -> (protocol score, components)``: the best score, where rules
    whose gap to it is not :func:`beyond_noise` (``noise``: each rule's standard error of that gap;
    none given: ``MIN_GAIN`` alone) tie; ties go to fewer components, then to ``RULE_PREFERENCE``."""
    top = max(score for score, _ in results.values())
    noise = noise or {}
    near = [
        rule for rule, (score, _) in results.items() if not beyond_noise(top - score, noise.get(rule, 0.0))
    ]
    return min(near, key=lambda rule: (results[rule][1], RULE_PREFERENCE.index(rule)))


def _rule_noise(
    z_normal: np.ndarray,
    z_corrupted: np.ndarray,
    selections: dict[str, Selection],
    scores: dict[str, float],
    groups: npt.ArrayLike | None,
) -> dict[str, float]:
    """Each rule's standard error of its gap to the best-scoring rule's selection."""
    top = max(scores, key=lambda rule: scores[rule])
    return {
        rule: 0.0 if rule == top else difference_noise(z_normal, z_corrupted, sel, selections[top], groups)
        for rule, sel in selections.items()
    }


def choose_rule(
    z_normal: np.ndarray, z_pseudo: np.ndarray, groups: npt.ArrayLike | None = None
) -> tuple[str, dict[str, float], list[float]]:
    """The rule for a fixed set of components (:func:`preferred`); all rules' and components' protocol
    scores (:func:`protocol_score`, by ``groups`` of the corrupted frames when given)."""
    by_rule = {rule: rule_score(z_normal, z_pseudo, rule, groups) for rule in RULES}
    k = z_normal.shape[1]
    per_component = component_scores(z_normal, z_pseudo, groups)
    everything = list(range(k))
    noise = _rule_noise(z_normal, z_pseudo, {rule: (everything, rule) for rule in RULES}, by_rule, groups)
    best = preferred({rule: (score, k) for rule, score in by_rule.items()}, noise)
    return best, by_rule, per_component


def select_components(
    z_normal: np.ndarray,
    z_pseudo: np.ndarray,
    groups: npt.ArrayLike | None = None,
    max_components: int = MAX_COMPONENTS,
) -> tuple[str, list[int], dict[str, float]]:
    """The components and rule of a combined head: exhaustive search, then a noise-aware preference.

    Every subset of at most ``max_components`` columns is scored (:func:`protocol_score`) under every
    rule, and each rule's best selection is found. The overall best is not taken blindly: the rules
    are tried in ``RULE_PREFERENCE`` order and the first whose best selection is within the noise of
    the overall best (its gap not :func:`beyond_noise`, paired bootstrap) is used. A greedy search
    (add the component that helps most) cannot find a ``mean`` of several heads: the first addition
    to a mean dilutes the best head before the next one helps. Returns (rule, chosen columns ordered
    by their own protocol scores, the best protocol score each rule reached).
    """
    k = z_normal.shape[1]
    single = component_scores(z_normal, z_pseudo, groups)
    top_single = int(np.argmax(single))
    best: dict[str, tuple[float, list[int]]] = {}
    for rule in RULES:
        best[rule] = (single[top_single], [top_single])  # one component: every rule is the same
        for size in range(2, min(k, max_components) + 1):
            for subset in itertools.combinations(range(k), size):
                cols = sorted(subset, key=lambda c: -single[c])
                score = rule_score(z_normal[:, cols], z_pseudo[:, cols], rule, groups)
                if score > best[rule][0]:
                    best[rule] = (score, cols)
    scores = {rule: score for rule, (score, _) in best.items()}
    noise = _rule_noise(
        z_normal, z_pseudo, {rule: (cols, rule) for rule, (_, cols) in best.items()}, scores, groups
    )
    top = max(scores.values())
    # The best rule itself is within its own noise (a gap of 0), so one is always found.
    chosen = next(rule for rule in RULE_PREFERENCE if not beyond_noise(top - scores[rule], noise[rule]))
    return chosen, best[chosen][1], scores
