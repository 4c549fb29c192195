"""Graph clean-ups after tracing: fewer tiny shape ops in every step of a decoder, and GPT-2's
Gemms as MatMuls.

The tracer turns `x.view(x.shape[0], x.shape[1], heads, head_dim)` into Shape -> Gather ->
Unsqueeze (twice) -> Concat -> Reshape, computed anew at every call. ONNX's Reshape already has a
way to say "keep this dimension of the input": 0 (with `allowzero` unset). Where each entry of a
Reshape's shape is either a constant or the input's OWN dimension at the same position, the shape
becomes one constant, ([0, 0, 8, 96] for the view above), and the nodes that computed it are dropped
once nothing else reads them. On BLIP-base's decoder this removed 36 such chains and ~470 nodes;
a decode step ran ~10% faster under onnxruntime (interleaved A/B). TensorRT reads 0 the same way.

Also here, torch-free like the rest (calibration on a Jetson writes graphs too): `io_specs`, a
graph file's interface as manifest entries.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _attr(node, name: str, default=0):
    return next((a.i for a in node.attribute if a.name == name), default)


def readers_of(graph) -> dict[str, list]:
    """Each tensor name -> the nodes that read it, in graph order (a node reading a tensor twice is
    listed twice)."""
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def initializer_behind(name: str, inits, producer: dict) -> str | None:
    """The initializer `name` is, through any Identity nodes (how the exporter shares equal
    constants: a random-weight model's zero biases all read one), else None."""
    while name not in inits:
        node = producer.get(name)
        if node is None or node.op_type != "Identity":
            return None
        name = node.input[0]
    return name


class _Graph:
    def __init__(self, graph):
        from onnx import numpy_helper

        self.to_array = numpy_helper.to_array
        self.producer = {o: n for n in graph.node for o in n.output}
        self.inits = {i.name: i for i in graph.initializer}

    def initializer(self, name: str) -> str | None:
        return initializer_behind(name, self.inits, self.producer)

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
    for tensor in [t for t in graph.initializer if t.name not in needed]:
        graph.initializer.remove(tensor)  # in place: rebuilding the list would copy every weight held
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


def ranks(model) -> dict[str, int]:
    """Rank of every tensor of `model` that ONNX shape inference can tell (`shapes`)."""
    return {name: len(dims) for name, dims in shapes(model).items()}


def shapes(model) -> dict[str, list[int | None]]:
    """Shape of every tensor of `model` that ONNX shape inference can tell, inputs and initializers
    included, each dim an int where it is static and None where not. Inference runs on a copy that
    holds no weights (the initializers as typed inputs)."""
    from onnx import helper, shape_inference

    graph = model.graph
    declared = {v.name for v in graph.input}
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
               for t in graph.initializer if t.name not in declared]
    light = helper.make_model(helper.make_graph(list(graph.node), "ranks", list(graph.input) + weights,
                                                list(graph.output)),
                              opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        inferred = shape_inference.infer_shapes(light).graph
    except shape_inference.InferenceError:  # a clean-up that cannot read shapes does nothing
        return {}
    out = {}
    for value in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        kind = value.type.tensor_type
        if kind.HasField("shape"):
            out[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim]
    return out


class _Dims:
    """Shape arithmetic read symbolically: what a small int64 tensor built from Shape, Gather, Slice,
    Squeeze, Unsqueeze, Concat and constants holds, each entry an int or ("dim", tensor, axis).
    `shapes`: what ONNX shape inference tells of the graph's tensors (`shapes()`)."""

    def __init__(self, g: _Graph, shapes: dict[str, list[int | None]]):
        self.g, self.shapes = g, shapes
        self.rank = {name: len(dims) for name, dims in shapes.items()}

    def of(self, name: str) -> tuple[list, bool] | None:
        """(entries, is_scalar) of tensor `name`, or None when it is not such arithmetic."""
        value = self.g.constant(name)
        if value is not None:
            return ([int(v) for v in value.ravel()], value.ndim == 0) if value.ndim <= 1 else None
        node = self.g.producer.get(name)
        if node is None:
            return None
        op, ins = node.op_type, node.input
        if op == "Shape":
            r = self.rank.get(ins[0])
            if r is None or node.attribute:
                return None
            return [("dim", ins[0], i) for i in range(r)], False
        if op in ("Gather", "Slice", "Squeeze", "Unsqueeze") and ins:
            data = self.of(ins[0])
            if data is None:
                return None
            entries, scalar = data
            if op == "Gather":
                index = self.g.constant(ins[1])
                if _attr(node, "axis") != 0 or scalar or index is None or index.ndim > 1:
                    return None
                picked = [entries[int(i)] for i in index.ravel()]
                return picked, index.ndim == 0
            if op == "Slice":
                parts = [self.g.constant(i) if i else None for i in list(ins[1:]) + [""] * (5 - len(ins))]
                starts, ends, axes, steps = parts[:4]
                if starts is None or ends is None or scalar or (axes is not None and axes.ravel().tolist() != [0]) \
                        or (steps is not None and steps.ravel().tolist() != [1]):
                    return None
                start, end = int(starts.ravel()[0]), int(ends.ravel()[0])
                return entries[slice(start, min(end, len(entries)))], False
            axes = self.g.constant(ins[1]) if len(ins) > 1 and ins[1] else None
            if axes is None or axes.ravel().tolist() != [0]:
                return None
            if op == "Squeeze":
                return (entries, True) if not scalar and len(entries) == 1 else None
            return (entries, False) if scalar else None
        if op == "Concat" and _attr(node, "axis") == 0:
            out = []
            for part in ins:
                got = self.of(part)
                if got is None or got[1]:
                    return None
                out += got[0]
            return out, False
        return None


def unflatten_matmuls(model) -> int:
    """Let the products GPT-2's Conv1D layers trace to read their 3-D input as it is; returns how
    many.

    Conv1D computes `addmm(b, x.view(-1, K), W).view(*x.shape[:-1], N)`, so each of its 72 layers
    brings a flattening Reshape, a Reshape back and 13 shape kernels (Shape, Gather, Slice, Squeeze,
    Unsqueeze, Concat) that run at every decode step: 1,457 kernels a step for ViT-GPT2's decoder,
    against 692 for BLIP's. MatMul already treats the leading dims of its first input as rows, so
    `MatMul(x, W) [+ b]` gives the same numbers in the same shape: the two Reshapes go, and the shape
    arithmetic with them once nothing else reads it (`drop_dead_nodes`). Matched on what the shapes
    hold (`_Dims`), not on how the tracer spelt them."""
    graph = model.graph
    g = _Graph(graph)
    dims = _Dims(g, shapes(model))
    readers = readers_of(graph)
    drop, done = set(), 0
    for matmul in graph.node:
        if matmul.op_type != "MatMul" or matmul.input[1] not in g.inits:
            continue
        weight = g.inits[matmul.input[1]].dims
        flat = g.producer.get(matmul.input[0])
        if len(weight) != 2 or flat is None or flat.op_type != "Reshape" or _attr(flat, "allowzero"):
            continue
        x = flat.input[0]
        r = dims.rank.get(x)
        shape = dims.of(flat.input[1])
        if r is None or r < 3 or shape is None or shape[0] not in ([-1, ("dim", x, r - 1)], [-1, weight[0]]):
            continue
        last = matmul
        after = readers.get(matmul.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add":
            add = after[0]
            bias = g.initializer(add.input[1] if add.input[0] == matmul.output[0] else add.input[0])
            if bias is not None and list(g.inits[bias].dims) in ([weight[1]], [1, weight[1]]):
                last = add
        back = readers.get(last.output[0], [])
        if len(back) != 1 or back[0].op_type != "Reshape" or _attr(back[0], "allowzero"):
            continue
        back = back[0]
        target = dims.of(back.input[1])
        lead = [("dim", x, i) for i in range(r - 1)]
        if target is None or target[0] not in (lead + [weight[1]], lead + [-1]):
            continue
        matmul.input[0] = x
        last.output[0] = back.output[0]
        drop.add(id(back))
        done += 1
    if done:
        remove_nodes(graph, drop)
        drop_dead_nodes(graph)
    return done


def remove_nodes(graph, gone: set[int]) -> None:
    """Take the nodes whose id() is in `gone` out of `graph`, the others keeping their order."""
    kept = [n for n in graph.node if id(n) not in gone]
    del graph.node[:]
    graph.node.extend(kept)


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


class _Attention:
    """One traced self-attention, softmax(q k^T * scale) v, matched around its Softmax."""

    def __init__(self, g: _Graph, readers: dict, softmax, dims: _Dims | None = None):
        self.ok, self.dims = False, dims
        if softmax.op_type != "Softmax" or _attr(softmax, "axis", -1) not in (-1, 3):
            return
        scaled = g.producer.get(softmax.input[0])
        self.scale, scores = 1.0, scaled
        if scaled is not None and scaled.op_type in ("Mul", "Div"):
            value = g.constant(scaled.input[1])
            if value is None or value.size != 1:
                return
            value = float(np.ravel(value)[0])
            self.scale = value if scaled.op_type == "Mul" else 1.0 / value
            scores = g.producer.get(scaled.input[0])
        probs = softmax.output[0]
        while len(readers.get(probs, [])) == 1 and readers[probs][0].op_type == "Cast" and \
                _attr(readers[probs][0], "to") == 1:  # float to float (eager attention's softmax dtype)
            probs = readers[probs][0].output[0]
        if scores is None or scores.op_type != "MatMul" or len(readers.get(probs, [])) != 1:
            return
        pv = readers[probs][0]
        after = readers.get(pv.output[0], [])
        if pv.op_type != "MatMul" or pv.input[0] != probs or len(after) != 1:
            return
        merge = after[0]
        last = readers.get(merge.output[0], [])
        if merge.op_type != "Transpose" or _perm(merge) != [0, 2, 1, 3] or len(last) != 1 or \
                last[0].op_type != "Reshape":
            return
        self.output = last[0].output[0]  # (B, S, D): what the fused op writes
        shape = g.constant(last[0].input[1])
        self.width = int(shape[-1]) if shape is not None and shape.size == 3 and shape[-1] > 0 else None
        self.qkv = self._sources(g, scores.input[0], scores.input[1], pv.input[1])
        self.ok = self.qkv is not None

    def _sources(self, g: _Graph, q: str, k_t: str, v: str):
        """(q, k, v as (B, S, D) tensors or one packed (B, S, 3D) tensor, heads), or None."""
        packed = self._packed(g, q, k_t, v)
        if packed is not None:
            return packed
        heads = [self._split(g, name, key, self.dims) for name, key in ((q, False), (k_t, True), (v, False))]
        if any(h is None for h in heads) or len({h[1] for h in heads}) != 1:
            return None
        return [h[0] for h in heads], heads[0][1]

    @staticmethod
    def _split(g: _Graph, name: str, key: bool, dims: _Dims | None = None):
        """(X, heads) where `name` = Transpose(Reshape(X, [.., .., heads, hd]), perm (0, 2, 1, 3)); the
        key, transposed for the product, has perm (0, 2, 3, 1), or a (0, 1, 3, 2) Transpose after the
        (0, 2, 1, 3) one (`k.transpose(-1, -2)`). With `dims`, also a shape computed at run time whose heads and hd entries are constants, heads possibly -1 (then X's
        static width over hd: Hugging Face's `view(*input_shape, -1, head_dim)`)."""
        node, perm = g.producer.get(name), [0, 2, 1, 3]
        if key and node is not None and node.op_type == "Transpose":
            if _perm(node) == [0, 1, 3, 2]:
                node = g.producer.get(node.input[0])
            else:
                perm = [0, 2, 3, 1]
        if node is None or node.op_type != "Transpose" or _perm(node) != perm:
            return None
        reshape = g.producer.get(node.input[0])
        if reshape is None or reshape.op_type != "Reshape":
            return None
        shape = g.constant(reshape.input[1])
        if shape is None and dims is not None:
            got = dims.of(reshape.input[1])
            if got is not None and not got[1] and len(got[0]) == 4 and all(isinstance(e, int) for e in got[0][2:]):
                shape = np.array([0, 0, *got[0][2:]])
        if shape is None or shape.size != 4:
            return None
        width = ((dims.shapes.get(reshape.input[0]) if dims else None) or [None])[-1]
        heads, hd = int(shape[2]), int(shape[3])
        if heads == -1 and hd > 0 and width and width % hd == 0:
            heads = width // hd
        return (reshape.input[0], heads) if heads > 0 else None

    @staticmethod
    def _packed(g: _Graph, q: str, k_t: str, v: str):
        """BLIP's packed projection: X (B, S, 3D) -> Reshape (B, S, 3, H, hd) -> Transpose (2, 0, 3, 1, 4),
        then q, k, v = its [0], [1], [2] (k transposed for the product)."""
        k_node = g.producer.get(k_t)
        if k_node is None or k_node.op_type != "Transpose" or _perm(k_node) != [0, 1, 3, 2]:
            return None
        picks = [g.producer.get(n) for n in (q, k_node.input[0], v)]
        if any(p is None or p.op_type != "Gather" or _attr(p, "axis") != 0 for p in picks):
            return None
        index = [g.constant(p.input[1]) for p in picks]
        if any(i is None or i.ndim != 0 for i in index) or [int(i) for i in index] != [0, 1, 2] or \
                len({p.input[0] for p in picks}) != 1:
            return None
        split = g.producer.get(picks[0].input[0])
        if split is None or split.op_type != "Transpose" or _perm(split) != [2, 0, 3, 1, 4]:
            return None
        reshape = g.producer.get(split.input[0])
        if reshape is None or reshape.op_type != "Reshape":
            return None
        shape = g.constant(reshape.input[1])
        if shape is None:  # a computed shape: its third and fourth entries must still be constants
            concat = g.producer.get(reshape.input[1])
            if concat is None or concat.op_type != "Concat" or len(concat.input) != 5:
                return None
            shape = [g.constant(concat.input[2]), g.constant(concat.input[3])]
            if any(s is None or s.size != 1 for s in shape):
                return None
            three, heads = (int(np.ravel(s)[0]) for s in shape)
        else:
            if shape.size != 5:
                return None
            three, heads = int(shape[2]), int(shape[3])
        if three != 3 or heads <= 0:
            return None
        return reshape.input[0], heads


def fuse_attention(model) -> int:
    """Replace each traced self-attention without a mask (Softmax(MatMul(q, k^T) * scale) times v,
    heads split and merged by Reshape/Transpose) in `model` (a ModelProto) by onnxruntime's
    com.microsoft MultiHeadAttention over the (B, S, D) projections; returns how many. BLIP's
    packed QKV projection is split in three first. Hugging Face's eager attention (ViT, CLIP: a
    float-to-float Cast after the Softmax, head shapes computed from the input's dims with -1 heads)
    is matched too. For onnxruntime variants only (TensorRT does not parse com.microsoft ops).

    The fused kernel runs the heads in parallel with the softmax in place, and does away with the
    Gathers and Transposes that picked q, k, v out of a packed projection. Other attention shapes
    (masked, cached, cross) are left as they are."""
    from onnx import helper, numpy_helper

    graph = model.graph
    g = _Graph(graph)
    readers = readers_of(graph)
    dims = _Dims(g, shapes(model) if any(n.op_type == "Softmax" for n in graph.node) else {})
    replace: dict[str, list] = {}  # output name -> the nodes that now write it
    for softmax in graph.node:
        match = _Attention(g, readers, softmax, dims) if softmax.op_type == "Softmax" else None
        if match is None or not match.ok:
            continue
        sources, heads = match.qkv
        tag = f"fused_attention_{len(replace)}"
        nodes = []
        if isinstance(sources, str):  # packed (B, S, 3D): three equal parts of the last axis
            if match.width is None:
                continue
            sizes = f"{tag}_split"
            graph.initializer.append(numpy_helper.from_array(np.array([match.width] * 3, np.int64), sizes))
            parts = [f"{tag}_{part}" for part in ("q", "k", "v")]
            nodes.append(helper.make_node("Split", [sources, sizes], parts, axis=-1, name=f"{tag}_split"))
            sources = parts
        nodes.append(helper.make_node("MultiHeadAttention", sources, [match.output], domain="com.microsoft",
                                      num_heads=heads, scale=match.scale, name=tag))
        replace[match.output] = nodes
    if not replace:
        return 0
    out = []
    for node in graph.node:  # each in the place of the Reshape that wrote the attention's output
        written = [o for o in node.output if o in replace]
        out.extend(replace[written[0]] if written else [node])
    del graph.node[:]
    graph.node.extend(out)
    drop_dead_nodes(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replace)


def share_tied_head(graph) -> int:
    """Keep a tied LM head from holding the embedding table twice in memory; returns how many heads.

    onnxruntime prepacks a Gemm's constant weight into a copy of its own, while the embedding's
    Gather reads the table as stored: a tied head held the table twice (BLIP-base's decoder
    session: 625 against 535 MB). Fed through a Reshape to (-1, width), the width read off the
    Gemm's input at run time, the weight is no longer a constant, and the product packs it block by
    block from the one stored table (30524x768: 3.36 -> 3.46 ms a call; logits within 1 ulp, another
    summation order). `tied_head_weight` finds the table behind it again (calibration reads
    weights as initializers)."""
    from onnx import helper, numpy_helper

    inits = {i.name for i in graph.initializer}
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits}
    heads = [n for n in graph.node if n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] in gathered
             and _attr(n, "transB") == 1]
    if not heads:
        return 0
    constants = {"tied_head_start": 1, "tied_head_end": 2, "tied_head_rows": -1}
    for name, value in constants.items():
        if name not in inits:
            graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    out, done = [], 0
    for node in graph.node:
        if any(node is h for h in heads):
            tag = f"tied_head_{done}"
            done += 1
            out += [helper.make_node("Shape", [node.input[0]], [f"{tag}_input_shape"], name=f"{tag}_shape"),
                    helper.make_node("Slice", [f"{tag}_input_shape", "tied_head_start", "tied_head_end"],
                                     [f"{tag}_width"], name=f"{tag}_width"),
                    helper.make_node("Concat", ["tied_head_rows", f"{tag}_width"], [f"{tag}_weight_shape"], axis=0,
                                     name=f"{tag}_weight_shape"),
                    helper.make_node("Reshape", [node.input[1], f"{tag}_weight_shape"], [f"{tag}_weight"],
                                     name=f"{tag}_weight")]
            node.input[1] = f"{tag}_weight"
        out.append(node)
    del graph.node[:]
    graph.node.extend(out)
    return len(heads)


def tied_head_weight(graph) -> int:
    """Undo `share_tied_head`: each head Gemm reads the embedding table directly again, and the
    nodes that fed it go; returns how many. For code that finds layers by their weight initializer."""
    g = _Graph(graph)
    undone = 0
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2:
            continue
        reshape = g.producer.get(node.input[1])
        if reshape is None or reshape.op_type != "Reshape" or reshape.input[0] not in g.inits:
            continue
        concat = g.producer.get(reshape.input[1])
        width = g.producer.get(concat.input[1]) if concat is not None and concat.op_type == "Concat" else None
        shape = g.producer.get(width.input[0]) if width is not None and width.op_type == "Slice" else None
        if shape is None or shape.op_type != "Shape" or shape.input[0] != node.input[0]:
            continue
        node.input[1] = reshape.input[0]
        undone += 1
    if undone:
        drop_dead_nodes(graph)
    return undone


PREPACKED_HEAD = "_prepacked_head"  # suffix of the head's own name for the embedding table's bytes


def prepack_tied_head(graph) -> int:
    """For onnxruntime's CPU provider: let a tied LM head be prepacked without the table being held
    twice; returns how many heads. `share_tied_head` feeds the head its table through a Reshape, so
    the product packs the whole table again at every call (BLIP-base's FP32 step: ~2.3 ms of 24).
    Here the head reads a constant initializer of its own that names the very bytes of the
    embedding table in the external data file (location, offset and length alike: nothing more on
    disk). onnxruntime maps external data from the file; it prepacks the head's copy once and lets
    the mapping go, while the embedding's Gather keeps reading the mapped table, of which only the
    rows looked up stay resident: the same steady memory as before (a BLIP-base captioning process:
    1,040 MB of RSS either way; +40 MB at the peak, while the sessions are created). A table stored
    inside the .onnx file is left alone (its bytes would be written twice)."""
    from onnx import TensorProto

    g = _Graph(graph)
    external = [r.input[0] for r in (g.producer.get(n.input[1]) for n in graph.node if n.op_type == "Gemm"
                                     and len(n.input) > 1)
                if r is not None and r.op_type == "Reshape" and r.input[0] in g.inits
                and g.inits[r.input[0]].data_location == TensorProto.EXTERNAL]
    if not external or not tied_head_weight(graph):
        return 0
    done = 0
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in external:
            continue
        table = g.inits[node.input[1]]
        name = table.name + PREPACKED_HEAD
        if name not in g.inits:
            alias = TensorProto(name=name, data_type=table.data_type, dims=table.dims,
                                data_location=TensorProto.EXTERNAL)
            alias.external_data.extend(table.external_data)
            graph.initializer.append(alias)
            g.inits[name] = alias
        node.input[1] = name
        done += 1
    share_tied_head(graph)  # any head whose table is stored in the .onnx file: back through the Reshape
    return done


_ONNX_DTYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 3: "int8",
                2: "uint8", 9: "bool"}


def io_specs(path: Path) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of an ONNX file as manifest entries: name, dtype, shape (ints or names)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> dict:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return {"name": value.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": dims}

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]
