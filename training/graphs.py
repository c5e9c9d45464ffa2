"""The score-head registry: which heads a run has, what each one means, and how to build its graph.

A score graph takes uint8 NHWC frames and returns ``score [N]`` or ``(score [N], anomaly_map
[N, H, W])`` (docs/architecture.md, "Score graphs"). Heads come from three places, each imported
lazily so that a module that is missing or broken disables only its own heads:

- ``training.vae_heads.VAE_HEAD_BUILDERS`` (``vae-elbo``, ``vae-recon``, ``vae-iwae``, ...),
- ``training.gan_heads.GAN_HEAD_BUILDERS`` (``gan-disc``, ``gan-feat``, ...),
- this package's local, discriminative and combined heads (``<kind>-patch``, ``<kind>-seg``,
  ``<kind>-combo``),
- ``ensemble-combo``, the one head of an ensemble run over a VAE run and a GAN run
  (training/ensemble.py).

``default_head(kind)`` is the head the accuracy benchmark (bench/bench_accuracy.py, results in
docs/benchmarks.md "## Accuracy") found best for that kind of run.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

Builder = Callable[[Path], "nn.Module"]

# kind -> (module, builders attribute, info attribute) of the heads another module owns.
_EXTERNAL_SOURCES: dict[str, tuple[str, str, str]] = {
    "vae": ("training.vae_heads", "VAE_HEAD_BUILDERS", "VAE_HEAD_INFO"),
    "gan": ("training.gan_heads", "GAN_HEAD_BUILDERS", "GAN_HEAD_INFO"),
}

ENSEMBLE = "ensemble"
_KINDS = (*_EXTERNAL_SOURCES, ENSEMBLE)

# Chosen by the accuracy benchmark (docs/benchmarks.md, "## Accuracy"), best first: a run without the
# first (e.g. trained with --seg-steps 0) defaults to the next it has.
_DEFAULT_HEADS = {
    "vae": ("vae-seg", "vae-combo"),
    "gan": ("gan-combo",),
    ENSEMBLE: ("ensemble-combo",),
}


class HeadUnavailable(ValueError):
    """This run was trained without what the head needs (e.g. ``--seg-steps 0``); not a bug."""


@dataclass(frozen=True)
class HeadInfo:
    """What a head is: its run kind, units, one-line definition, whether it has a map, its builder."""

    name: str
    kind: str
    units: str
    definition: str
    has_map: bool
    builder: Builder


def _field(info: Any, key: str, default: Any) -> Any:
    if isinstance(info, Mapping):
        return info.get(key, default)
    return getattr(info, key, default)


def _external_heads(kind: str) -> dict[str, HeadInfo]:
    """Heads of another engineer's module, or none (logged) if it cannot be imported."""
    module_name, builders_attr, info_attr = _EXTERNAL_SOURCES[kind]
    try:
        module = importlib.import_module(module_name)
        builders: Mapping[str, Builder] = getattr(module, builders_attr)
    except (ImportError, AttributeError) as exc:
        log.debug("heads of %s unavailable: %s", module_name, exc)
        return {}
    infos: Mapping[str, Any] = getattr(module, info_attr, {}) or {}
    heads = {}
    for name, builder in builders.items():
        info = infos.get(name, {})
        heads[name] = HeadInfo(
            name=name,
            kind=kind,
            units=str(_field(info, "units", "")),
            definition=str(_field(info, "definition", _field(info, "description", ""))),
            has_map=bool(_field(info, "has_map", False)),
            builder=builder,
        )
    return heads


def _own_heads(kind: str) -> dict[str, HeadInfo]:
    """The local (patch) and combined heads, which exist for every kind."""

    def build_patch(run_dir: Path) -> nn.Module:
        from training.local_heads import build_patch_graph

        return build_patch_graph(run_dir, kind)

    def build_seg(run_dir: Path) -> nn.Module:
        from training.seg_head import build_seg_graph

        return build_seg_graph(run_dir, kind)

    def build_combo(run_dir: Path) -> nn.Module:
        from training.combo_heads import build_combo_graph

        return build_combo_graph(run_dir, kind)

    network = "VAE encoder" if kind == "vae" else "discriminator"
    return {
        f"{kind}-patch": HeadInfo(
            name=f"{kind}-patch",
            kind=kind,
            units="feature distance",
            definition=f"max over locations of the nearest-neighbour distance of early {network} "
            "features to normal training features at the same location (position-aware PatchCore)",
            has_map=True,
            builder=build_patch,
        ),
        f"{kind}-seg": HeadInfo(
            name=f"{kind}-seg",
            kind=kind,
            units="logit",
            definition="max over the frame of a smoothed per-pixel defect logit from a small U-Net that "
            f"sees the frame and its {'VAE' if kind == 'vae' else 'G(E(x))'} reconstruction, trained on "
            "synthetic blob defects pasted into normal frames (DRAEM-style)",
            has_map=True,
            builder=build_seg,
        ),
        f"{kind}-combo": HeadInfo(
            name=f"{kind}-combo",
            kind=kind,
            units="combined z-score",
            definition=f"combination of standardised {kind} head scores (statistics on validation "
            "normals, rule chosen on self-supervised pseudo-anomalies); map of the patch head",
            has_map=True,
            builder=build_combo,
        ),
    }


def _ensemble_heads() -> dict[str, HeadInfo]:
    def build(run_dir: Path) -> nn.Module:
        from training.ensemble import build_ensemble_graph

        return build_ensemble_graph(run_dir)

    return {
        "ensemble-combo": HeadInfo(
            name="ensemble-combo",
            kind=ENSEMBLE,
            units="combined z-score",
            definition="combination of standardised head scores of a VAE run and a GAN run (statistics on "
            "their shared validation normals; components and rule selected on self-supervised "
            "pseudo-anomalies); map of the first selected head that has one",
            has_map=True,
            builder=build,
        )
    }


def _heads_of_kind(kind: str) -> dict[str, HeadInfo]:
    if kind == ENSEMBLE:
        return _ensemble_heads()
    if kind not in _EXTERNAL_SOURCES:
        raise ValueError(f"unknown run kind {kind!r}; valid: {', '.join(sorted(_KINDS))}")
    heads = _external_heads(kind)
    heads.update(_own_heads(kind))
    return heads


def _all_heads() -> dict[str, HeadInfo]:
    heads: dict[str, HeadInfo] = {}
    for kind in _KINDS:
        heads.update(_heads_of_kind(kind))
    return heads


def run_kind(run_dir: str | Path) -> str:
    """The ``kind`` field of ``RUN_DIR/config.json`` (``vae``, ``gan`` or ``ensemble``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"not a run directory (no config.json): {run_dir}")
    kind = json.loads(path.read_text()).get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{path}: unknown run kind {kind!r}; valid: {', '.join(sorted(_KINDS))}")
    return str(kind)


def available_heads(run_dir: str | Path) -> list[str]:
    """Names of the heads a run supports, in registry order (the run's own heads first).

    A run trained with ``--seg-steps 0`` has no ``<kind>-seg`` head (and its combo does without).
    """
    kind = run_kind(run_dir)
    heads = list(_heads_of_kind(kind))
    config = json.loads((Path(run_dir) / "config.json").read_text())
    if kind != ENSEMBLE and int(config.get("seg_steps", 1)) <= 0:
        heads.remove(f"{kind}-seg")
    return heads


def head_info(head: str) -> HeadInfo:
    """Describe a head; ValueError lists the valid names."""
    heads = _all_heads()
    if head not in heads:
        raise ValueError(f"unknown score head {head!r}; valid: {', '.join(heads)}")
    return heads[head]


def build_score_graph(run_dir: str | Path, head: str) -> nn.Module:
    """Build the eval-mode score graph of ``head`` for the run in ``run_dir``."""
    kind = run_kind(run_dir)
    heads = _heads_of_kind(kind)
    if head not in heads:
        raise ValueError(f"unknown score head {head!r} for a {kind} run; valid: {', '.join(heads)}")
    graph = heads[head].builder(Path(run_dir))
    return graph.eval()


def default_head(kind: str) -> str:
    """The best head of a kind of run, by the accuracy benchmark."""
    if kind not in _DEFAULT_HEADS:
        raise ValueError(f"unknown run kind {kind!r}; valid: {', '.join(sorted(_DEFAULT_HEADS))}")
    return _DEFAULT_HEADS[kind][0]


def default_head_of(run_dir: str | Path) -> str:
    """The best head this run has (``edgecase export`` without ``--head``)."""
    heads = available_heads(run_dir)
    return next((h for h in _DEFAULT_HEADS[run_kind(run_dir)] if h in heads), heads[0])
