"""Graph clean-ups after tracing: fewer tiny shape ops in every step of a decoder, and GPT-2's
Gemms as MatMuls.

The tracer turns `x.view(x.shape[0], x.shape[1], heads, head_dim)` into Shape -> Gather ->
Unsqueeze (twice) -> Concat -> Reshape, computed anew at every call. ONNX's Reshape already has a
way to say "keep this dimension of the input": 0 (with `allowzero` unset). Where each entry of a
Reshape's shape is either a constant or the input's OWN dimension at the same position, the shape
becomes one constant, ([0, 0, 8, 96] for the view above), and the nodes that computed it are dropped
once nothing else reads them. On BLIP-base's decoder this removed 36 such chains and ~470 nodes;
a decode step ran ~10% faster under onnxruntime (interleaved A/B). TensorRT reads 0 the same way.
"""
from __future__ import annotations

import numpy as np


def _attr(node, name: str, default=0):
    return next((a.i for a in node.attribute if a.name == name), default)


class _Graph:
    def __init__(self, graph):
        from onnx import numpy_helper

        self.to_array = numpy_helper.to_array
        self.producer = {o: n for n in graph.node for o in n.output}
        self.inits = {i.name: i for i in graph.initializer}

    def constant(self, name: str):
        if name in self.inits:
            return self.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return self.to_array(node.attribute[0].t)
        return None

    def own_dim(self, part: str, data: str) -> int | None:
        """`part` = Unsqueeze(Gather(Shape(data), scalar index)): that index, else None."""
        unsq = self.producer.get(part)
        gather = unsq is not None and unsq.op_type == "Unsqueeze" and self.producer.get(unsq.input[0])
        if not gather or gather.op_type != "Gather" or _attr(gather, "axis") != 0:
            return None
        shape = self.producer.get(gather.input[0])
        if shape is None or shape.op_type != "Shape" or shape.input[0] != data or shape.attribute:
            return None
        index = self.constant(gather.input[1])
        return int(index) if index is not None and index.ndim == 0 and int(index) >= 0 else None

    def static_shape(self, node) -> list[int] | None:
        """The constant shape a Reshape's computed shape input stands for, or None."""
        concat = self.producer.get(node.input[1])
        if concat is None or concat.op_type != "Concat" or _attr(concat, "axis") != 0:
            return None
        out = []
        for pos, part in enumerate(concat.input):
            value = self.constant(part)
            if value is not None and value.size == 1:
                out.append(int(value.ravel()[0]))
            elif self.own_dim(part, node.input[0]) == pos:
                out.append(0)  # Reshape: 0 keeps the input's dimension
            else:
                return None
        return out if out.count(-1) <= 1 else None


def fold_reshape_shapes(graph) -> int:
    """Give every Reshape whose computed shape is constants and its input's own dims a constant
    shape; returns how many. Unused nodes are dropped afterwards (`drop_dead_nodes`)."""
    from onnx import numpy_helper

    g, done = _Graph(graph), 0
    for i, node in enumerate(graph.node):
        if node.op_type != "Reshape" or _attr(node, "allowzero") or len(node.input) < 2:
            continue
        shape = g.static_shape(node)
        if shape is None:
            continue
        name = f"reshape_shape_{i}"
        graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), name))
        node.input[1] = name
        done += 1
    return done


def drop_dead_nodes(graph) -> int:
    """Remove the nodes no graph output depends on, and initializers nothing reads; returns the
    number of nodes removed."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs (If/Loop bodies) read outer names too
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed.update(i for n in sub.node for i in n.input if i)
    removed = len(graph.node) - len(keep)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    needed.update(v.name for v in graph.input)  # an initializer that is also an input stays
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return removed


def gemm_as_matmul(graph) -> int:
    """Rewrite `Gemm(x, W, C)` with a constant (in, out) weight and no transposition or scaling
    (GPT-2's Conv1D layers trace to these) as `MatMul(x, W)` + `Add(C)`; returns how many.

    Same arithmetic, and onnxruntime fuses MatMul + Add back for float. It matters for INT8:
    onnxruntime fuses DequantizeLinear -> MatMul into one integer kernel, but has no such kernel for
    a Gemm whose output is not quantized, so a Q/DQ Gemm dequantized its weights at every call
    (ViT-GPT2's INT8 cross-attention K/V ran slower than float: 63 vs 31 ms). A Gemm that reads
    its weight transposed (a tied LM head that shares the embedding table) is left alone."""
    from onnx import helper

    inits = {i.name for i in graph.initializer}
    nodes, done = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (node.op_type == "Gemm" and attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 0
                 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)
        if not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        out = node.output[0]
        biased = len(node.input) > 2 and node.input[2]
        product = f"{node.name or out}_matmul" if biased else out
        nodes.append(helper.make_node("MatMul", list(node.input[:2]), [product], name=node.name))
        if biased:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [out], name=f"{node.name}_bias"))
        done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return done
