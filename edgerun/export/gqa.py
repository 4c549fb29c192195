"""A decoder's self-attention as onnxruntime's GroupQueryAttention, for its CPU provider.

The decoders edge-run traces (`cached_attention`, edgerun/models/families/layers.py) read one
time-major cache (past, layer, row, head, dim) and return each step's new K/V as outputs, which the
runtime stores. Per layer that is a Split, three Reshape/Transpose pairs, four products, the
scores' Concat, scale, mask and Softmax, two Slices, an Add and the way back to (rows, new, width),
plus the shape arithmetic and the stacking of the new K/V: ~20 small kernels a layer, each costing
a few microseconds on a 2-core CPU whatever it does.

`com.microsoft.GroupQueryAttention` does all of it in one kernel per layer, and writes the new K/V
into the cache itself when its past and present are one buffer (the runtime binds them so; see
edgerun.runtime.kvcache.GqaDecoderInference). The rewritten graph's interface:

- inputs: input_ids (rows, new); `seqlens_k` (rows,) int32, the total length minus one;
  `total_sequence_length` () int32, past + new; past_key_L / past_value_L (rows, heads, capacity,
  head_dim) for each layer L, the cache buffers; the cross K/V as before;
- outputs: logits; present_key_L / present_value_L, the same buffers.

It is onnxruntime-only (TensorRT cannot parse com.microsoft ops), so it is made for a CPU variant
only. `gqa_decoder` matches the traced pattern exactly and changes nothing unless every layer
matches; `check_gqa_decoder` compares the two graphs on random inputs before a bundle keeps it.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from ..runtime.kvcache import GQA_STEP_INPUTS, gqa_cache_names
from .simplify import _attr, _Graph, _perm, drop_dead_nodes, readers_of

NEG_FILL = -1e4  # a masked score at or below this is as good as -inf after the softmax
CACHE_TYPE = "gqa"  # the manifest's cache type of a rewritten decoder (edgerun.runtime.kvcache)
CACHE_LAYOUT = "per layer: row,head,time,dim"
TOLERANCE = 1e-4  # a decoder and its rewrite, relative to the logits: rounding differences only


@dataclass
class _Layer:
    query: str
    key: str
    value: str
    output: str
    scale: float
    anchor: object  # the node the GroupQueryAttention takes the place of (the output's Reshape)


class _Matcher:
    def __init__(self, graph, heads: int, head_dim: int):
        self.graph, self.heads, self.head_dim = graph, heads, head_dim
        self.g = _Graph(graph)
        self.readers = readers_of(graph)

    def only_reader(self, name: str, op: str):
        nodes = self.readers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None

    def producer(self, name: str, op: str):
        node = self.g.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def scalar(self, name: str) -> float | None:
        value = self.g.constant(name)
        return float(value) if value is not None and value.size == 1 else None

    def split_heads(self, name: str, perm: list[int]) -> str | None:
        """`name` = Transpose(Reshape(x, (.., heads, head_dim)), perm): x (rows, new, width), else None."""
        transpose = self.producer(name, "Transpose")
        if transpose is None or _perm(transpose) != perm:
            return None
        return self.unheaded(transpose.input[0])

    def unheaded(self, name: str) -> str | None:
        """`name` = Reshape(x, (.., heads, head_dim)): x, else None."""
        reshape = self.producer(name, "Reshape")
        shape = None if reshape is None else self.g.constant(reshape.input[1])
        if shape is None or shape.ndim != 1 or len(shape) != 4:
            return None
        if list(shape[2:]) not in ([self.heads, self.head_dim], [self.heads, -1], [-1, self.head_dim]):
            return None
        return reshape.input[0]

    def layer(self, gather_k, gather_v) -> _Layer | None:
        t_k = self.only_reader(gather_k.output[0], "Transpose")
        t_v = self.only_reader(gather_v.output[0], "Transpose")
        if t_k is None or t_v is None or _perm(t_k) != [1, 2, 3, 0] or _perm(t_v) != [1, 2, 0, 3]:
            return None
        m_past = self.only_reader(t_k.output[0], "MatMul")
        concat = m_past is not None and self.only_reader(m_past.output[0], "Concat")
        if not concat or list(concat.input)[:1] != [m_past.output[0]] or len(concat.input) != 2 \
                or _attr(concat, "axis") not in (-1, 3):
            return None
        q = m_past.input[0]
        m_new = self.producer(concat.input[1], "MatMul")
        if m_new is None or m_new.input[0] != q:
            return None
        t_new_k = self.producer(m_new.input[1], "Transpose")
        if t_new_k is None or _perm(t_new_k) != [0, 2, 3, 1]:
            return None
        key = self.unheaded(t_new_k.input[0])
        query = self.split_heads(q, [0, 2, 1, 3])
        scaled = self.readers.get(concat.output[0], [])
        if len(scaled) != 1 or scaled[0].op_type not in ("Mul", "Div") or scaled[0].input[0] != concat.output[0]:
            return None
        factor = self.scalar(scaled[0].input[1])
        if factor is None or factor == 0:
            return None
        scale = factor if scaled[0].op_type == "Mul" else 1.0 / factor
        where = self.only_reader(scaled[0].output[0], "Where")
        if where is None or where.input[2] != scaled[0].output[0] or not self.shape_only(where.input[0]):
            return None
        fill = self.scalar(where.input[1])
        softmax = self.only_reader(where.output[0], "Softmax")
        if fill is None or fill > NEG_FILL or softmax is None or _attr(softmax, "axis", -1) not in (-1, 3):
            return None
        slices = self.readers.get(softmax.output[0], [])
        if len(slices) != 2 or any(s.op_type != "Slice" for s in slices):
            return None
        products = [self.only_reader(s.output[0], "MatMul") for s in slices]
        if any(p is None for p in products):
            return None
        past_side = [p for p in products if p.input[1] == t_v.output[0]]
        new_side = [p for p in products if p.input[1] != t_v.output[0]]
        if len(past_side) != 1 or len(new_side) != 1:
            return None
        value = self.split_heads(new_side[0].input[1], [0, 2, 1, 3])
        add = self.only_reader(past_side[0].output[0], "Add")
        if add is None or sorted(add.input) != sorted([past_side[0].output[0], new_side[0].output[0]]):
            return None
        back = self.only_reader(add.output[0], "Transpose")
        merge = back is not None and _perm(back) == [0, 2, 1, 3] and self.only_reader(back.output[0], "Reshape")
        if not merge or None in (query, key, value):
            return None
        shape = self.g.constant(merge.input[1])
        if shape is None or shape.ndim != 1 or len(shape) != 3 or int(shape[2]) not in (-1, self.heads * self.head_dim):
            return None
        return _Layer(query, key, value, merge.output[0], scale, merge)

    def shape_only(self, name: str) -> bool:
        """Whether `name` is computed from constants and the shapes of graph inputs alone (a causal
        mask from the step's lengths; a padding mask would read an input's values)."""
        inputs = {i.name for i in self.graph.input}
        todo, seen = [name], set()
        while todo:
            tensor = todo.pop()
            if tensor in seen or not tensor:
                continue
            seen.add(tensor)
            if tensor in inputs:
                return False
            node = self.g.producer.get(tensor)
            if node is None or node.op_type == "Shape":
                continue  # an initializer, or the shape of anything
            todo.extend(node.input)
        return True

    def packed(self, layer: _Layer) -> str | None:
        """The packed (rows, new, 3 * width) product when q, k and v are its three equal thirds."""
        split = self.producer(layer.query, "Split")
        if split is None or list(split.output) != [layer.query, layer.key, layer.value]:
            return None
        if _attr(split, "axis") not in (-1, 2):
            return None
        sizes = self.g.constant(split.input[1]) if len(split.input) > 1 and split.input[1] else None
        width = self.heads * self.head_dim
        if sizes is not None and list(sizes) != [width] * 3:
            return None
        return split.input[0]


def _past_dims(graph, name: str) -> list:
    value = next(v for v in graph.input if v.name == name)
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def gqa_decoder(model, *, layers: int, heads: int, head_dim: int) -> int:
    """Rewrite `model`'s cached self-attention, in place, as one GroupQueryAttention per layer; the
    number of layers rewritten: `layers`, or 0 (and the model unchanged) when any layer, or any
    other use of the time-major past, does not match."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    names = {i.name for i in graph.input}
    if not {"input_ids", "past_key", "past_value"} <= names:
        return 0
    m = _Matcher(graph, heads, head_dim)
    gathers = {"past_key": {}, "past_value": {}}
    past_lengths = []  # Gather(Shape(past_key), 0): the past length, computed anew below
    for source in ("past_key", "past_value"):
        for node in m.readers.get(source, []):
            index = m.g.constant(node.input[1]) if node.op_type == "Gather" else None
            if node.op_type == "Gather" and _attr(node, "axis") == 1 and index is not None and index.ndim == 0:
                gathers[source][int(index)] = node
            elif node.op_type == "Shape" and source == "past_key" and not node.attribute:
                for reader in m.readers.get(node.output[0], []):
                    at = m.g.constant(reader.input[1]) if reader.op_type == "Gather" else None
                    if at is None or at.ndim != 0 or int(at) != 0 or _attr(reader, "axis") != 0:
                        return 0
                    past_lengths.append(reader)
            else:
                return 0
    if sorted(gathers["past_key"]) != list(range(layers)) or sorted(gathers["past_value"]) != list(range(layers)):
        return 0
    found = [m.layer(gathers["past_key"][i], gathers["past_value"][i]) for i in range(layers)]
    if any(f is None for f in found):
        return 0

    elem = next(v for v in graph.input if v.name == "past_key").type.tensor_type.elem_type
    rows = _past_dims(graph, "past_key")[2]
    new_nodes = {}
    for i, layer in enumerate(found):
        past_k, past_v, present_k, present_v = gqa_cache_names(i)
        packed = m.packed(layer)
        qkv = [packed, "", ""] if packed else [layer.query, layer.key, layer.value]
        new_nodes[id(layer.anchor)] = helper.make_node(
            "GroupQueryAttention", [*qkv, past_k, past_v, "seqlens_k", "total_sequence_length"],
            [layer.output, present_k, present_v], name=f"gqa_{i}", domain="com.microsoft",
            num_heads=heads, kv_num_heads=heads, scale=float(layer.scale))
    nodes = [new_nodes.get(id(n), n) for n in graph.node]
    # The past length the positions are computed from: total_sequence_length - new.
    graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), "gqa_new_axis")])
    head = [helper.make_node("Cast", ["total_sequence_length"], ["gqa_total"], to=TensorProto.INT64),
            helper.make_node("Shape", ["input_ids"], ["gqa_ids_shape"]),
            helper.make_node("Gather", ["gqa_ids_shape", "gqa_new_axis"], ["gqa_new"], axis=0),
            helper.make_node("Sub", ["gqa_total", "gqa_new"], ["gqa_past"])]
    lengths = {n.output[0] for n in past_lengths}
    for node in nodes:
        for j, name in enumerate(node.input):
            if name in lengths:
                node.input[j] = "gqa_past"
    del graph.node[:]
    graph.node.extend(head + nodes)

    cache_shape = [rows, heads, "capacity", head_dim]
    ids = [v for v in graph.input if v.name == "input_ids"]
    rest = [v for v in graph.input if v.name not in ("input_ids", "past_key", "past_value")]
    extra = [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [rows]),
             helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    for i in range(layers):
        past_k, past_v, _, _ = gqa_cache_names(i)
        extra += [helper.make_tensor_value_info(past_k, elem, cache_shape),
                  helper.make_tensor_value_info(past_v, elem, cache_shape)]
    del graph.input[:]
    graph.input.extend([*ids, *extra, *rest])
    outputs = [v for v in graph.output if v.name not in ("new_key", "new_value")]
    for i in range(layers):
        _, _, present_k, present_v = gqa_cache_names(i)
        outputs += [helper.make_tensor_value_info(present_k, elem, cache_shape),
                    helper.make_tensor_value_info(present_v, elem, cache_shape)]
    del graph.output[:]
    graph.output.extend(outputs)
    drop_dead_nodes(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return layers


def _random_feeds(session, rng) -> dict[str, np.ndarray]:
    """Random values for a decoder's inputs other than its step inputs and cache: one image, whose
    cross K/V all the rows (its beams) read."""
    feeds = {}
    for arg in session.get_inputs():
        if arg.name in ("past_key", "past_value", *GQA_STEP_INPUTS) or arg.name.startswith("past_"):
            continue
        shape = [d if isinstance(d, int) else 1 for d in arg.shape]
        if "bool" in arg.type:
            feeds[arg.name] = np.ones(shape, bool)
        elif "int" in arg.type:
            feeds[arg.name] = np.ones(shape, np.int64 if "64" in arg.type else np.int32)
        else:
            feeds[arg.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    return feeds


def check_gqa_decoder(path, dims: dict, *, rows: int = 2, prompt: int = 2, steps: int = 3) -> float:
    """The largest difference, relative to the logits' magnitude, between the decoder at `path`
    (the time-major interface, float) and its GroupQueryAttention rewrite, over a prompt of `prompt`
    tokens and `steps` single-token steps of `rows` beams; each run through the runtime's own
    inference classes. Raises ValueError when the graph does not match the pattern."""
    from pathlib import Path

    import onnx

    from ..runtime.kvcache import DecoderInference, GqaDecoderInference
    from ..runtime.onnxrt import OnnxRuntimeRunner

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if not gqa_decoder(model, layers=dims["layers"], heads=dims["heads"], head_dim=dims["head_dim"]):
        raise ValueError(f"{path.name}: its self-attention is not the pattern GroupQueryAttention replaces")
    standard = OnnxRuntimeRunner(path, threads=1)
    rewritten = OnnxRuntimeRunner(path, threads=1, graph=model.SerializeToString())
    rng = np.random.default_rng(0)
    cross = _random_feeds(standard.session, rng)
    vocab = next(o.shape[-1] for o in rewritten.outputs if o.name == "logits")
    capacity = prompt + steps
    a = DecoderInference(standard, dict(cross), rows, capacity, dims, group=rows)
    b = GqaDecoderInference(rewritten, dict(cross), rows, capacity, dims, group=rows)
    return logits_difference(a, b, rows, vocab, prompt, steps, rng)


def logits_difference(a, b, rows: int, vocab: int, prompt: int, steps: int, rng) -> float:
    """The largest difference between two decoders' logits (decoding `Inference`s), relative to
    their magnitude, over a prompt of `prompt` random tokens and `steps` single-token steps of
    `rows` rows, with a reorder that copies a row after the first step: both caches must move it alike."""
    worst = 0.0
    tokens = rng.integers(0, vocab, (rows, prompt))
    for step in range(steps + 1):
        ref, got = a.logits(tokens), b.logits(tokens)
        worst = max(worst, float(np.abs(ref - got).max() / max(1.0, float(np.abs(ref).max()))))
        tokens = rng.integers(0, vocab, (rows, 1))
        if step == 1:
            source = np.zeros(rows, np.int64)
            a.rearrange_kv_cache(source)
            b.rearrange_kv_cache(source)
    return worst


def checked_rewrite(path, dims: dict, name: str, progress=lambda msg: None, graph=None):
    """The GroupQueryAttention rewrite (an ONNX ModelProto, its weights left in external data) of the
    decoder graph at `graph` (default: `path`) when the float decoder at `path`, whose cache entry
    `dims` is time-major, gives its logits within TOLERANCE rewritten the same way
    (`check_gqa_decoder`, once per file); else None, saying why where it matched. `graph`: another
    graph of the same decoder, e.g. its INT8 variant."""
    import onnx

    if dims.get("type", "kv") != "kv" or not {"layers", "heads", "head_dim"} <= set(dims):
        return None
    error = _float_error(str(path), os.stat(path).st_mtime_ns, dims["layers"], dims["heads"], dims["head_dim"])
    if error is None:
        return None  # another attention pattern: the decoder keeps the time-major interface
    if error > TOLERANCE:
        progress(f"{name}: GroupQueryAttention not used, its logits differ by {error:.2g} of their magnitude")
        return None
    model = onnx.load(str(graph or path), load_external_data=False)
    if not gqa_decoder(model, layers=dims["layers"], heads=dims["heads"], head_dim=dims["head_dim"]):
        return None
    progress(f"{name}: self-attention as GroupQueryAttention for the CPU ({dims['layers']} layers; "
             f"logits within {error:.1g} of the time-major graph's)")
    return model


@functools.lru_cache(maxsize=8)
def _float_error(path: str, mtime_ns: int, layers: int, heads: int, head_dim: int) -> float | None:
    """check_gqa_decoder once per file and version (calibrate's --auto writes its variants once per
    probe), or None where the attention is another pattern."""
    try:
        return check_gqa_decoder(path, {"layers": layers, "heads": heads, "head_dim": head_dim})
    except ValueError:
        return None


def rewritten_dims(dims: dict) -> dict:
    """The manifest's cache entry of a decoder once rewritten."""
    return {**dims, "type": CACHE_TYPE, "layout": CACHE_LAYOUT}
