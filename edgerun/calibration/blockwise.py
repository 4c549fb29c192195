"""The onnxruntime CPU variant of a decoder with block-wise INT8 weights (MatMulNBits).

A decode step multiplies a few rows by every weight matrix, so it costs what reading the weights
costs. onnxruntime's `MatMulNBits` (com.microsoft) keeps 8-bit weights in blocks of `block` values
along the input axis, one scale per block, and at `accuracy_level` 4 multiplies them with int8
activations quantized per block on the fly; on this project's 2-core test machine it streamed the
decoder's shapes faster than DynamicQuantizeLinear + MatMulInteger (768x3072: 16.4 vs 15.3 GB/s,
3072x768: 22.0 vs 17.6, 768x768: 12.3 vs 11.5; a 30524x768 LM head in 0.59 vs 0.95 ms), and block
scales follow the weights more closely than one scale per output channel.

Layouts: a MatMul weight W (K, N) becomes B (N, k_blocks, block) uint8, value + 128 (the op's
default zero point for 8 bits), and scales (N, k_blocks). A tied LM head (`x @ E.T + c`, E the token
embedding (V, K)) is the same with N = V, and the embedding Gathers read the SAME uint8 table with
`GatherBlockQuantized` (rows by id, dequantized per block), so the table is stored once:

    ids -> GatherBlockQuantized(B, ids, scales[..., None]) -> (*ids, k_blocks, block)
        -> Reshape (*ids, k_blocks * block) [-> Slice to K when K is not a multiple of block]

These are onnxruntime contrib ops (8-bit GatherBlockQuantized since onnxruntime 1.23): the variant
records that requirement, and the runtime refuses an older onnxruntime with the fix rather than
failing inside it. TensorRT never reads this variant.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..export.simplify import initializer_behind, readers_of, remove_nodes
from .decoder import _ranks, apply_rewrite, rewritable
from .nodes import Target, attr
from .qdq import opset

MIN_ONNXRUNTIME = "1.23"  # 8-bit GatherBlockQuantized (the tied embedding)
BLOCKS = (256, 128, 64, 32, 16)  # MatMulNBits block sizes, largest first
ACCURACY_LEVEL = 4  # int8 activations, per block


def supported(version: str | None = None) -> bool:
    """Whether onnxruntime `version` (default: the installed one) runs this variant."""
    from ..runtime.variants import at_least

    if version is None:
        import onnxruntime

        version = onnxruntime.__version__
    return at_least(version, MIN_ONNXRUNTIME)


def decoder_scheme(requested: str) -> str:
    """`auto` -> blockwise where the installed onnxruntime runs it on an x86-64 CPU (where it was
    measured faster; onnxruntime's 8-bit kernels for ARM were not measured), else dynamic."""
    import platform

    if requested != "auto":
        return requested
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "blockwise" if supported() and x86 else "dynamic"


def block_size(k: int) -> int:
    """The largest supported block that divides `k` (no padding), else the smallest (padded)."""
    return next((b for b in BLOCKS if k % b == 0), BLOCKS[-1])


def quantize_blocks(w_rows: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w_rows (N, K) float -> (q (N, k_blocks, block) uint8 with zero point 128, scales (N, k_blocks)).
    Symmetric per block: q - 128 in [-127, 127]; a block of zeros gets scale 1."""
    n, k = w_rows.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = w_rows
    padded = padded.reshape(n, blocks, block)
    amax = np.abs(padded).max(axis=2)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(padded / scales[..., None]), -127, 127) + 128
    return q.astype(np.uint8), scales


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The float rows (N, K) that `quantize_blocks` stands for."""
    w = (q.astype(np.float32) - 128.0) * scales[..., None]
    return w.reshape(q.shape[0], -1)[:, :k]


class _Rewriter:
    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.ranks = _ranks(graph)
        self.inits = {i.name: i for i in graph.initializer}
        self.to_array, self.from_array = numpy_helper.to_array, numpy_helper.from_array
        self.tables: dict[str, tuple[str, str, int, int, int]] = {}  # weight -> (B, scales, K, N, block)
        self.scales: dict[str, np.ndarray] = {}  # scales initializer -> its values (N, k_blocks)

    def table(self, t: Target) -> tuple[str, str, int, int, int]:
        if t.weight not in self.tables:
            w = self.to_array(self.inits[t.weight]).astype(np.float32)
            rows = w if t.op == "Gemm" and t.axis == 0 else w.T  # Gemm with transB: (N, K); else (K, N)
            n, k = rows.shape
            block = block_size(k)
            q, scales = quantize_blocks(rows, block)
            names = (f"{t.weight}_q8", f"{t.weight}_q8_scales")
            self.graph.initializer.extend([self.from_array(q, names[0]), self.from_array(scales, names[1])])
            self.scales[names[1]] = scales
            self.tables[t.weight] = (*names, k, n, block)
        return self.tables[t.weight]

    def layer(self, node, t: Target) -> list:
        from onnx import helper

        b, scales, k, n, block = self.table(t)
        out = node.output[0]
        biased = t.op == "Gemm" and len(node.input) > 2
        product = f"{t.node}_nbits" if biased else out
        nodes = [helper.make_node("MatMulNBits", [t.activation, b, scales], [product], name=f"{t.node}_nbits",
                                  domain="com.microsoft", K=k, N=n, bits=8, block_size=block,
                                  accuracy_level=ACCURACY_LEVEL)]
        if biased:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [out], name=f"{t.node}_bias"))
        return nodes

    def embedding(self, node) -> list:
        """A Gather of rows of a tied weight: the same uint8 table, dequantized block by block."""
        from onnx import helper

        b, scales, k, _, block = self.tables[node.input[0]]
        ids, out, base = node.input[1], node.output[0], node.name
        gather_scales = f"{scales}_gather"
        if gather_scales not in self.scales:  # GatherBlockQuantized wants the scales at data's rank
            self.scales[gather_scales] = self.scales[scales][..., None]
            self.graph.initializer.append(self.from_array(self.scales[gather_scales], gather_scales))
        rank = self.ranks.get(ids, 2)
        width = -(-k // block) * block
        shape = self._const(f"{base}_shape", [0] * rank + [width])
        flat = out if width == k else f"{base}_padded"
        nodes = [helper.make_node("GatherBlockQuantized", [b, ids, gather_scales], [f"{base}_blocks"],
                                  name=f"{base}_q8", domain="com.microsoft", gather_axis=0, quantize_axis=2,
                                  block_size=block, bits=8),
                 helper.make_node("Reshape", [f"{base}_blocks", shape], [flat], name=f"{base}_rows")]
        if width != k:
            starts, ends, axes = (self._const(f"{base}_{s}", [v]) for s, v in
                                  (("start", 0), ("end", k), ("axis", rank)))
            nodes.append(helper.make_node("Slice", [flat, starts, ends, axes], [out], name=f"{base}_unpad"))
        return nodes

    def _const(self, name: str, values: list[int]) -> str:
        self.graph.initializer.append(self.from_array(np.array(values, np.int64), name))
        return name


def quantize_blockwise_weights(model, targets: Sequence[Target]) -> int:
    """Rewrite the linear `targets` of `model` (an onnx ModelProto, weights loaded) in place as
    MatMulNBits with 8-bit block-wise weights, a tied embedding as GatherBlockQuantized on the same
    table; returns how many layers were rewritten. Targets this cannot express stay float."""
    from onnx import helper

    graph = model.graph
    chosen = {t.node: t for t in rewritable(graph, targets)}
    rw = _Rewriter(graph)
    for t in chosen.values():  # tables first: a tied embedding is read before its head
        rw.table(t)
    apply_rewrite(graph, chosen, rw)
    fold_biases(model)
    merge_parallel(model)
    if chosen and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(chosen)


def fold_biases(model) -> int:
    """Give each MatMulNBits whose only reader adds a constant vector of its width that vector as the
    op's bias input, and drop the Add; returns how many were folded.

    A decode step runs some 600 small kernels beside its products, each with a fixed cost: BLIP-base's
    INT8 decoder has 98 such Adds, and without them a step took 10.44 instead of 11.05 ms (12
    captions alternating, 2-core x86 test machine). onnxruntime adds the bias inside its kernel:
    the sums are the same up to an ulp (0 to 7e-9 on BLIP-base's first layer), which int8
    activations quantized per block in the layers after can turn into a different code now and
    then, as any other equivalent graph could; calibrate's accuracy report measures the result."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    reads = readers_of(graph)
    outputs = {o.name for o in graph.output}
    dropped, folded = set(), 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) != 3 or node.output[0] in outputs:
            continue
        users = reads.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        bias = None if bias == node.output[0] else initializer_behind(bias, inits, producer)
        if bias is None:
            continue
        init = inits[bias]
        if init.data_type != 1 or list(init.dims) != [attr(node, "N")]:  # float32 (N,) only: no broadcast
            continue
        node.input.extend(["", "", bias])  # zero_points and g_idx absent
        node.output[0] = add.output[0]
        dropped.add(id(add))
        folded += 1
    if folded:
        remove_nodes(graph, dropped)
    return folded


def _nbits_key(node) -> tuple | None:
    """What MatMulNBits nodes must share to be one product: the input, every attribute but N, and
    whether they add a bias (only that optional input: no zero points, no group index)."""
    if node.op_type != "MatMulNBits" or len(node.input) not in (3, 6) or any(node.input[3:5]):
        return None
    return (node.input[0], len(node.input) == 6,
            *(attr(node, k) for k in ("K", "bits", "block_size", "accuracy_level")))


def merge_parallel(model) -> int:
    """Merge MatMulNBits products of the same input (a self-attention's query, key and value) into
    one, its output split back into the original tensors; returns how many products were removed.

    A decode step multiplies three rows by each table, and onnxruntime's 8-bit kernel spends a
    fixed cost per call: BLIP-base's three 768x768 projections of a layer ran in 1.24 ms as 36
    calls and 1.00 ms as 12 calls of 768x2304 (interleaved, 40 rounds; 2-core x86 test machine).
    The tables are concatenated along N, so every output column is the same product as before.
    Only tables read by nothing else are merged (a tied table stays one copy); a bias may be shared
    (its values are copied into the merged bias)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    count = {name: len(nodes) for name, nodes in readers_of(graph).items()}
    groups: dict[tuple, list] = {}
    for node in graph.node:
        key = _nbits_key(node)
        if key is not None and count.get(node.input[1]) == 1 and count.get(node.input[2]) == 1:
            groups.setdefault(key, []).append(node)
    groups = {k: g for k, g in groups.items() if len(g) > 1}
    if not groups:
        return 0
    inits = {i.name: i for i in graph.initializer}
    first = {id(g[0]): g for g in groups.values()}
    merged = {id(n) for g in groups.values() for n in g}
    nodes, removed = [], 0
    for node in graph.node:
        group = first.get(id(node))
        if group is None:
            if id(node) not in merged:
                nodes.append(node)
            continue
        widths = [attr(n, "N") for n in group]
        base = group[0].name
        names = [f"{base}_merged_q8", f"{base}_merged_q8_scales", "", "", f"{base}_merged_bias"]
        for i, name in enumerate(names[: len(group[0].input) - 1], start=1):
            if name:  # tables, scales (and biases) concatenated along N, in the group's order
                parts = [numpy_helper.to_array(inits[n.input[i]]) for n in group]
                graph.initializer.append(numpy_helper.from_array(np.concatenate(parts), name))
        for n in group:
            for name in n.input[1:]:
                if name:
                    count[name] -= 1
                    if count[name] == 0:  # a bias shared with other nodes stays for them
                        graph.initializer.remove(inits.pop(name))
        attrs = {a.name: helper.get_attribute_value(a) for a in group[0].attribute}
        attrs["N"] = sum(widths)
        product = f"{base}_merged"
        nodes.append(helper.make_node("MatMulNBits", [group[0].input[0], *names[: len(group[0].input) - 1]],
                                      [product], name=base + "_merged", domain="com.microsoft", **attrs))
        outputs = [n.output[0] for n in group]
        if opset(model) >= 13:
            split = f"{base}_merged_widths"
            graph.initializer.append(numpy_helper.from_array(np.array(widths, np.int64), split))
            nodes.append(helper.make_node("Split", [product, split], outputs, name=base + "_split", axis=-1))
        else:
            nodes.append(helper.make_node("Split", [product], outputs, name=base + "_split", axis=-1, split=widths))
        removed += len(group) - 1
    del graph.node[:]
    graph.node.extend(nodes)
    return removed
