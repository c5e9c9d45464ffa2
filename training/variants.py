"""Reduced-precision variants of an exported fp32 score graph: fp16 for CUDA, dynamic int8 for CPU.

Both keep the graph's interface: input `frames` stays uint8 NHWC and outputs stay float32, so the
service and the manifest check treat a variant like any other version (name it `<head>-fp16` etc.).

- fp16: onnxruntime's own converter (`onnxruntime.transformers.float16`, the code behind
  onnxconverter-common) with `keep_io_types=True`; reductions that lose range in half precision
  (the score's sums, exp/log of the ELBO) are left in fp32 by its default op block list plus ours.
  Meant for CUDAExecutionProvider; onnxruntime's CPU provider lacks fp16 kernels for most ops and
  inserts casts, so CPU timings of this variant say nothing about a GPU.
- int8: `onnxruntime.quantization.quantize_dynamic` (weights quantised offline, activations at run
  time; Jacob et al. 2018). Dynamic quantisation rewrites Conv as ConvInteger and MatMul/Gemm as
  MatMulInteger; ConvTranspose (the decoders) stays fp32. Weights use uint8 because onnxruntime's
  CPU ConvInteger kernel only takes uint8 x uint8.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import onnx

log = logging.getLogger(__name__)

Variant = Literal["fp32", "fp16", "int8"]
VARIANTS: tuple[Variant, ...] = ("fp32", "fp16", "int8")

# Ops whose fp16 version loses the score: large sums (ReduceSum/ReduceMean over a frame),
# exp/log/softplus in the likelihoods, and TopK over distances whose order half precision scrambles.
_FP16_KEEP_FP32 = ["ReduceSum", "ReduceMean", "ReduceLogSumExp", "Exp", "Log", "Softplus", "TopK", "Pow"]


def to_fp16(src: Path, dst: Path) -> None:
    """Write an fp16 copy of `src` with uint8 input and float32 outputs kept (for CUDA)."""
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    block = list(float16.DEFAULT_OP_BLOCK_LIST) + _FP16_KEEP_FP32
    half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    # The converter appends its Cast nodes at the end of the node list; the checker wants them sorted.
    sorted_model = OnnxModel(half)
    sorted_model.topological_sort()
    onnx.save(sorted_model.model, str(dst))


def to_int8(src: Path, dst: Path) -> None:
    """Write a dynamically quantised copy of `src` (Conv and MatMul/Gemm weights in uint8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Pre-processing (symbolic shape inference + graph optimisation) is what the quantiser expects.
    prepared = dst.with_name(f".{dst.name}.prep")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=False)
    quantize_dynamic(
        str(prepared),
        str(dst),
        weight_type=QuantType.QUInt8,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
    )
    prepared.unlink()


def make_variant(src: Path, dst: Path, variant: Variant) -> None:
    """Write `variant` of the fp32 graph `src` to `dst` (fp32 is a plain copy)."""
    if variant == "fp32":
        dst.write_bytes(Path(src).read_bytes())
    elif variant == "fp16":
        to_fp16(src, dst)
    elif variant == "int8":
        to_int8(src, dst)
    else:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


def count_ops(path: Path) -> dict[str, int]:
    """Node count per op type: shows what a quantiser actually rewrote."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
