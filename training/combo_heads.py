"""The combined head ``<kind>-combo``: several heads, standardised on validation normals, in one graph.

Different heads fail on different edge cases: a likelihood is blind to a 3-pixel pedestrian, a patch
distance is blind to nothing global but noisy, a likelihood inverts on smooth frames (Nalisnick et al.
2019) where a complexity-corrected or discriminator score does not. Each component score ``s_k`` is
standardised robustly on validation normals, ``z_k = (s_k - median_k) / (1.4826 * MAD_k)``, and the
z-scores are combined in-graph by one rule:

- ``max``: ``max_k z_k`` (flag when any head is extreme; a union of detectors),
- ``mean``: ``mean_k z_k`` (evidence adds up; Stouffer-like),
- ``top2``: mean of the two largest z-scores (between the two).

Validation protocol (no edge-case family is ever used, per issue 3's rules): the run's validation
normals are split in two halves by a fixed seed. Half A gives the medians and MADs. Half B is kept as
normals and also turned into pseudo-anomalies by generic self-supervised corruptions: CutPaste (Li et
al. 2021: a rectangle cut from another normal frame of half A pasted at a random place) and noise
patches (a rectangle of uniform noise or of one random colour, as in DRAEM's synthetic defects,
Zavrtanik et al. 2021), sizes from 2 px to a third of the frame so that both small-object-like and
large corruptions occur. A second set, :func:`heldout_anomalies`, applies corruptions no head trains
on: local light changes, thin scars and global changes (contrast, blur, colour cast), so that a head
trained on pasted defects (``<kind>-seg``) cannot choose the rule by itself and global changes count
as much as local ones. The rule with the highest AUROC of normals-B versus both sets is used;
rules within ``MIN_GAIN`` (0.005, half the AUROC's standard error at 500 normals) of the best are a
tie, settled in the order ``mean``, ``top2``, ``max``. A run's combo keeps all its components, even
those whose own AUROC there is below 0.5: a corruption the head does not react to says little about
the real edge cases (fog, rain) it was chosen for. The ensemble's combo (training/ensemble.py) has
nine candidates from two runs, many of them near-duplicates, so it also *selects* its components
(:func:`select_components`: greedy forward selection, a component joins only if it buys at least
``MIN_GAIN``). The chosen rule and components, the statistics and the AUROCs are cached in
``RUN_DIR/banks/<kind>-combo.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

log = logging.getLogger(__name__)

RULES = ("max", "mean", "top2")
# Protocol AUROCs closer than MIN_GAIN are a tie (at 500 validation normals the standard error of an
# AUROC near 0.9 is about 0.01): a component must buy at least this much to join a selected combo, and
# among rules within it of the best, the one with fewer components, then earlier here, is taken.
MIN_GAIN = 0.005
RULE_PREFERENCE = ("mean", "top2", "max")  # mean first: Stouffer's combination of evidence
COMBO_FORMAT_VERSION = 4
MAX_COMBO_VAL = 1000
MIN_SELECT_VAL = 8

# Components per kind, in order of preference; those the run cannot build are skipped.
# vae-iwae is left out on purpose: it is the ELBO's tighter twin at K times the cost.
DEFAULT_COMPONENTS = {
    "vae": ("vae-complexity", "vae-elbo", "vae-patch", "vae-seg"),
    "gan": ("gan-dfeat-knn", "gan-feat", "gan-disc", "gan-patch", "gan-seg"),
}


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

    The seg head (training/seg_head.py) trains on blob-shaped texture/noise/colour pastes; these
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


CORRUPTIONS = ("patches", "heldout", "all")


def pseudo_auroc(
    graph: nn.Module, val: npt.NDArray[np.uint8], name: str = "graph", corruptions: str = "patches"
) -> float:
    """AUROC of one graph on the validation protocol: normals of half B vs corrupted copies of them.

    ``corruptions``: ``patches`` (CutPaste / noise / colour rectangles, :func:`pseudo_anomalies`),
    ``heldout`` (light changes, scars, global changes, :func:`heldout_anomalies`) or ``all`` (both).
    How a setting of a head (a grid, a normalisation) is chosen without looking at edge-case families.
    """
    from sklearn.metrics import roc_auc_score

    from training.calibrate import score_frames

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


def graphs_fingerprint(graphs: list[nn.Module]) -> str:
    """Fingerprint of the components' weights, banks and settings: cached statistics are stale when any
    changes (training.calibrate.graph_fingerprint of them as one module list)."""
    from training.calibrate import graph_fingerprint

    return graph_fingerprint(nn.ModuleList(graphs))


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


class ComboGraph(nn.Module):
    """Score graph: robust z-scores of component graphs, combined by a fixed rule.

    Returns the anomaly map of component ``map_from`` (the patch head in built combos; default: the
    first component that has a map), so the combined head still shows *where*.
    """

    def __init__(
        self,
        components: list[nn.Module],
        center: list[float],
        scale: list[float],
        rule: str,
        map_from: int | None = None,
    ) -> None:
        super().__init__()
        if not components or len(components) != len(center) or len(center) != len(scale):
            raise ValueError("a combo needs one center and one scale per component, and >= 1 component")
        if rule not in RULES:
            raise ValueError(f"unknown combination rule {rule!r}; valid: {', '.join(RULES)}")
        self.components = nn.ModuleList(components)
        self.register_buffer("center", torch.tensor(center, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.rule = rule
        self.map_from = map_from

    def forward(self, frames: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        scores = []
        amap = None
        for k, component in enumerate(self.components):
            out = component(frames)
            if isinstance(out, tuple | list):
                wanted = self.map_from is None or self.map_from == k
                if amap is None and wanted and len(out) > 1:
                    amap = out[1]
                out = out[0]
            scores.append(out.float())
        z = (torch.stack(scores, dim=1) - self.center) / self.scale
        score = combine(z, self.rule)
        return score if amap is None else (score, amap)


def robust_stats(scores: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 * MAD (the normal-consistent scale), floored so no division blows up."""
    center = float(np.median(scores))
    mad = float(np.median(np.abs(scores - center))) * 1.4826
    spread = float(np.std(scores))
    return center, max(mad, 1e-3 * spread, 1e-8)


def rule_auroc(z_normal: np.ndarray, z_pseudo: np.ndarray, rule: str) -> float:
    """AUROC of normals vs pseudo-anomalies for z-scores [N, K] combined by ``rule``."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(z_normal)), np.ones(len(z_pseudo))]
    return float(roc_auc_score(labels, np.r_[combine(z_normal, rule), combine(z_pseudo, rule)]))


def preferred(results: dict[str, tuple[float, int]]) -> str:
    """The rule to use given ``rule -> (protocol AUROC, components)``: the best AUROC, where rules
    within ``MIN_GAIN`` of it tie; ties go to fewer components, then to ``RULE_PREFERENCE`` order."""
    top = max(auroc for auroc, _ in results.values())
    near = [rule for rule, (auroc, _) in results.items() if auroc >= top - MIN_GAIN]
    return min(near, key=lambda rule: (results[rule][1], RULE_PREFERENCE.index(rule)))


def choose_rule(z_normal: np.ndarray, z_pseudo: np.ndarray) -> tuple[str, dict[str, float], list[float]]:
    """The rule for a fixed set of components (:func:`preferred`); all rules' and components' AUROCs."""
    by_rule = {rule: rule_auroc(z_normal, z_pseudo, rule) for rule in RULES}
    k = z_normal.shape[1]
    per_component = [rule_auroc(z_normal[:, [i]], z_pseudo[:, [i]], "max") for i in range(k)]
    best = preferred({rule: (auroc, k) for rule, auroc in by_rule.items()})
    return best, by_rule, per_component


def select_components(z_normal: np.ndarray, z_pseudo: np.ndarray) -> tuple[str, list[int], dict[str, float]]:
    """Greedy forward selection of components for each rule, then :func:`preferred` across rules.

    Per rule: start from the component with the best protocol AUROC, add the one that raises it most,
    stop when the best addition buys less than ``MIN_GAIN``. Returns (rule, chosen column indices in
    order of selection, the protocol AUROC each rule's selection reached).
    """
    paths: dict[str, tuple[float, list[int]]] = {}
    for rule in RULES:
        chosen: list[int] = []
        best = -np.inf
        while len(chosen) < z_normal.shape[1]:
            trials = [
                (rule_auroc(z_normal[:, [*chosen, k]], z_pseudo[:, [*chosen, k]], rule), -k)
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


def component_graphs(sources: list[tuple[Path, str]]) -> tuple[list[str], list[nn.Module]]:
    """Build each ``(run_dir, head)`` the run offers; a head the run cannot build is skipped (logged)."""
    from training.graphs import HeadUnavailable, available_heads, build_score_graph

    names, graphs = [], []
    for run_dir, head in sources:
        if head not in set(available_heads(run_dir)):
            continue
        try:
            graphs.append(build_score_graph(run_dir, head))
        except HeadUnavailable as exc:  # e.g. a run trained with --seg-steps 0: combine the others
            log.info("combo without %s: %s", head, exc)
            continue
        names.append(head)
    return names, graphs


def build_combo_graph(
    run_dir: str | Path, kind: str, components: tuple[str, ...] | None = None
) -> ComboGraph:
    """The ``<kind>-combo`` graph; statistics and rule cached in ``RUN_DIR/banks/<kind>-combo.json``."""
    run_dir = Path(run_dir)
    wanted = components or DEFAULT_COMPONENTS.get(kind, ())
    names, graphs = component_graphs([(run_dir, head) for head in wanted])
    if not names:
        raise ValueError(f"no component heads available for {kind}-combo (wanted {', '.join(wanted)})")
    # A non-default component list (an ablation) keeps its own cache beside the default one.
    suffix = "" if components is None else "-" + "+".join(names)
    cache = run_dir / "banks" / f"{kind}-combo{suffix}.json"
    return fit_combo(names, graphs, run_dir, cache, label=f"{kind}-combo")


def map_index(names: list[str]) -> int | None:
    """Which component's anomaly map a combo returns: its first patch head (None: the first with a map)."""
    patches = [i for i, name in enumerate(names) if name.endswith("-patch")]
    return patches[0] if patches else None


def fit_combo(
    names: list[str],
    graphs: list[nn.Module],
    run_dir: Path,
    cache: Path,
    label: str,
    select: bool = False,
) -> ComboGraph:
    """Standardise ``graphs`` on the validation normals of ``run_dir`` and choose the rule (cached).

    With ``select``, the components themselves are chosen too (:func:`select_components`) and the
    graph holds only those; otherwise all of them with the rule :func:`choose_rule` picks. The
    statistics are recomputed whenever a component's weights or banks change (the cache holds a
    fingerprint of them) or the candidate list does.
    """
    from training.calibrate import score_frames
    from training.runs import run_normals

    fingerprint = graphs_fingerprint(graphs)
    if cache.is_file():
        saved = json.loads(cache.read_text())
        fresh = saved.get("version") == COMBO_FORMAT_VERSION and saved.get("fingerprint") == fingerprint
        if fresh and saved.get("candidates") == names and bool(saved.get("selected")) == select:
            kept = [names.index(name) for name in saved["components"]]
            return ComboGraph(
                [graphs[i] for i in kept], saved["center"], saved["scale"], saved["rule"],
                map_index(saved["components"]),
            ).eval()  # fmt: skip
    val = run_normals(run_dir, split="val", limit=MAX_COMBO_VAL)
    if len(val) == 0:
        raise ValueError(f"{label} needs validation normals, the run has none")
    kept = list(range(len(names)))
    if len(val) < MIN_SELECT_VAL:  # dry runs: statistics on all of them, the default rule, no selection
        rule = RULE_PREFERENCE[0]
        log.warning("%s: only %d validation normals, rule %s not validated", label, len(val), rule)
        pairs = zip(names, graphs, strict=True)
        stats = [robust_stats(score_frames(g, val, desc=f"combo stats {n}")) for n, g in pairs]
        center, scale = [c for c, _ in stats], [s for _, s in stats]
        by_rule: dict[str, float] = {}
        per_component = heldout_by_component = [float("nan")] * len(names)
        half_a, half_b = val, val[:0]
    else:
        half_a, half_b, pseudo = validation_halves(val)
        heldout = heldout_anomalies(half_b)
        center, scale, z_b, z_p, z_h = [], [], [], [], []
        for name, graph in zip(names, graphs, strict=True):
            c, s = robust_stats(score_frames(graph, half_a, desc=f"combo stats {name}"))
            center.append(c)
            scale.append(s)
            z_b.append((score_frames(graph, half_b, desc=f"combo normals {name}") - c) / s)
            z_p.append((score_frames(graph, pseudo, desc=f"combo pseudo {name}") - c) / s)
            z_h.append((score_frames(graph, heldout, desc=f"combo held-out {name}") - c) / s)
        # Both corruption sets: a component trained on local pastes (the seg head) must not pick the
        # rule alone, and global changes (fog-like, but generic) count as much as local ones.
        normals_z, corrupted_z = np.stack(z_b, 1), np.r_[np.stack(z_p, 1), np.stack(z_h, 1)]
        rule, by_rule, per_component = choose_rule(normals_z, corrupted_z)
        if select:
            rule, kept, by_rule = select_components(normals_z, corrupted_z)
        heldout_by_component = choose_rule(normals_z, np.stack(z_h, 1))[2]
        log.info(
            "%s: rule %s over %s (protocol AUROC by rule %s)",
            label,
            rule,
            ", ".join(names[i] for i in kept),
            {r: round(a, 4) for r, a in by_rule.items()},
        )
    components = [names[i] for i in kept]
    record = {
        "version": COMBO_FORMAT_VERSION,
        "candidates": names,
        "selected": select,
        "components": components,
        "fingerprint": fingerprint,
        "center": [center[i] for i in kept],
        "scale": [scale[i] for i in kept],
        "rule": rule,
        "pseudo_auroc_by_rule": by_rule,
        "pseudo_auroc_by_component": dict(zip(names, per_component, strict=True)),
        "heldout_auroc_by_component": dict(zip(names, heldout_by_component, strict=True)),
        "n_stats": len(half_a),
        "n_select": len(half_b),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(cache)
    return ComboGraph(
        [graphs[i] for i in kept], record["center"], record["scale"], rule, map_index(components)
    ).eval()
