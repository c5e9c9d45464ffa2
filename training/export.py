"""Export a score graph to ONNX, prove it computes what torch computes, calibrate it, publish it.

The math that was evaluated is the math that serves: the graph holds scaling and score math
(uint8 NHWC in, `score` [N] and `anomaly_map` [N, H, W] out, dynamic batch), and every export

1. checks the file (`onnx.checker` and strict shape inference),
2. runs onnxruntime at batch 1 and 37 on normal and edge-case frames and compares with torch:
   relative difference `|a - b| / max(|a|, |b|, eps)`, gate 1e-4 for fp32 scores. `eps` follows from
   the normal parity frames' own scores (`onnx_graph.parity_eps`): the larger of their median |score|
   and ten times their interquartile range, so a score near zero may differ by a thousandth of the
   normal scores' spread. A score is a difference of large terms for some heads (ELBO minus code
   length, z-score combinations), so a score that crosses zero carries the float32 rounding of its
   terms, not of itself; a graph that really diverges differs by the spread itself. Anomaly maps
   are compared as `max |a - b| / max |a|` over the whole batch, same gate,
3. calibrates the threshold with onnxruntime on held-out normals, so the threshold belongs to the
   graph that serves (anomalib's users lost theirs between runtimes),
4. writes everything into `models/<name>/.tmp-*` and renames it to `models/<name>/<version>` only
   after all of that passed; a published version is never modified (Triton's model repository).

Steps 1 and 2 (making the ONNX file, running it, the checks) live in training/onnx_graph.py; this
module chooses the frames, calibrates and publishes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort

from contract.frames import RESIZE_RULE
from contract.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    Calibration,
    ExportInfo,
    InputSpec,
    Manifest,
    ModelInfo,
    OutputSpec,
    Threshold,
    TrainingInfo,
    file_entry,
    load_manifest,
    thin_scores,
    utc_now,
)
from contract.repository import next_version
from training.export_frames import (
    N_PARITY_FRAMES,
    edge_case_frames,
    evaluation_summary,
    held_out_normals,
    read_normal_frames,
    run_data_sources,
)
from training.onnx_graph import (
    OPSET,
    PARITY_BATCHES,
    PARITY_TOLERANCE,
    ExportError,
    Frames,
    check_onnx,
    check_parity,
    check_signature,
    export_onnx,
    graph_opset,
    ort_session,
    run_ort,
    run_torch,
)
from training.shapes import parse_size
from training.variants import VARIANTS, Variant, make_variant

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

DEFAULT_TARGET_FPR = 0.01

# ---- the repository ------------------------------------------------------------------------------


@contextlib.contextmanager
def staging(model_dir: Path) -> Iterator[Path]:
    """A dot-folder beside the versions (invisible to the registry, on the same filesystem for rename).

    If the block fails, the folder goes, and so does ``model_dir`` when this made it and it is still
    empty: a failed export leaves nothing behind in the repository.
    """
    made = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):  # not empty: another export published meanwhile
                model_dir.rmdir()
        raise


def publish(tmp: Path, model_dir: Path, manifest: Manifest, version: int | None = None) -> Path:
    """Write the manifest and rename `tmp` to `model_dir/<version>`; never touches a published version.

    With no `version` the next free integer is taken; if another export wins the race for it, the
    next one is tried. An explicit `version` that exists is refused.
    """
    for _ in range(100):
        v = version if version is not None else next_version(model_dir)
        target = model_dir / str(v)
        if target.exists():
            if version is not None:
                raise ExportError(f"{target} already exists; published versions are never modified")
            continue
        data = manifest.model_dump()
        data.update(version=v, name=model_dir.name)
        final = Manifest.model_validate(data)
        final.write(tmp / MANIFEST_FILE)
        for file in tmp.iterdir():
            file.chmod(0o444)  # a reminder, not a lock: versions are immutable
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or version is not None:
                raise
            (tmp / MANIFEST_FILE).chmod(0o644)
            (tmp / MANIFEST_FILE).unlink()
            continue
        return target
    raise ExportError(f"could not find a free version in {model_dir}")


def _versions() -> dict[str, str]:
    import torch

    return {
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
    }


def default_name(head: str, kind: str, variant: Variant) -> str:
    base = head if head.startswith(f"{kind}-") else f"{kind}-{head}"
    return base if variant == "fp32" else f"{base}-{variant}"


def export_graph(
    graph: nn.Module,
    repo: str | Path,
    name: str,
    *,
    model: ModelInfo,
    size: int | tuple[int, int],
    normals: Frames,
    edges: Frames,
    families: list[str],
    training: TrainingInfo,
    calibration_source: list[str],
    variant: Variant = "fp32",
    target_fpr: float = DEFAULT_TARGET_FPR,
    version: int | None = None,
    opset: int = OPSET,
) -> Path:
    """Export, check, calibrate on `normals` and publish one score graph; returns the version folder.

    `normals` are held-out normal frames (calibration, and the first 37 for parity); `edges` are
    edge-case frames with their `families` (parity and the evaluation summary).
    """
    from training.calibrate import calibrate_scores

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if len(normals) == 0 or len(edges) == 0:
        raise ExportError(f"need normal and edge-case frames, got {len(normals)} and {len(edges)}")
    model_dir = Path(repo) / name
    if version is not None and (model_dir / str(version)).exists():
        raise ExportError(f"{model_dir / str(version)} already exists; published versions are never modified")
    graph = graph.eval()
    frame = parse_size(size)
    with staging(model_dir) as tmp:
        print(f"[2/5] exporting to ONNX (opset {opset}, variant {variant})", flush=True)
        fp32_path = tmp / ".fp32.onnx"
        names, exporter = export_onnx(graph, fp32_path, frame, opset)
        check_onnx(fp32_path)
        model_path = tmp / MODEL_FILE
        make_variant(fp32_path, model_path, variant)
        fp32_path.unlink()
        check_onnx(model_path)
        session = ort_session(model_path)
        check_signature(session, frame, names)

        print("[3/5] torch vs onnxruntime parity on normal and edge-case frames", flush=True)
        parity_set = np.concatenate([normals[:N_PARITY_FRAMES], edges[:N_PARITY_FRAMES]])
        reference = run_torch(graph, parity_set, batch_size=max(PARITY_BATCHES))
        tolerance = PARITY_TOLERANCE if variant == "fp32" else None
        n_normal = min(len(normals), N_PARITY_FRAMES)
        parity = check_parity(reference, session, parity_set, tolerance, n_normal=n_normal)
        print(
            f"      max relative difference {parity.max_rel_diff:.2e} on {parity.n_frames} frames", flush=True
        )

        print(f"[4/5] calibrating with onnxruntime on {len(normals)} held-out normals", flush=True)
        scores = run_ort(session, normals, 64, desc="calibrating")["score"].astype(np.float64)
        cal = calibrate_scores(scores, target_fpr=target_fpr, head=model.head)
        edge_scores = run_ort(session, edges, 64)["score"].astype(np.float64)
        evaluation = evaluation_summary(scores, edge_scores, families, "held-out normals vs edge-case frames")

        outputs = [OutputSpec(name="score", shape=["N"])]
        if "anomaly_map" in names:
            outputs.append(OutputSpec(name="anomaly_map", shape=["N", frame.height, frame.width]))
        manifest = Manifest(
            name=name,
            version=version or 1,  # publish() sets the real one
            created_at=utc_now(),
            model=model,
            # the rule the run's frames were read with (training/data.py), so serving matches training
            input=InputSpec(height=frame.height, width=frame.width, resize_rule=RESIZE_RULE),
            outputs=outputs,
            threshold=Threshold(value=cal.threshold, target_fpr=target_fpr, calibration_n=cal.n),
            calibration=Calibration(
                n=cal.n, quantiles=cal.quantiles, scores=thin_scores(cal.scores), data=calibration_source
            ),
            evaluation=evaluation,
            training=training,
            export=ExportInfo(
                opset=graph_opset(model_path),
                exporter=exporter,
                variant=variant,
                parity=parity,
                **_versions(),
            ),
            files={MODEL_FILE: file_entry(model_path)},
        )
        print(f"[5/5] publishing to {model_dir}", flush=True)
        target = publish(tmp, model_dir, manifest, version)
    print(f"published {target}: threshold {cal.threshold:.6g} at FPR {target_fpr:g}")
    print(f"AUROC {evaluation['auroc']:.3f} on {len(normals)} normals vs {len(edges)} edge-case frames")
    return target


def export_run(
    run_dir: str | Path,
    head: str,
    repo: str | Path,
    *,
    name: str | None = None,
    variant: Variant = "fp32",
    data: str | Path | None = None,
    target_fpr: float = DEFAULT_TARGET_FPR,
    version: int | None = None,
    max_calibration: int | None = None,
    opset: int = OPSET,
) -> Path:
    """`edgecase export`: the head's graph of a run, calibrated on the run's val split or on `data`."""
    from training.heads import build_score_graph, head_info
    from training.runs import load_config, run_size

    run_dir = Path(run_dir)
    config = load_config(run_dir)
    size, kind = run_size(config), str(config["kind"])
    info = head_info(head)  # ValueError listing the valid heads
    print(f"[1/5] building score graph {head} of {run_dir}", flush=True)
    graph = build_score_graph(run_dir, head)
    normals = read_normal_frames(data, size, max_calibration) if data else held_out_normals(config, size)
    normals = normals[:max_calibration] if max_calibration else normals
    edges, families = edge_case_frames(config, size, normals, N_PARITY_FRAMES)
    return export_graph(
        graph,
        repo,
        name or default_name(head, kind, variant),
        model=ModelInfo(
            kind=kind, head=head, definition=info.definition or head, units=info.units or "score"
        ),
        size=size,
        normals=normals,
        edges=edges,
        families=families,
        training=TrainingInfo(
            run_dir=str(run_dir),
            data_fingerprint=config.get("data_fingerprint") or config.get("fingerprint"),
            data_sources=run_data_sources(config),
            config=config,
        ),
        calibration_source=[str(data)] if data else run_data_sources(config) or ["noise (dry run)"],
        variant=variant,
        target_fpr=target_fpr,
        version=version,
        opset=opset,
    )


def recalibrate(
    version_dir: str | Path,
    data: str | Path,
    *,
    target_fpr: float = DEFAULT_TARGET_FPR,
    max_frames: int | None = None,
) -> Path:
    """Publish a new version with the same graph (copied, hash re-checked) calibrated on `data`."""
    from training.calibrate import calibrate_scores

    version_dir = Path(version_dir)
    old = load_manifest(version_dir / MANIFEST_FILE)
    src = version_dir / MODEL_FILE
    if file_entry(src) != old.files[MODEL_FILE]:
        raise ExportError(f"{src}: does not match its manifest's sha256/size; refusing to copy it")
    model_dir = version_dir.parent
    with staging(model_dir) as tmp:
        shutil.copyfile(src, tmp / MODEL_FILE)
        copied = file_entry(tmp / MODEL_FILE)
        if copied != old.files[MODEL_FILE]:
            raise ExportError(f"{tmp / MODEL_FILE}: copy does not match the source's hash")
        normals = read_normal_frames(data, old.input.height, max_frames)
        print(f"calibrating {old.name}/{old.version} with onnxruntime on {len(normals)} normals", flush=True)
        scores = run_ort(ort_session(tmp / MODEL_FILE), normals, 64, desc="calibrating")["score"]
        cal = calibrate_scores(scores.astype(np.float64), target_fpr=target_fpr, head=old.model.head)
        update = {
            "created_at": utc_now(),
            "threshold": Threshold(value=cal.threshold, target_fpr=target_fpr, calibration_n=cal.n),
            "calibration": Calibration(
                n=cal.n, quantiles=cal.quantiles, scores=thin_scores(cal.scores), data=[str(data)]
            ),
            "export": old.export.model_copy(update={"derived_from": f"{old.name}/{old.version}"}),
            "files": {MODEL_FILE: copied},
        }
        manifest = Manifest.model_validate({**old.model_dump(), **{k: _dump(v) for k, v in update.items()}})
        target = publish(tmp, model_dir, manifest)
    print(f"published {target} (threshold {cal.threshold:.6g} at FPR {target_fpr:g})")
    return target


def _dump(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value
