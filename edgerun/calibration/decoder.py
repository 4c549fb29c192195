"""The onnxruntime CPU variant of a decoder: INT8 weights, activations quantized at run time.

A decoder step multiplies a few rows by every weight matrix, so reading the weights dominates
(FACTS.md: the decode-step floor is its bytes read). Dynamic quantization stores the MatMul
weights as int8 (a quarter of the bytes) and quantizes each step's activations on the fly, with
no calibrated ranges to go stale on the long tail of decoding states (FACTS.md: steps 1.6-2.3x
faster at logits cosine 0.9998).

Each quantized MatMul becomes the standard-op pattern onnxruntime fuses into one integer kernel:

    x -> DynamicQuantizeLinear -> (x_q, x_scale, x_zero) ; MatMulInteger(x_q, w_q, x_zero)
      -> Cast(float) -> Mul(x_scale * w_scale) -> y

A Gemm with a constant weight (the LM head, `transB=1`: weight (vocab, hidden)) is rewritten the
same way, its int8 weight stored transposed, (hidden, vocab), as MatMulInteger wants it. Where that
weight is also the token embedding (a tied head), it stays ONE int8 copy: the embedding Gathers
read columns of the transposed table and rescale them by the same per-token scales,

    ids -> Gather(w_qT, axis=1) -> Transpose -> Cast(float) -> Mul(Gather(w_scale, ids)) -> embeds

so the head, the largest single read of a decode step, costs a quarter of its float bytes. The
head is quantized only when the plan asks for it (it stays float by default); the other layers
kept float (--keep-float, sensitivity) are left alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..export.simplify import readers_of
from .nodes import Target, attr, load_model, plain_gemm
from .qdq import quantize_weight, weight_scales


def transposed(node) -> bool:
    """Whether a Gemm's weight is stored (out, in)."""
    return node.op_type == "Gemm" and attr(node, "transB", 0) == 1


def rewritable(graph, targets: Sequence[Target]) -> list[Target]:
    """The targets this rewrite handles: constant-weight MatMuls and plain Gemms (`x @ W + C`,
    `x @ W.T + C`) whose weight nothing else reads, and `x @ W.T + C` Gemms whose weight is read
    otherwise only by Gathers on axis 0 (a tied embedding)."""
    nodes = {n.name: n for n in graph.node}
    readers = readers_of(graph)
    out = []
    for t in targets:
        node = nodes[t.node]
        plain = t.op == "MatMul" or (t.op == "Gemm" and plain_gemm(node))
        only_reader = plain and len(readers[t.weight]) == 1
        tied_head = t.op == "Gemm" and plain_gemm(node) and transposed(node) and all(
            r is node or (r.op_type == "Gather" and r.input[0] == t.weight and attr(r, "axis", 0) == 0)
            for r in readers[t.weight])
        if only_reader or tied_head:
            out.append(t)
    return out


class _Rewriter:
    """Emits the integer nodes; an activation read by several layers is quantized once."""

    def __init__(self, graph, per_channel: bool):
        from onnx import numpy_helper

        self.graph, self.per_channel = graph, per_channel
        self.ranks = _ranks(graph)  # of the embedding ids, for the transpose back
        self.inits = {i.name: i for i in graph.initializer}
        self.to_array, self.from_array = numpy_helper.to_array, numpy_helper.from_array
        self.quantized: dict[str, tuple[str, str]] = {}  # activation -> (x_q, x_scale, x_zero)
        self.weights: dict[str, tuple[str, str]] = {}  # float weight -> (int8 (in, out), scales)

    def weight(self, t: Target) -> tuple[str, str]:
        """The int8 weight, laid out (in, out) for MatMulInteger, and its per-output scales."""
        if t.weight not in self.weights:
            w = self.to_array(self.inits[t.weight]).astype(np.float32)
            axis = t.axis if self.per_channel else None
            scale = weight_scales(w, axis)
            w_q = quantize_weight(w, scale, axis)
            if t.op == "Gemm" and t.axis == 0:  # (out, in) -> (in, out); scales stay per output channel
                w_q = np.ascontiguousarray(w_q.T)
            names = (f"{t.weight}_quantized", f"{t.weight}_scale")
            self.graph.initializer.extend([self.from_array(w_q, names[0]), self.from_array(scale, names[1])])
            self.weights[t.weight] = names
        return self.weights[t.weight]

    def layer(self, node, t: Target) -> list:
        from onnx import TensorProto, helper

        nodes = []
        if t.activation not in self.quantized:
            q = [f"{t.activation}_{s}" for s in ("quantized", "scale", "zero_point")]
            nodes.append(helper.make_node("DynamicQuantizeLinear", [t.activation], q,
                                          name=f"{t.activation}_DynamicQuantizeLinear"))
            self.quantized[t.activation] = q
        x_q, x_scale, x_zero = self.quantized[t.activation]
        w_q, w_scale = self.weight(t)
        base, out = t.node, node.output[0]
        scaled = f"{base}_matmul" if t.op == "Gemm" and len(node.input) > 2 else out
        nodes += [
            helper.make_node("MatMulInteger", [x_q, w_q, x_zero], [f"{base}_int32"], name=f"{base}_quant"),
            helper.make_node("Cast", [f"{base}_int32"], [f"{base}_float"], name=f"{base}_cast",
                             to=TensorProto.FLOAT),
            helper.make_node("Mul", [x_scale, w_scale], [f"{base}_scales"], name=f"{base}_scales_mul"),
            helper.make_node("Mul", [f"{base}_float", f"{base}_scales"], [scaled], name=f"{base}_output_scale_mul"),
        ]
        if scaled != out:
            nodes.append(helper.make_node("Add", [scaled, node.input[2]], [out], name=f"{base}_bias_add"))
        return nodes

    def embedding(self, node) -> list:
        """A Gather of rows of a quantized tied weight: columns of its transposed int8 table, rescaled."""
        from onnx import TensorProto, helper, numpy_helper

        w_q, w_scale = self.weights[node.input[0]]
        ids, out, base = node.input[1], node.output[0], node.name
        self.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), f"{base}_axis0"))
        return [
            helper.make_node("Gather", [w_q, ids], [f"{base}_cols"], name=f"{base}_int8", axis=1),
            helper.make_node("Cast", [f"{base}_cols"], [f"{base}_cols_float"], name=f"{base}_cast",
                             to=TensorProto.FLOAT),
            helper.make_node("Gather", [w_scale, ids], [f"{base}_scale"], name=f"{base}_scale", axis=0),
            helper.make_node("Unsqueeze", [f"{base}_scale", f"{base}_axis0"], [f"{base}_scale_row"],
                             name=f"{base}_scale_row"),
            helper.make_node("Mul", [f"{base}_cols_float", f"{base}_scale_row"], [f"{base}_scaled"],
                             name=f"{base}_rescale"),
            # (hidden, *ids) -> (*ids, hidden): the rank of `ids` is known from the float Gather's use
            helper.make_node("Transpose", [f"{base}_scaled"], [out], name=f"{base}_transpose",
                             perm=self._perm(ids)),
        ]

    def _perm(self, ids: str) -> list[int]:
        rank = self.ranks.get(ids, 2)
        return list(range(1, rank + 1)) + [0]


def _ranks(graph) -> dict[str, int]:
    """Ranks of the graph inputs and known value infos (the embedding ids are graph inputs)."""
    out = {}
    for v in list(graph.input) + list(graph.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            out[v.name] = len(v.type.tensor_type.shape.dim)
    return out


def quantize_dynamic_weights(model, targets: Sequence[Target], *, per_channel: bool = True) -> int:
    """Rewrite the linear `targets` of `model` (an onnx ModelProto, weights loaded) in place with
    int8 weights and run-time activation quantization; returns how many were rewritten. Targets
    this rewrite cannot express (a Gemm with other attributes, a weight read elsewhere) stay float."""
    graph = model.graph
    chosen = {t.node: t for t in rewritable(graph, targets)}
    rw = _Rewriter(graph, per_channel)
    for t in chosen.values():  # tables first: a tied embedding is read before its head
        rw.weight(t)
    apply_rewrite(graph, chosen, rw)
    return len(chosen)


def apply_rewrite(graph, chosen: dict[str, Target], rw) -> None:
    """Replace each chosen node by `rw.layer(node, target)` and each Gather of a tied head's weight
    by `rw.embedding(node)`, then drop the float weights the rewrite replaced."""
    tied = {t.weight for t in chosen.values() if t.op == "Gemm"}
    nodes = []
    for node in graph.node:
        t = chosen.get(node.name)
        if t is not None:
            nodes += rw.layer(node, t)
        elif node.op_type == "Gather" and node.input[0] in tied:
            nodes += rw.embedding(node)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    replaced = {t.weight for t in chosen.values()}
    keep = [i for i in graph.initializer if i.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(keep)


DECODER_SCHEMES = ("blockwise", "dynamic")  # blockwise.py: MatMulNBits; this module: MatMulInteger


def write_decoder(src: Path, dst: Path, targets: Sequence[Target], *, scheme: str = "blockwise",
                  per_channel: bool = True) -> int:
    """Write the decoder `src` with INT8 linear layers to `dst` (weights in `dst`.data): `blockwise`
    (MatMulNBits, onnxruntime >= 1.23) or `dynamic` (standard ops, per-channel when `per_channel`)."""
    import onnx

    from ..export.simplify import share_tied_head
    from .nodes import calibration_view

    model = load_model(src)
    calibration_view(model.graph)
    if scheme == "blockwise":
        from .blockwise import quantize_blockwise_weights

        count = quantize_blockwise_weights(model, targets)
    else:
        count = quantize_dynamic_weights(model, targets, per_channel=per_channel)
    share_tied_head(model.graph)  # a head left float and still tied: held once in memory, as exported
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    data = dst.with_name(dst.name + ".data")
    if data.exists():
        data.chmod(0o644)  # onnx writes 0600; a service account must read the bundle
    return count


def write_dynamic(src: Path, dst: Path, targets: Sequence[Target], *, per_channel: bool = True) -> int:
    """`write_decoder` with the standard-op dynamic scheme."""
    return write_decoder(src, dst, targets, scheme="dynamic", per_channel=per_channel)
