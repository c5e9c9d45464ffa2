"""The one way an ONNX score graph is opened in onnxruntime, for export's checks and for serving, and
the execution providers it asks for (CUDA first when the build has it, CPU always last).

Export calibrates the threshold with onnxruntime, so its session must be built like the service's:
the same optimisation level and the same disabled rewrites give the same numbers. onnxruntime is
imported inside the function, so importing contract stays free of it (tests/test_contract_imports.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

# Graph rewrites that measured slower (bench/bench_export.py, docs/benchmarks.md): MatMulScaleFusion folds
# the patch heads' `-2 * bmm(f, bank)` into one FusedMatMul that took twice as long as MatMul + Mul at
# batch 1 (1.40 -> 0.77 ms for gan-patch, 2.08 -> 0.91 ms for vae-patch, identical outputs).
DISABLED_OPTIMIZERS = ("MatMulScaleFusion",)


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """Full graph optimisation (constant folding, Conv+BN/activation fusion); 0 threads = one per core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    # Idle intra-op threads must not spin: in the service they would burn the cores that the event
    # loop needs for HTTP and decoding (measured by bench/bench_service.py on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(path: Path, providers: Sequence[str], intra_op_threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session of ``path`` with :func:`session_options`, minus ``DISABLED_OPTIMIZERS``."""
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path),
        sess_options=session_options(intra_op_threads),
        providers=list(providers),
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, with CPU as the fallback onnxruntime always has."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """The providers to ask for: ``requested`` minus those this build lacks (logged), CPU always last."""
    import onnxruntime as ort

    if not requested:
        return default_providers()
    available = set(ort.get_available_providers())
    missing = [p for p in requested if p not in available]
    if missing:
        log.warning("execution providers %s are not in this onnxruntime build; skipping them", missing)
    chosen = [p for p in requested if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]
