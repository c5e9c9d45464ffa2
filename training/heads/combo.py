"""The combined head ``<kind>-combo``: several heads, standardised on validation normals, in one graph.

Different heads fail on different edge cases: a likelihood is blind to a 3-pixel pedestrian, a patch
distance is blind to nothing global but noisy, a likelihood inverts on smooth frames (Nalisnick et al.
2019) where a complexity-corrected or discriminator score does not. Each component score ``s_k`` is
standardised robustly on validation normals, ``z_k = (s_k - median_k) / (1.4826 * MAD_k)``, and the
z-scores are combined in-graph by one rule (``max``, ``mean`` or ``top2``, training/protocol.py).

:func:`fit_combo` computes the statistics on half A of the validation normals and picks the rule by
the validation protocol (training/protocol.py) on half B and its corrupted copies, both corruption
sets together, by the protocol score (the mean of AUROC and detection at the 1% threshold, averaged
over the four corruption groups, ``protocol.protocol_score``; rules closer than their noise tie).
A run's combo keeps all its components, even those whose own score is low: a corruption the head
does not react to says little about the real edge cases (fog, rain) it was chosen for. The
ensemble's combo (training/heads/ensemble.py) has nine candidates from two runs, many of them
near-duplicates, so it also *selects* its components. The chosen rule and components, the
statistics and the protocol scores are cached in ``RUN_DIR/banks/<kind>-combo.json`` (under the
keys ``pseudo_auroc_by_rule`` / ``..._by_component``, names kept for the file format);
:func:`load_combo` only reads them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.calibrate import graph_fingerprint, score_frames
from training.heads.base import HeadNotFitted, HeadSpec, HeadUnavailable
from training.heads.gan import GAN_HEADS
from training.heads.patch import PATCH_HEADS
from training.heads.seg import SEG_HEADS
from training.heads.vae import VAE_HEADS
from training.protocol import (
    RULE_PREFERENCE,
    RULES,
    choose_rule,
    combine,
    component_scores,
    protocol_frames,
    select_components,
)
from training.runs import load_config, run_normals

log = logging.getLogger(__name__)

COMBO_FORMAT_VERSION = 5  # 5: the protocol's corruption groups, exhaustive selection
MAX_COMBO_VAL = 1000
MIN_SELECT_VAL = 8

# Components per kind, in order of preference; those the run cannot build are skipped.
# vae-iwae is left out on purpose: it is the ELBO's tighter twin at K times the cost.
DEFAULT_COMPONENTS = {
    "vae": ("vae-complexity", "vae-elbo", "vae-patch", "vae-seg"),
    "gan": ("gan-dfeat-knn", "gan-feat", "gan-disc", "gan-patch", "gan-seg"),
}


def graphs_fingerprint(graphs: list[nn.Module]) -> str:
    """Fingerprint of the components' weights, banks and settings: cached statistics are stale when any
    changes (training.calibrate.graph_fingerprint of them as one module list)."""
    return graph_fingerprint(nn.ModuleList(graphs))


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


# The heads a combo may take as components (a combo is never a component of another).
COMPONENTS = {spec.name: spec for spec in [*VAE_HEADS, *GAN_HEADS, *PATCH_HEADS, *SEG_HEADS]}


def component_graphs(
    sources: list[tuple[Path, str]], *, fit: bool = False
) -> tuple[list[str], list[nn.Module]]:
    """Build each ``(run_dir, head)`` the run offers (fitting first with ``fit``); a head the run
    does not have (e.g. trained with --seg-steps 0) is skipped (logged)."""
    names, graphs = [], []
    for run_dir, head in sources:
        spec = COMPONENTS[head]
        if not spec.available(load_config(run_dir)):
            continue
        try:
            graphs.append(spec.graph(run_dir) if fit else spec.build(run_dir).eval())
        except HeadUnavailable as exc:  # combine the others
            log.info("combo without %s: %s", head, exc)
            continue
        names.append(head)
    return names, graphs


def map_index(names: list[str]) -> int | None:
    """Which component's anomaly map a combo returns: its first patch head (None: the first with a map)."""
    patches = [i for i, name in enumerate(names) if name.endswith("-patch")]
    return patches[0] if patches else None


def load_combo(names: list[str], graphs: list[nn.Module], cache: Path, select: bool = False) -> ComboGraph:
    """The combo of these candidates from its cached statistics; :class:`HeadNotFitted` when the cache
    is missing or was computed for other candidates, other component weights or banks."""
    if not cache.is_file():
        raise HeadNotFitted(f"{cache}: no combo statistics fitted")
    saved = json.loads(cache.read_text())
    fresh = (
        saved.get("version") == COMBO_FORMAT_VERSION
        and saved.get("fingerprint") == graphs_fingerprint(graphs)
        and saved.get("candidates") == names
        and bool(saved.get("selected")) == select
    )
    if not fresh:
        raise HeadNotFitted(f"{cache}: stale (components or candidates changed), refit the combo")
    kept = [names.index(name) for name in saved["components"]]
    return ComboGraph(
        [graphs[i] for i in kept], saved["center"], saved["scale"], saved["rule"],
        map_index(saved["components"]),
    ).eval()  # fmt: skip


def fit_combo(
    names: list[str],
    graphs: list[nn.Module],
    run_dir: Path,
    cache: Path,
    label: str,
    select: bool = False,
) -> None:
    """Standardise ``graphs`` on the validation normals of ``run_dir`` and choose the rule (cached;
    a no-op when the cache is fresh).

    With ``select``, the components themselves are chosen too (protocol ``select_components``) and
    the graph holds only those; otherwise all of them with the rule ``choose_rule`` picks. The
    statistics are recomputed whenever a component's weights or banks change (the cache holds a
    fingerprint of them) or the candidate list does.
    """
    try:
        load_combo(names, graphs, cache, select)
        return
    except HeadNotFitted:
        pass
    fingerprint = graphs_fingerprint(graphs)
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
        half_a, half_b, pseudo, heldout, groups = protocol_frames(val)
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
        if select:
            rule, kept, by_rule = select_components(normals_z, corrupted_z, groups)
            per_component = component_scores(normals_z, corrupted_z, groups)
        else:
            rule, by_rule, per_component = choose_rule(normals_z, corrupted_z, groups)
        heldout_by_component = component_scores(normals_z, np.stack(z_h, 1), groups[len(pseudo) :])
        log.info(
            "%s: rule %s over %s (protocol score by rule %s)",
            label,
            rule,
            ", ".join(names[i] for i in kept),
            {r: round(a, 4) for r, a in by_rule.items()},
        )
    record = {
        "version": COMBO_FORMAT_VERSION,
        "candidates": names,
        "selected": select,
        "components": [names[i] for i in kept],
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


def fitted_combo(
    names: list[str], graphs: list[nn.Module], run_dir: Path, cache: Path, label: str, select: bool = False
) -> ComboGraph:
    """:func:`fit_combo` if needed, then :func:`load_combo` (the accuracy bench's ablations)."""
    fit_combo(names, graphs, run_dir, cache, label, select)
    return load_combo(names, graphs, cache, select)


def _combo_inputs(
    run_dir: Path, kind: str, components: tuple[str, ...] | None, fit: bool
) -> tuple[list[str], list[nn.Module], Path]:
    wanted = components or DEFAULT_COMPONENTS.get(kind, ())
    names, graphs = component_graphs([(run_dir, head) for head in wanted], fit=fit)
    if not names:
        raise ValueError(f"no component heads available for {kind}-combo (wanted {', '.join(wanted)})")
    # A non-default component list (an ablation) keeps its own cache beside the default one.
    suffix = "" if components is None else "-" + "+".join(names)
    return names, graphs, run_dir / "banks" / f"{kind}-combo{suffix}.json"


def load_combo_graph(run_dir: str | Path, kind: str, components: tuple[str, ...] | None = None) -> ComboGraph:
    """The ``<kind>-combo`` graph from its cached statistics (``RUN_DIR/banks/<kind>-combo.json``)."""
    names, graphs, cache = _combo_inputs(Path(run_dir), kind, components, fit=False)
    return load_combo(names, graphs, cache)


def fit_combo_head(run_dir: str | Path, kind: str, components: tuple[str, ...] | None = None) -> None:
    """Fit the components that need it, then the ``<kind>-combo`` statistics and rule."""
    names, graphs, cache = _combo_inputs(Path(run_dir), kind, components, fit=True)
    fit_combo(names, graphs, Path(run_dir), cache, label=f"{kind}-combo")


def _combo_head(kind: str) -> HeadSpec:
    return HeadSpec(
        name=f"{kind}-combo",
        kind=kind,
        units="combined z-score",
        definition=f"combination of standardised {kind} head scores (statistics on validation "
        "normals, rule chosen on self-supervised pseudo-anomalies); map of the patch head",
        has_map=True,
        build=lambda run_dir: load_combo_graph(run_dir, kind),
        fit=lambda run_dir: fit_combo_head(run_dir, kind),
    )


COMBO_HEADS = [_combo_head("vae"), _combo_head("gan")]
