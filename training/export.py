"""Export a score graph to ONNX, prove it computes what torch computes, calibrate it, publish it.

The math that was evaluated is the math that serves: the graph holds scaling and score math
(uint8 NHWC in, `score` [N] and `anomaly_map` [N, H, W] out, dynamic batch), and every export

1. checks the file (`onnx.checker` and strict shape inference),
2. runs onnxruntime at batch 1 and 37 on normal and edge-case frames and compares with torch:
   relative difference `|a - b| / max(|a|, |b|, eps)`, gate 1e-4 for fp32 scores. `eps` is the
   typical size of a normal frame's score, `max(1e-3, median |score of the normal parity frames|)`:
   a score is a difference of large terms for some heads (ELBO minus code length, z-scores), so a
   score that crosses zero carries the float32 rounding of its terms, not of itself. Anomaly maps
   are compared as `max |a - b| / max |a|` over the whole batch, same gate,
3. calibrates the threshold with onnxruntime on held-out normals, so the threshold belongs to the
   graph that serves (anomalib's users lost theirs between runtimes),
4. writes everything into `models/<name>/.tmp-*` and renames it to `models/<name>/<version>` only
   after all of that passed; a published version is never modified (Triton's model repository).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from tqdm import tqdm

from contract.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    Calibration,
    ExportInfo,
    InputSpec,
    Manifest,
    ModelInfo,
    OutputSpec,
    Parity,
    Threshold,
    TrainingInfo,
    file_entry,
    load_manifest,
    thin_scores,
    utc_now,
)
from training.variants import VARIANTS, Variant, make_variant

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

OPSET = 17
MIN_PARITY_EPS = 1e-3
PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 37)
TRACE_BATCH = 2
N_PARITY_FRAMES = 37  # per kind (normal, edge case): one full batch of 37 each
DEFAULT_TARGET_FPR = 0.01

Frames = npt.NDArray[np.uint8]


class ExportError(RuntimeError):
    """A check of the export failed; nothing was published."""


# ---- running graphs ------------------------------------------------------------------------------


def rel_diff(a: npt.ArrayLike, b: npt.ArrayLike, eps: float = MIN_PARITY_EPS) -> npt.NDArray[np.float64]:
    """Elementwise |a - b| / max(|a|, |b|, eps): relative for large scores, absolute near zero."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a64 - b64) / np.maximum(np.maximum(np.abs(a64), np.abs(b64)), eps)


def ort_session(path: Path, intra_op_threads: int = 0) -> ort.InferenceSession:
    """A CPU session built as the service builds one (service.registry.make_session; training must not
    import service, so the two settings below are kept in step by hand)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(
        str(path),
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["MatMulScaleFusion"],
    )


def run_ort(
    session: ort.InferenceSession, frames: Frames, batch_size: int, desc: str | None = None
) -> dict[str, npt.NDArray[np.float32]]:
    """All outputs of `session` over `frames` in batches of `batch_size`, concatenated."""
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    starts = range(0, len(frames), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
        values = session.run(names, {"frames": np.ascontiguousarray(frames[start : start + batch_size])})
        for name, value in zip(names, values, strict=True):
            chunks[name].append(value)
    return {n: np.concatenate(v) for n, v in chunks.items()}


def run_torch(graph: nn.Module, frames: Frames, batch_size: int) -> dict[str, npt.NDArray[np.float32]]:
    """The same outputs from the torch graph (eval mode, no grad), named like the ONNX outputs."""
    import torch

    chunks: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for start in range(0, len(frames), batch_size):
            out = graph(torch.from_numpy(np.ascontiguousarray(frames[start : start + batch_size])))
            values = out if isinstance(out, tuple | list) else (out,)
            for name, value in zip(("score", "anomaly_map"), values, strict=False):
                chunks.setdefault(name, []).append(value.detach().float().cpu().numpy())
    return {n: np.concatenate(v) for n, v in chunks.items()}


# ---- export and checks ---------------------------------------------------------------------------


def _expm1_symbolic(g: Any, x: Any) -> Any:
    """ONNX has no Expm1, and exp(x) - 1 loses every digit for small x. Kahan's trick keeps them:
    expm1(x) = (u - 1) * x / log(u) with u = exp(x), and exactly x where u rounds to 1
    (Goldberg 1991, "What every computer scientist should know about floating-point arithmetic", Thm 4)."""
    import torch

    one = g.op("Constant", value_t=torch.tensor(1.0))
    zero = g.op("Constant", value_t=torch.tensor(0.0))
    u = g.op("Exp", x)
    u_minus_1 = g.op("Sub", u, one)
    kahan = g.op("Div", g.op("Mul", u_minus_1, x), g.op("Log", u))
    small = g.op("Where", g.op("Equal", u, one), x, kahan)
    # u = 0 (x < -103): expm1 = -1 = u - 1; u = inf (x > 88): expm1 = inf = u.
    ends = g.op("Or", g.op("Equal", u, zero), g.op("IsInf", u))
    return g.op("Where", ends, u_minus_1, small)


def _softplus_symbolic(g: Any, x: Any, beta: Any, threshold: Any) -> Any:
    """softplus(x) = relu(x) + log(1 + exp(-|x|)) (for beta = 1; else scaled by beta).

    onnxruntime's own Softplus kernel is scalar: 13 ms vs 3.5 ms for these seven vectorised ops on
    1.2M values (one thread), and it dominated the ELBO heads (22 of 80 ms at batch 32). Same
    accuracy: absolute error <= 1e-6 against torch; below x = -17 it returns 0 for exp(x) < 6e-8.
    """
    import torch
    from torch.onnx import symbolic_helper

    b = float(symbolic_helper._maybe_get_const(beta, "f"))
    bx = x if b == 1.0 else g.op("Mul", x, g.op("Constant", value_t=torch.tensor(b)))
    one = g.op("Constant", value_t=torch.tensor(1.0))
    tail = g.op("Log", g.op("Add", g.op("Exp", g.op("Neg", g.op("Abs", bx))), one))
    out = g.op("Add", g.op("Relu", bx), tail)
    return out if b == 1.0 else g.op("Div", out, g.op("Constant", value_t=torch.tensor(b)))


def export_onnx(graph: nn.Module, path: Path, size: int, opset: int = OPSET) -> tuple[list[str], str]:
    """Trace `graph` at batch TRACE_BATCH into `path`; returns (output names, exporter used).

    The legacy TorchScript exporter (`dynamo=False`) is tried first: fast and exact for these
    conv nets. The dynamo exporter is the fallback for graphs it cannot trace.
    """
    import torch

    example = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (TRACE_BATCH, size, size, 3), np.uint8)
    )
    with torch.inference_mode():
        out = graph(example)
    n_out = len(out) if isinstance(out, tuple | list) else 1
    if n_out not in (1, 2):
        raise ExportError(f"a score graph returns score or (score, anomaly_map), got {n_out} outputs")
    names = ["score", "anomaly_map"][:n_out]
    dynamic_axes = {"frames": {0: "N"}, **{n: {0: "N"} for n in names}}
    torch.onnx.register_custom_op_symbolic("aten::expm1", _expm1_symbolic, opset)
    torch.onnx.register_custom_op_symbolic("aten::softplus", _softplus_symbolic, opset)
    try:
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=["frames"],
            output_names=names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        return names, "torch.onnx.export(dynamo=False)"
    except Exception as exc:  # the legacy exporter raises many types; dynamo gets its chance
        log.warning("legacy ONNX exporter failed (%s); trying the dynamo exporter", exc)
    batch = torch.export.Dim("N", min=1)
    program = torch.onnx.export(
        graph,
        (example,),
        input_names=["frames"],
        output_names=names,
        dynamic_shapes={"frames": {0: batch}},
        opset_version=opset,
        dynamo=True,
    )
    program.save(str(path))
    return names, "torch.onnx.export(dynamo=True)"


def graph_opset(path: Path) -> int:
    """The default-domain opset the file really uses (the dynamo exporter may not honour the request)."""
    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_onnx(path: Path) -> None:
    """onnx.checker on the file and on the shape-inferred graph (strict: unknown ops fail)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path}: onnx.checker failed: {exc}") from exc


def check_signature(session: ort.InferenceSession, size: int, names: Sequence[str]) -> None:
    """The exported interface is the contract: uint8 [N, size, size, 3] in, named float outputs out."""
    (inp,) = session.get_inputs()
    if inp.name != "frames" or inp.type != "tensor(uint8)":
        raise ExportError(f"graph input is {inp.name} {inp.type}, expected frames tensor(uint8)")
    if isinstance(inp.shape[0], int) or list(inp.shape[1:]) != [size, size, 3]:
        raise ExportError(f"graph input shape {inp.shape}, expected [N, {size}, {size}, 3] with dynamic N")
    got = [o.name for o in session.get_outputs()]
    if got != list(names):
        raise ExportError(f"graph outputs {got}, expected {list(names)}")


def parity_eps(normal_scores: npt.ArrayLike) -> float:
    """The scale below which differences count as absolute: the typical |score| of a normal frame."""
    scores = np.abs(np.asarray(normal_scores, dtype=np.float64))
    return max(MIN_PARITY_EPS, float(np.median(scores))) if scores.size else MIN_PARITY_EPS


def check_parity(
    reference: dict[str, np.ndarray],
    session: ort.InferenceSession,
    frames: Frames,
    tolerance: float | None,
    n_normal: int,
) -> Parity:
    """Compare onnxruntime at every batch size in PARITY_BATCHES with the torch `reference` outputs.

    `frames[:n_normal]` are normal frames: their scores set `eps` (see the module docstring).
    """
    eps = parity_eps(reference["score"][:n_normal])
    worst, worst_map = 0.0, None
    for batch in PARITY_BATCHES:
        got = run_ort(session, frames, batch, desc=f"parity at batch {batch}")
        if got["score"].shape != reference["score"].shape:
            raise ExportError(
                f"score shape {got['score'].shape} at batch {batch}, torch {reference['score'].shape}"
            )
        if not np.all(np.isfinite(got["score"])):
            raise ExportError(f"onnxruntime gave non-finite scores at batch {batch}")
        worst = max(worst, float(rel_diff(reference["score"], got["score"], eps).max()))
        if "anomaly_map" in reference:
            scale = max(float(np.abs(reference["anomaly_map"]).max()), MIN_PARITY_EPS)
            diff = float(np.abs(reference["anomaly_map"] - got["anomaly_map"]).max()) / scale
            worst_map = max(worst_map or 0.0, diff)
    if tolerance is not None and worst > tolerance:
        raise ExportError(
            f"torch vs onnxruntime scores differ: max relative difference {worst:.3g} > {tolerance:g} "
            f"(eps {eps:.3g}) on {len(frames)} frames"
        )
    if tolerance is not None and worst_map is not None and worst_map > tolerance:
        raise ExportError(f"torch vs onnxruntime anomaly maps differ: {worst_map:.3g} of the map's range")
    return Parity(
        max_rel_diff=worst,
        eps=eps,
        n_frames=len(frames),
        batch_sizes=list(PARITY_BATCHES),
        tolerance=tolerance,
        map_max_rel_diff=worst_map,
    )


# ---- frames --------------------------------------------------------------------------------------


def read_normal_frames(source: str | Path, size: int, limit: int | None = None) -> Frames:
    """Frames of a folder/shard/Parquet of held-out normals; frames labelled as another family are skipped."""
    from contract.readers import ReadReport, count_frames, iter_frames

    report = ReadReport()
    frames = []
    total = count_frames(source)
    for frame in tqdm(
        iter_frames(source, size=size, report=report), total=total, desc="read normals", leave=False
    ):
        if str(frame.meta.get("family", "normal")) != "normal":
            continue
        frames.append(frame.image)
        if limit is not None and len(frames) >= limit:
            break
    if not frames:
        raise ExportError(f"no normal frames found in {source} ({report.failed} failed to decode)")
    return np.stack(frames)


def run_data_sources(config: dict[str, Any]) -> list[str]:
    sources = config.get("data") or config.get("data_sources") or []
    return [str(s) for s in ([sources] if isinstance(sources, str | Path) else sources)]


def held_out_normals(config: dict[str, Any], size: int) -> Frames:
    """The run's own validation normals, split exactly as the trainer split them (never trained on)."""
    from training.data import load_training_frames

    sources = run_data_sources(config)
    if not sources:
        if not config.get("dry_run"):
            raise ExportError("the run's config.json names no data sources; pass --data NORMALS")
        log.warning("dry run without data: calibrating on noise frames (the threshold means nothing)")
        return np.random.default_rng(0).integers(0, 256, (N_PARITY_FRAMES, size, size, 3), dtype=np.uint8)
    max_frames = config.get("max_frames")
    if config.get("dry_run"):  # the trainer read only its first few frames; split the same ones
        trainer = importlib.import_module(f"training.{config['kind']}_train")
        max_frames = getattr(trainer, "DRY_RUN_FRAMES", max_frames)
    data = load_training_frames(
        sources,
        size,
        seed=int(config.get("seed", 0)),
        val_fraction=float(config.get("val_fraction", 0.1)),
        max_frames=max_frames,
    )
    return data.val


def edge_case_frames(config: dict[str, Any], size: int, normals: Frames, n: int) -> tuple[Frames, list[str]]:
    """Edge-case frames with families: the test split of a labelled data source, else perturbed normals."""
    from training.data import is_labelled_folder, load_labelled_frames

    for source in run_data_sources(config):
        if is_labelled_folder(source):
            frames, families, _, _ = load_labelled_frames(source, size, max_per_family=max(1, n // 8))
            mask = np.array([f != "normal" for f in families])
            if mask.any():
                return frames[mask][:n], [f for f, m in zip(families, mask, strict=True) if m][:n]
    return perturbed_frames(normals, n)


def perturbed_frames(normals: Frames, n: int, seed: int = 0) -> tuple[Frames, list[str]]:
    """Generic out-of-distribution frames made from normals (dark, washed out, noisy, dead rows)."""
    rng = np.random.default_rng(seed)
    base = normals[rng.integers(0, len(normals), n)].astype(np.float32)
    kinds = ["dark", "washed-out", "noise", "dead-rows"]
    families = [kinds[i % len(kinds)] for i in range(n)]
    out = base.copy()
    for i, family in enumerate(families):
        if family == "dark":
            out[i] *= 0.2
        elif family == "washed-out":
            out[i] = 0.3 * out[i] + 0.7 * 200.0
        elif family == "noise":
            out[i] += rng.normal(0, 60, out[i].shape)
        else:
            out[i, ::4] = 0.0
    return np.clip(out, 0, 255).astype(np.uint8), families


def auroc(normal: np.ndarray, edge: np.ndarray) -> float:
    """P(edge score > normal score) + half the ties (Mann-Whitney form of the ROC AUC)."""
    greater = (edge[:, None] > normal[None, :]).mean()
    ties = (edge[:, None] == normal[None, :]).mean()
    return float(greater + 0.5 * ties)


def evaluation_summary(
    normal: np.ndarray, edge: np.ndarray, families: list[str], source: str
) -> dict[str, Any]:
    """AUROC of the exported graph (onnxruntime scores) on the parity frames, overall and per family."""
    fam = np.array(families)
    return {
        "frames": source,
        "scored_with": "onnxruntime",
        "n_normal": int(len(normal)),
        "n_edge": int(len(edge)),
        "auroc": auroc(normal, edge),
        "auroc_by_family": {f: auroc(normal, edge[fam == f]) for f in sorted(set(families))},
    }


# ---- the repository ------------------------------------------------------------------------------


def next_version(model_dir: Path) -> int:
    """One more than the highest integer folder (temp dot-folders do not count)."""
    taken = (
        [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if model_dir.is_dir()
        else []
    )
    return max(taken, default=0) + 1


def make_temp_dir(model_dir: Path) -> Path:
    """A dot-folder beside the versions: invisible to the registry, on the same filesystem for rename."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


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
    size: int,
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
    tmp = make_temp_dir(model_dir)
    try:
        print(f"[2/5] exporting to ONNX (opset {opset}, variant {variant})", flush=True)
        fp32_path = tmp / ".fp32.onnx"
        names, exporter = export_onnx(graph, fp32_path, size, opset)
        check_onnx(fp32_path)
        model_path = tmp / MODEL_FILE
        make_variant(fp32_path, model_path, variant)
        fp32_path.unlink()
        check_onnx(model_path)
        session = ort_session(model_path)
        check_signature(session, size, names)

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
            outputs.append(OutputSpec(name="anomaly_map", shape=["N", size, size]))
        manifest = Manifest(
            name=name,
            version=version or 1,  # publish() sets the real one
            created_at=utc_now(),
            model=model,
            input=InputSpec(height=size, width=size),
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    from training.graphs import build_score_graph, head_info
    from training.runs import load_config

    run_dir = Path(run_dir)
    config = load_config(run_dir)
    size, kind = int(config["size"]), str(config["kind"])
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
    tmp = make_temp_dir(model_dir)
    try:
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"published {target} (threshold {cal.threshold:.6g} at FPR {target_fpr:g})")
    return target


def _dump(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value
