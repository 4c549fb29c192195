"""FP16 variants for GPUs: float16 weights and activations, float32 where float16 loses.

LayerNormalization, Softmax, reductions and the ops around normalisation (Pow, Sqrt, Erf) stay in
float32; the graph's inputs and outputs stay float32, so the runtime feeds and reads the module as
before (a decoder's cache included). onnxruntime's float16 converter does the rewriting.
"""
from __future__ import annotations

from pathlib import Path

KEEP_FP32 = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "Pow", "Sqrt",
             "Erf", "Exp", "Log", "Range", "CumSum", "TopK")
FP16_BACKENDS = ("cuda", "tensorrt", "ort-trt")


def convert_fp16(src: Path, dst: Path) -> int:
    """Write `src` as float16 to `dst` (weights in `dst`.data); returns the nodes left in float32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from .nodes import load_model

    model = load_model(src)
    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(KEEP_FP32))
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    return sum(n.op_type in blocked for n in model.graph.node)
