"""The score-head registry: which heads a run has, what each one means, how to build and fit them.

Every head family is one module of this package ending in its list of :class:`HeadSpec`; the
registry is their concatenation, in this order (a run's heads are listed in it). Adding a head is
one module (or one function in an existing one) plus one entry here: docs/architecture.md,
"Adding a score head", walks through it.

``default_head(kind)`` is the head the accuracy benchmark (bench/bench_accuracy.py, results in
docs/benchmarks.md "## Accuracy") found best for that kind of run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from training.heads.base import HeadNotFitted, HeadSpec, HeadUnavailable
from training.heads.combo import COMBO_HEADS
from training.heads.ensemble import ENSEMBLE_HEADS
from training.heads.gan import GAN_HEADS
from training.heads.patch import PATCH_HEADS
from training.heads.seg import SEG_HEADS
from training.heads.vae import VAE_HEADS

if TYPE_CHECKING:
    from torch import nn

    from training.calibrate import Calibration

__all__ = [
    "HEADS",
    "HeadNotFitted",
    "HeadSpec",
    "HeadUnavailable",
    "available_heads",
    "build_score_graph",
    "calibrate_heads",
    "default_head",
    "default_head_of",
    "fit_heads",
    "head_info",
    "model_heads",
    "run_kind",
]

log = logging.getLogger(__name__)

HEADS: list[HeadSpec] = [*VAE_HEADS, *GAN_HEADS, *PATCH_HEADS, *SEG_HEADS, *COMBO_HEADS, *ENSEMBLE_HEADS]
_KINDS = tuple(dict.fromkeys(spec.kind for spec in HEADS))
_BY_NAME = {spec.name: spec for kind in _KINDS for spec in HEADS if spec.kind == kind}

# Chosen by the accuracy benchmark (docs/benchmarks.md, "## Accuracy"), best first: a run without the
# first (e.g. trained with --seg-steps 0) defaults to the next it has.
_DEFAULT_HEADS = {
    "vae": ("vae-seg", "vae-combo"),
    "gan": ("gan-combo",),
    "ensemble": ("ensemble-combo",),
}


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
    """Names of the heads a run supports, in registry order.

    A run trained with ``--seg-steps 0`` has no ``<kind>-seg`` head (and its combo does without).
    """
    kind = run_kind(run_dir)
    config = json.loads((Path(run_dir) / "config.json").read_text())
    return [spec.name for spec in HEADS if spec.kind == kind and spec.available(config)]


def model_heads(kind: str) -> list[str]:
    """The heads of a kind of run that need nothing but the trained network (no fit step)."""
    return [spec.name for spec in HEADS if spec.kind == kind and spec.fit is None]


def head_info(head: str) -> HeadSpec:
    """Describe a head; ValueError lists the valid names."""
    if head not in _BY_NAME:
        raise ValueError(f"unknown score head {head!r}; valid: {', '.join(_BY_NAME)}")
    return _BY_NAME[head]


def build_score_graph(run_dir: str | Path, head: str) -> nn.Module:
    """The eval-mode score graph of ``head`` for the run in ``run_dir``.

    A run that lacks the head's fitted state (trained before its head existed, or a dry run that
    fitted only its model heads) is fitted first, so this can take minutes once; after
    :func:`fit_heads` it only builds.
    """
    kind = run_kind(run_dir)
    names = [spec.name for spec in HEADS if spec.kind == kind]
    if head not in names:
        raise ValueError(f"unknown score head {head!r} for a {kind} run; valid: {', '.join(names)}")
    return _BY_NAME[head].graph(Path(run_dir))


def default_head(kind: str) -> str:
    """The best head of a kind of run, by the accuracy benchmark."""
    if kind not in _DEFAULT_HEADS:
        raise ValueError(f"unknown run kind {kind!r}; valid: {', '.join(sorted(_DEFAULT_HEADS))}")
    return _DEFAULT_HEADS[kind][0]


def default_head_of(run_dir: str | Path) -> str:
    """The best head this run has (``edgecase export`` without ``--head``)."""
    heads = available_heads(run_dir)
    return next((h for h in _DEFAULT_HEADS[run_kind(run_dir)] if h in heads), heads[0])


def calibrate_heads(
    run_dir: str | Path,
    normals: npt.NDArray[np.uint8],
    heads: list[str] | None = None,
    target_fpr: float = 0.01,
    defer: tuple[str, ...] = (),
) -> dict[str, Calibration]:
    """Fit (where needed), build and calibrate every head of a run (or ``heads``) on held-out normals.

    With ``heads=None`` a head whose graph cannot be built for this run (e.g. a patch bank on a dry
    run without data sources) is skipped with a warning; heads named explicitly must all build.
    Writes and returns the calibrations (``RUN_DIR/calibration/<head>.json``). Heads in ``defer``
    are left for ``evaluate`` and ``export`` to calibrate on demand.
    """
    from training.calibrate import calibrate_graph

    names = available_heads(run_dir) if heads is None else list(heads)
    names = [h for h in names if h not in defer]
    if not names:
        raise ValueError(f"no score heads available for run {run_dir}")
    results: dict[str, Calibration] = {}
    for head in names:
        try:
            graph = build_score_graph(run_dir, head)
        except (ValueError, FileNotFoundError) as exc:
            if heads is not None:
                raise
            log.warning("%s: head %s skipped, its graph cannot be built: %s", run_dir, head, exc)
            continue
        results[head] = calibrate_graph(run_dir, graph, head, normals, target_fpr)
    return results


def fit_heads(
    run_dir: str | Path,
    normals: npt.NDArray[np.uint8],
    *,
    heads: list[str] | None = None,
    calibrate: bool = True,
    check: bool = False,
    defer: tuple[str, ...] = (),
) -> None:
    """The end of every training run: check the model heads, then fit and calibrate the heads.

    ``normals`` are the trainer's held-out validation normals (calibration); heads that fit on data
    read their own split from the run, so the fitted state is the same whichever command fits it.
    With ``check`` (a dry run) every model head first scores two frames, so a head that cannot build
    or returns the wrong shape fails loudly now rather than at export. With ``calibrate``, every
    head (or ``heads``) is fitted and calibrated (:func:`calibrate_heads`); a failure there is
    logged and the trained model kept (``evaluate`` and ``export`` fit and calibrate what is
    missing; so are the heads in ``defer``, see training/budgets.py).
    """
    run_dir = Path(run_dir)
    if check:
        batch = torch.from_numpy(np.ascontiguousarray(normals[:2]))
        with torch.no_grad():
            for name in model_heads(run_kind(run_dir)):
                out = _BY_NAME[name].build(run_dir)(batch)
                score = out[0] if isinstance(out, tuple) else out
                if score.shape != (len(batch),) or not torch.isfinite(score).all():
                    raise RuntimeError(f"head {name} returned {tuple(score.shape)} / non-finite scores")
    if not calibrate:
        return
    try:
        calibrate_heads(run_dir, normals, heads, defer=defer)
    except Exception:  # the run is saved; heads are fitted and calibrated again on demand
        log.exception("fitting or calibrating the heads of %s failed; the trained model is kept", run_dir)
