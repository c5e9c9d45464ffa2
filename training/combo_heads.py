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
large corruptions occur. The rule with the highest AUROC of normals-B versus pseudo-anomalies is used.
Components whose own AUROC there is below 0.5 are still kept: a corruption the head does not react
to says little about the real edge cases (fog, rain) it was chosen for. The chosen rule, the
statistics and the AUROCs are cached in ``RUN_DIR/banks/<kind>-combo.json``.
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
COMBO_FORMAT_VERSION = 2
MAX_COMBO_VAL = 1000
MIN_SELECT_VAL = 8

# Components per kind, in order of preference; those the run cannot build are skipped.
# vae-iwae is left out on purpose: it is the ELBO's tighter twin at K times the cost.
DEFAULT_COMPONENTS = {
    "vae": ("vae-complexity", "vae-elbo", "vae-patch"),
    "gan": ("gan-dfeat-knn", "gan-feat", "gan-disc", "gan-patch"),
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


def validation_halves(
    val: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """The protocol's split of validation normals: (half A, half B, pseudo-anomalies of half B)."""
    order = np.random.default_rng(0).permutation(len(val))
    half_a, half_b = val[np.sort(order[: len(val) // 2])], val[np.sort(order[len(val) // 2 :])]
    return half_a, half_b, pseudo_anomalies(half_b, half_a, seed=1)


def pseudo_auroc(graph: nn.Module, val: npt.NDArray[np.uint8], name: str = "graph") -> float:
    """AUROC of one graph on the validation protocol: normals of half B vs their pseudo-anomalies.

    How a setting of a head (a grid, a normalisation) is chosen without looking at edge-case families.
    """
    from sklearn.metrics import roc_auc_score

    from training.calibrate import score_frames

    _, half_b, pseudo = validation_halves(val)
    normal = score_frames(graph, half_b, desc=f"protocol normals {name}")
    corrupted = score_frames(graph, pseudo, desc=f"protocol pseudo {name}")
    labels = np.r_[np.zeros(len(normal)), np.ones(len(corrupted))]
    return float(roc_auc_score(labels, np.nan_to_num(np.r_[normal, corrupted], nan=np.inf)))


def graphs_fingerprint(graphs: list[nn.Module]) -> str:
    """sha256 of the components' weights and buffers: cached statistics are stale when any changes."""
    import hashlib

    digest = hashlib.sha256()
    for graph in graphs:
        for key, tensor in sorted(graph.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


def choose_rule(z_normal: np.ndarray, z_pseudo: np.ndarray) -> tuple[str, dict[str, float], list[float]]:
    """The rule with the best AUROC of normals vs pseudo-anomalies; all rules' and components' AUROCs."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(z_normal)), np.ones(len(z_pseudo))]
    by_rule = {
        rule: float(roc_auc_score(labels, np.r_[combine(z_normal, rule), combine(z_pseudo, rule)]))
        for rule in RULES
    }
    per_component = [
        float(roc_auc_score(labels, np.r_[z_normal[:, k], z_pseudo[:, k]])) for k in range(z_normal.shape[1])
    ]
    best = max(RULES, key=lambda r: by_rule[r])  # ties: the order of RULES
    return best, by_rule, per_component


def build_combo_graph(
    run_dir: str | Path, kind: str, components: tuple[str, ...] | None = None
) -> ComboGraph:
    """The ``<kind>-combo`` graph; statistics and rule cached in ``RUN_DIR/banks/<kind>-combo.json``."""
    from training.calibrate import score_frames
    from training.graphs import available_heads, build_score_graph
    from training.local_heads import run_normals

    run_dir = Path(run_dir)
    wanted = components or DEFAULT_COMPONENTS.get(kind, ())
    names = [h for h in wanted if h in set(available_heads(run_dir))]
    if not names:
        raise ValueError(f"no component heads available for {kind}-combo (wanted {', '.join(wanted)})")
    graphs = [build_score_graph(run_dir, h) for h in names]
    map_from = names.index(f"{kind}-patch") if f"{kind}-patch" in names else None
    cache = run_dir / "banks" / f"{kind}-combo.json"
    fingerprint = graphs_fingerprint(graphs)
    if cache.is_file():
        saved = json.loads(cache.read_text())
        fresh = saved.get("version") == COMBO_FORMAT_VERSION and saved.get("fingerprint") == fingerprint
        if fresh and saved.get("components") == names:
            return ComboGraph(graphs, saved["center"], saved["scale"], saved["rule"], map_from).eval()
    val = run_normals(run_dir, split="val", limit=MAX_COMBO_VAL)
    if len(val) == 0:
        raise ValueError(f"{kind}-combo needs validation normals, the run has none")
    if len(val) < MIN_SELECT_VAL:  # dry runs: statistics on all of them, the default rule, no selection
        log.warning("%s-combo: only %d validation normals, rule %s not validated", kind, len(val), RULES[0])
        pairs = zip(names, graphs, strict=True)
        stats = [robust_stats(score_frames(g, val, desc=f"combo stats {n}")) for n, g in pairs]
        center, scale = [c for c, _ in stats], [s for _, s in stats]
        rule, by_rule, per_component = RULES[0], {}, [float("nan")] * len(names)
        half_a, half_b = val, val[:0]
    else:
        half_a, half_b, pseudo = validation_halves(val)
        center, scale, z_b, z_p = [], [], [], []
        for name, graph in zip(names, graphs, strict=True):
            c, s = robust_stats(score_frames(graph, half_a, desc=f"combo stats {name}"))
            center.append(c)
            scale.append(s)
            z_b.append((score_frames(graph, half_b, desc=f"combo normals {name}") - c) / s)
            z_p.append((score_frames(graph, pseudo, desc=f"combo pseudo {name}") - c) / s)
        rule, by_rule, per_component = choose_rule(np.stack(z_b, 1), np.stack(z_p, 1))
        log.info("%s-combo: rule %s (pseudo-anomaly AUROC by rule %s)", kind, rule, by_rule)
    record = {
        "version": COMBO_FORMAT_VERSION,
        "components": names,
        "fingerprint": fingerprint,
        "center": center,
        "scale": scale,
        "rule": rule,
        "pseudo_auroc_by_rule": by_rule,
        "pseudo_auroc_by_component": dict(zip(names, per_component, strict=True)),
        "n_stats": len(half_a),
        "n_select": len(half_b),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record, indent=1))
    return ComboGraph(graphs, center, scale, rule, map_from).eval()
