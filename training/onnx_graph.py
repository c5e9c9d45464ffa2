"""An ONNX file from a torch score graph, and the proof that onnxruntime computes what torch computes.

The checks every export passes (training/export.py runs them before anything is published):

- the file: `onnx.checker` with strict shape inference (:func:`check_onnx`);
- the interface, the contract with the service: uint8 `frames` [N, H, W, 3] in with a dynamic
  N, `score` [N] and optionally `anomaly_map` [N, H, W] out (:func:`check_signature`);
- parity (:func:`check_parity`): onnxruntime at batch 1 and 37 against torch, relative difference
  `|a - b| / max(|a|, |b|, eps)` under 1e-4, with `eps` the typical |score| of a normal frame
  (:func:`parity_eps`; export.py's docstring says why).

Two torch ops get ONNX symbolics of our own (:func:`export_onnx`): Expm1, which ONNX lacks, and
Softplus, whose onnxruntime kernel was the ELBO heads' bottleneck (docs/benchmarks.md, "Export").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from tqdm import tqdm

from contract.manifest import Parity
from contract.sessions import open_session

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

OPSET = 17
MIN_PARITY_EPS = 1e-3
PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 37)
TRACE_BATCH = 2

Frames = npt.NDArray[np.uint8]


class ExportError(RuntimeError):
    """A check of the export failed; nothing was published."""


# ---- running graphs ------------------------------------------------------------------------------


def rel_diff(a: npt.ArrayLike, b: npt.ArrayLike, eps: float = MIN_PARITY_EPS) -> npt.NDArray[np.float64]:
    """Elementwise |a - b| / max(|a|, |b|, eps): relative for large scores, absolute near zero."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a64 - b64) / np.maximum(np.maximum(np.abs(a64), np.abs(b64)), eps)


def ort_session(path: Path, intra_op_threads: int = 0) -> ort.InferenceSession:
    """A CPU session built as the service builds one (contract.sessions.open_session)."""
    return open_session(path, ["CPUExecutionProvider"], intra_op_threads)


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


def export_onnx(
    graph: nn.Module, path: Path, size: int | tuple[int, int], opset: int = OPSET
) -> tuple[list[str], str]:
    """Trace `graph` at batch TRACE_BATCH into `path`; returns (output names, exporter used).

    The legacy TorchScript exporter (`dynamo=False`) is tried first: fast and exact for these
    conv nets. The dynamo exporter is the fallback for graphs it cannot trace.
    """
    import torch

    h, w = _hw(size)
    example = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (TRACE_BATCH, h, w, 3), np.uint8))
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


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """(H, W) of a square side or an (H, W) pair (a FrameSize)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_signature(session: ort.InferenceSession, size: int | tuple[int, int], names: Sequence[str]) -> None:
    """The exported interface is the contract: uint8 [N, H, W, 3] in, named float outputs out."""
    h, w = _hw(size)
    (inp,) = session.get_inputs()
    if inp.name != "frames" or inp.type != "tensor(uint8)":
        raise ExportError(f"graph input is {inp.name} {inp.type}, expected frames tensor(uint8)")
    if isinstance(inp.shape[0], int) or list(inp.shape[1:]) != [h, w, 3]:
        raise ExportError(f"graph input shape {inp.shape}, expected [N, {h}, {w}, 3] with dynamic N")
    got = [o.name for o in session.get_outputs()]
    if got != list(names):
        raise ExportError(f"graph outputs {got}, expected {list(names)}")


SPREAD_FACTOR = 10.0
"""eps is at least this many interquartile ranges of the normal scores (see ``parity_eps``)."""


def parity_eps(normal_scores: npt.ArrayLike) -> float:
    """The scale below which differences count as absolute, from the normal frames' own scores.

    The larger of the typical |score| of a normal frame and ``SPREAD_FACTOR`` x the interquartile
    range of the normal scores. With the 1e-4 gate, a score near zero may then differ by 1e-3 of the
    normal scores' spread: far below what could move a frame across the calibration scores, and far
    above the float32 rounding of a score that is a difference of large terms (a z-score combination
    of ELBO-sized heads crosses zero while its terms are in the thousands). A real divergence (a
    baked-in batch size, a wrong op) is of the order of the spread itself.
    """
    scores = np.asarray(normal_scores, dtype=np.float64)
    if not scores.size:
        return MIN_PARITY_EPS
    q1, q3 = np.percentile(scores, [25, 75])
    return max(MIN_PARITY_EPS, float(np.median(np.abs(scores))), SPREAD_FACTOR * float(q3 - q1))


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
