"""The onnxruntime CPU variant of a decoder: INT8 weights, activations quantized at run time.

A decoder step multiplies a few rows by every weight matrix, so reading the weights dominates
(FACTS.md: the decode-step floor is its bytes read). Dynamic quantization stores the MatMul
weights as int8 (a quarter of the bytes) and quantizes each step's activations on the fly, with
no calibrated ranges to go stale on the long tail of decoding states (FACTS.md: steps 1.6-2.3x
faster at logits cosine 0.9998).

Each quantized MatMul becomes the standard-op pattern onnxruntime fuses into one integer kernel:

    x -> DynamicQuantizeLinear -> (x_q, x_scale, x_zero) ; MatMulInteger(x_q, w_q, x_zero)
      -> Cast(float) -> Mul(x_scale * w_scale) -> y

Only MatMuls with a constant weight are rewritten (Gemm stays float, so a tied LM head keeps its
one copy); the layers kept float (the head, --keep-float, sensitivity) are left alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .nodes import Target
from .qdq import quantize_weight, weight_scales


def _rewrite(graph, node, t: Target, w: np.ndarray, per_channel: bool, made: dict) -> list:
    """The nodes replacing MatMul `node` (target `t`, weight `w`); an activation read by several
    MatMuls is quantized once."""
    from onnx import TensorProto, helper, numpy_helper

    out, nodes = node.output[0], []
    if t.activation not in made:
        q = [f"{t.activation}_{s}" for s in ("quantized", "scale", "zero_point")]
        nodes.append(helper.make_node("DynamicQuantizeLinear", [t.activation], q,
                                      name=f"{t.activation}_DynamicQuantizeLinear"))
        made[t.activation] = q
    x_q, x_scale, x_zero = made[t.activation]
    axis = t.axis if per_channel else None
    scale = weight_scales(w, axis)
    w_q, w_scale = f"{t.weight}_quantized", f"{t.weight}_scale"
    if t.weight not in made:
        graph.initializer.extend([numpy_helper.from_array(quantize_weight(w, scale, axis), w_q),
                                  numpy_helper.from_array(scale, w_scale)])
        made[t.weight] = True
    base = t.node
    nodes += [
        helper.make_node("MatMulInteger", [x_q, w_q, x_zero], [f"{base}_int32"], name=f"{base}_quant"),
        helper.make_node("Cast", [f"{base}_int32"], [f"{base}_float"], name=f"{base}_cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [x_scale, w_scale], [f"{base}_scales"], name=f"{base}_scales_mul"),
        helper.make_node("Mul", [f"{base}_float", f"{base}_scales"], [out], name=f"{base}_output_scale_mul"),
    ]
    return nodes


def quantize_dynamic_weights(model, targets: Sequence[Target], *, per_channel: bool = True) -> int:
    """Rewrite the MatMul `targets` of `model` (an onnx ModelProto, weights loaded) in place with
    int8 weights and run-time activation quantization; returns how many were rewritten."""
    from onnx import numpy_helper

    graph = model.graph
    chosen = {t.node: t for t in targets if t.op == "MatMul"}
    inits = {i.name: i for i in graph.initializer}
    made: dict = {}
    nodes = []
    for node in graph.node:
        t = chosen.get(node.name)
        if t is None:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
        nodes += _rewrite(graph, node, t, w, per_channel, made)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used or i.name not in {t.weight for t in chosen.values()}]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(chosen)


def write_dynamic(src: Path, dst: Path, targets: Sequence[Target], *, per_channel: bool = True) -> int:
    """Write the decoder `src` with dynamic INT8 MatMuls to `dst` (weights in `dst`.data)."""
    import onnx

    from .nodes import name_nodes

    model = onnx.load(str(src))
    name_nodes(model.graph)
    count = quantize_dynamic_weights(model, targets, per_channel=per_channel)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    return count
