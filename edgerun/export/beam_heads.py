"""A beam search's cross-attention as onnxruntime's GroupQueryAttention, the beams as query heads.

The decoders edge-run traces read one image's cross-attention K/V, (1, heads, keys, head_dim), and
broadcast the beams' queries over it (`shared_kv_attention`, edgerun/models/families/layers.py):
per layer a product for each head and beam against K, a Softmax, a product against V, and the
reshapes around them. onnxruntime runs those matrix-vector products at ~13 GB/s.
GroupQueryAttention reads each K/V head once for all the query heads of its group: with the G
beams of one image as G query heads per K/V head (num_heads = heads x G, kv_num_heads = heads), one
kernel a layer does the same work faster (BLIP-base's shapes, 12 layers, 577 keys, 3 beams:
3.30 -> 2.34 ms; in captions the INT8 step 11.3 -> 10.2 ms; docs/benchmarks.md, eighth round).

The head counts are attributes, so such a graph serves one image and exactly G beams; the bundle
keeps it beside the general decoder as the variant `NAME@cpu-beamsG`, whose manifest entry says
`when` = {"batch": 1, "beams": G} (edgerun.runtime.variants.select_decoder). The op appends each
call's new K/V to its past, so the image's K/V sit in buffers with spare slots after the keys,
bound as past and present at once (edgerun.runtime.kvcache.BeamHeadsInference); the op writes a
dummy K/V there (row 0's query: any value would do) and `cross_bias` (-inf on those slots) keeps
the softmax off them. Where the module that makes the K/V reads its input row by row (a
projection of each image token: checked on random rows), that input is the variant's `pad`, and
the runtime appends the spare rows to it, so the K/V come out of that module with their spare slots
(`Model._padded`); the module then gets a CPU copy whose row count is free (`NAME@cpu`), since
TensorRT keeps the fixed one. The interface the rewrite gives a decoder:

- `input_ids` (G, new): the rows fixed to the beams;
- inputs `cross_seqlens_k` (1,) int32 = keys + new - 1, `cross_total_sequence_length` () int32 =
  keys + new, `cross_bias` (1, 1, new, keys + new): 0 on the keys, -inf on the `new` spare slots;
- each cross K/V input becomes (1, heads, cross_capacity, head_dim): the keys, then spare slots;
- outputs `present_<that input>`: the same buffers, written in place.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..runtime.kvcache import CROSS_INPUTS, present_name
from . import gqa
from .simplify import _attr, _perm, drop_dead_nodes

TAG = "cpu-beams"  # the variant's tag: NAME@cpu-beams3
BEAMS = (3,)  # beam counts a decoder gets a variant for, besides its bundle's default: `edge-run bench`'s and BLIP's


@dataclass
class _Cross:
    query: str  # (G, new, width): the layer's projected queries
    key: str  # graph inputs, (1, heads, keys, head_dim)
    value: str
    output: str  # (G, new, width): the attention output, heads merged
    scale: float
    anchor: object  # the node whose place the GroupQueryAttention takes (the merging Reshape)


class _Matcher(gqa._Matcher):  # only_reader, producer: the self-attention rewrite's
    def __init__(self, graph):
        super().__init__(graph, 0, 0)
        self.inputs = {i.name for i in graph.input}

    def unsqueezed(self, node) -> bool:
        """Whether `node` is Unsqueeze(x, axes=[2])."""
        if node is None or node.op_type != "Unsqueeze":
            return False
        axes = self.g.constant(node.input[1]) if len(node.input) > 1 else np.array(_attr(node, "axes", []))
        return axes is not None and [int(a) for a in np.ravel(axes)] == [2]

    def unsqueezed_input(self, name: str):
        """The Unsqueeze(axes=[2]) graph input `name` feeds, where its only other readers take its
        shape for dims other than the keys' (the batch: still 1 with spare slots); else None."""
        readers = self.readers.get(name, [])
        unsq = [r for r in readers if self.unsqueezed(r)]
        for r in readers:
            if r.op_type == "Shape" and not r.attribute and all(
                    g.op_type == "Gather" and _attr(g, "axis") == 0 and self.g.constant(g.input[1]) is not None
                    and int(self.g.constant(g.input[1])) not in (2, -2) for g in self.readers.get(r.output[0], [])):
                continue
            if r not in unsq:
                return None
        return unsq[0] if len(unsq) == 1 else None

    def layer(self, key: str) -> _Cross | None:
        """The cross-attention reading graph input `key` through Unsqueeze(2) and a transpose, as
        `shared_kv_attention` with no key mask traces, or None."""
        unsq = self.unsqueezed_input(key)
        if unsq is None:
            return None
        k_t = self.only_reader(unsq.output[0], "Transpose")
        scores = k_t is not None and _perm(k_t) == [0, 1, 2, 4, 3] and self.only_reader(k_t.output[0], "MatMul")
        if not scores or scores.input[1] != k_t.output[0]:
            return None
        q5 = self.producer(scores.input[0], "Transpose")
        split = q5 is not None and _perm(q5) == [0, 3, 1, 2, 4] and self.producer(q5.input[0], "Reshape")
        if not split or len(self.readers.get(q5.output[0], [])) != 1 or len(self.readers.get(split.output[0], [])) != 1:
            return None
        scaled = self.readers.get(scores.output[0], [])
        if len(scaled) != 1 or scaled[0].op_type not in ("Mul", "Div") or scaled[0].input[0] != scores.output[0]:
            return None
        factor = self.g.constant(scaled[0].input[1])
        if factor is None or factor.size != 1 or float(factor) == 0:
            return None
        scale = float(factor) if scaled[0].op_type == "Mul" else 1.0 / float(factor)
        softmax = self.only_reader(scaled[0].output[0], "Softmax")
        if softmax is None or _attr(softmax, "axis", -1) not in (-1, 4):
            return None
        context = self.only_reader(softmax.output[0], "MatMul")
        unsq_v = context is not None and context.input[0] == softmax.output[0] and \
            self.producer(context.input[1], "Unsqueeze")
        if not self.unsqueezed(unsq_v) or unsq_v.input[0] not in self.inputs \
                or self.unsqueezed_input(unsq_v.input[0]) is not unsq_v:
            return None
        back = self.only_reader(context.output[0], "Transpose")
        merge = back is not None and _perm(back) == [0, 2, 3, 1, 4] and self.only_reader(back.output[0], "Reshape")
        if not merge:
            return None
        return _Cross(split.input[0], key, unsq_v.input[0], merge.output[0], scale, merge)


def beam_heads_decoder(model, *, heads: int, head_dim: int, beams: int) -> int:
    """Rewrite `model`'s cross-attentions, in place, as GroupQueryAttention with `beams` query heads
    per K/V head; the number rewritten, 0 (the model unchanged) where none matches."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    m = _Matcher(graph)
    found = [c for c in (m.layer(i.name) for i in graph.input) if c is not None]
    taken = {o.name for o in graph.output} | {i.name for i in graph.input}
    read = {i.name for i in graph.input if any(m.unsqueezed(r) for r in m.readers.get(i.name, []))}
    if not found or read != {n for c in found for n in (c.key, c.value)} \
            or any(present_name(n) in taken for n in read) or any(n in taken for n in CROSS_INPUTS):
        return 0  # every cross K/V input rewritten, or none: the runtime gives them all spare slots
    width = heads * head_dim

    def const(name: str, values) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    shapes = {"q": const("bh_q_split", [beams, -1, heads, head_dim]),
              "flat": const("bh_q_flat", [1, -1, heads * beams * head_dim]),
              "o": const("bh_o_split", [-1, heads, beams, head_dim]),
              "back": const("bh_back", [beams, -1, width]),
              "zero": const("bh_zero", [0]), "one": const("bh_one", [1])}
    position = {id(n): i for i, n in enumerate(graph.node)}
    first = min(found, key=lambda c: position[id(c.anchor)])
    dummy = "bh_dummy_kv"  # (1, new, width): row 0's queries, written to the masked slots
    new_nodes = {id(first.anchor): [helper.make_node("Slice", [first.query, shapes["zero"], shapes["one"],
                                                               shapes["zero"]], [dummy], name="bh_dummy")]}
    for i, c in enumerate(sorted(found, key=lambda c: position[id(c.anchor)])):
        p = f"bh{i}_"
        new_nodes.setdefault(id(c.anchor), []).extend([
            helper.make_node("Reshape", [c.query, shapes["q"]], [p + "q4"]),  # (G, new, H, hd)
            helper.make_node("Transpose", [p + "q4"], [p + "qt"], perm=[1, 2, 0, 3]),  # (new, H, G, hd)
            helper.make_node("Reshape", [p + "qt", shapes["flat"]], [p + "q"]),  # (1, new, H*G*hd)
            helper.make_node("GroupQueryAttention",
                             [p + "q", dummy, dummy, c.key, c.value, *CROSS_INPUTS[:2], "", "", "", CROSS_INPUTS[2]],
                             [p + "ctx", present_name(c.key), present_name(c.value)], name=f"beam_heads_{i}",
                             domain="com.microsoft", num_heads=heads * beams, kv_num_heads=heads, scale=c.scale),
            helper.make_node("Reshape", [p + "ctx", shapes["o"]], [p + "o4"]),  # (new, H, G, hd)
            helper.make_node("Transpose", [p + "o4"], [p + "ot"], perm=[2, 0, 1, 3]),  # (G, new, H, hd)
            helper.make_node("Reshape", [p + "ot", shapes["back"]], [c.output])])
    nodes = []
    for node in graph.node:
        nodes.extend(new_nodes.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)

    caches = {n for c in found for n in (c.key, c.value)}
    for value in graph.input:
        if value.name in ("input_ids", "seqlens_k"):  # the rows: this many beams of one image
            value.type.tensor_type.shape.dim[0].Clear()
            value.type.tensor_type.shape.dim[0].dim_value = beams
        if value.name in caches:
            elem = value.type.tensor_type.elem_type
            value.CopyFrom(helper.make_tensor_value_info(value.name, elem, [1, heads, "cross_capacity", head_dim]))
    graph.input.extend([helper.make_tensor_value_info(CROSS_INPUTS[0], TensorProto.INT32, [1]),
                        helper.make_tensor_value_info(CROSS_INPUTS[1], TensorProto.INT32, []),
                        helper.make_tensor_value_info(CROSS_INPUTS[2], TensorProto.FLOAT,
                                                      [1, 1, "new", "cross_total"])])
    for value in list(graph.input):
        if value.name in caches:
            graph.output.append(helper.make_tensor_value_info(present_name(value.name), value.type.tensor_type.elem_type,
                                                              [1, heads, "cross_capacity", head_dim]))
    drop_dead_nodes(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(found)


def check_beam_heads(path, dims: dict, beams: int, *, prompt: int = 2, steps: int = 3, keys: int = 7,
                     graph: bytes | None = None) -> tuple[float, object]:
    """(error, rewritten ModelProto) for the GroupQueryAttention decoder at `path` (or its graph
    `graph`, external data beside `path`): the largest difference between its logits and the
    rewrite's, relative to their magnitude, over a prompt of `prompt` tokens, `steps` single-token
    steps and a reorder, one image of `keys` keys and `beams` beams, each through the runtime's
    inference classes. Raises ValueError when no cross-attention matches."""
    import onnx

    from ..runtime.kvcache import BeamHeadsInference, GqaDecoderInference
    from ..runtime.onnxrt import OnnxRuntimeRunner

    path = Path(path)
    model = onnx.load_model_from_string(graph) if graph is not None else onnx.load(str(path), load_external_data=False)
    standard_graph = model.SerializeToString()
    if not beam_heads_decoder(model, heads=dims["heads"], head_dim=dims["head_dim"], beams=beams):
        raise ValueError(f"{path.name}: no cross-attention of the pattern the beam-heads rewrite replaces")
    standard = OnnxRuntimeRunner(path, threads=1, graph=standard_graph)
    rewritten = OnnxRuntimeRunner(path, threads=1, graph=model.SerializeToString())
    rng, cross = np.random.default_rng(0), {}
    for arg in standard.session.get_inputs():
        if arg.name.startswith("past_") or arg.name in ("input_ids", "seqlens_k", "total_sequence_length"):
            continue
        shape = [d if isinstance(d, int) else 1 if i == 0 else keys for i, d in enumerate(arg.shape)]
        if "float" not in arg.type:
            raise ValueError(f"{path.name}: input {arg.name} ({arg.type}) is not one the rewrite was checked for")
        cross[arg.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    vocab = next(o.shape[-1] for o in rewritten.outputs if o.name == "logits")
    capacity = prompt + steps
    a = GqaDecoderInference(standard, dict(cross), beams, capacity, dims, group=beams)
    b = BeamHeadsInference(rewritten, dict(cross), beams, capacity, dims, group=beams)
    return gqa.logits_difference(a, b, beams, vocab, prompt, steps, rng), model


def beam_counts(default_beams: int | None) -> list[int]:
    """The beam counts a decoder gets a variant for: BEAMS and the bundle's default beam search."""
    return sorted({*BEAMS, int(default_beams or 1)} - {1})


def add_beam_heads(folder, modules: dict, beams, progress=lambda msg: None, float_graphs: dict | None = None) -> dict:
    """`modules` (name -> ModuleSpec, files in `folder`) with `NAME@cpu-beamsG` for each
    GroupQueryAttention CPU decoder whose cross-attention matches and each G in `beams`, kept where
    the rewrite gives the float decoder's logits within gqa.TOLERANCE, and with their `pad`
    (`attach_pads`). `float_graphs`: {decoder module: path of its float GroupQueryAttention graph},
    to check the rewrite on where the module is not float itself (a calibrated decoder); a decoder
    without one gets no variant then."""
    import onnx

    from .simplify import io_specs

    out = dict(modules)
    for name, spec in modules.items():
        cache = spec.extra.get("cache") or {}
        if cache.get("type") != gqa.CACHE_TYPE or "cpu" not in spec.backends or spec.extra.get("when"):
            continue
        base = spec.extra.get("variant_of", name)
        own = spec.precision == "fp32"  # else checked on its float twin, then applied to this graph
        check = Path(folder) / spec.file if own else (float_graphs or {}).get(base)
        if check is None:
            continue
        for g in beams:
            if f"{base}@{TAG}{g}" in out:
                continue  # made already (a float variant kept beside FP16 ones)
            try:
                error, model = check_beam_heads(check, cache, g)
            except ValueError:
                break  # not the pattern: no beam count will match
            if error > gqa.TOLERANCE:
                progress(f"{base}: beams not made cross-attention heads, its logits differ by {error:.2g}")
                break
            if not own:
                model = onnx.load(str(Path(folder) / spec.file), load_external_data=False)
                if not beam_heads_decoder(model, heads=cache["heads"], head_dim=cache["head_dim"], beams=g):
                    break
            file = f"{spec.file.removesuffix('.onnx')}-beams{g}.onnx"
            onnx.save_model(model, str(Path(folder) / file))  # the same weights file as spec's
            inputs, outputs = io_specs(Path(folder) / file)
            extra = {**spec.extra, "variant_of": base, "when": {"batch": 1, "beams": g}}
            out[f"{base}@{TAG}{g}"] = replace(spec, file=file, inputs=inputs, outputs=outputs, backends=("cpu",),
                                              extra=extra)
            progress(f"{base}: {g} beams as cross-attention heads for one image (logits within {error:.1g})")
    return attach_pads(folder, out, progress)


def attach_pads(folder, modules: dict, progress=lambda msg: None) -> dict:
    """`modules` with each beam-heads decoder's `pad`: the input of the module that makes its cross
    K/V, where that module makes them row by row (`row_local_copy`), which then also runs with
    more rows than it was exported for on the CPU."""
    from ..runtime.variants import select_module

    out = dict(modules)
    for name, spec in modules.items():
        if not spec.extra.get("when") or "pad" in spec.extra:
            continue
        wanted = {t.name for t in spec.inputs}
        source = next((n for n, s in out.items() if not s.extra.get("variant_of") and not s.extra.get("cache")
                       and any(t.name in wanted for t in s.outputs)), None)
        if source is None:
            continue
        variant, src = select_module(SimpleNamespace(modules=out), source, "cpu")
        made = row_local_copy(folder, variant, src, progress)
        if made is None:
            continue
        out.update(made)
        out[name] = replace(spec, extra={**spec.extra, "pad": src.inputs[0].name})
    return out


def row_local_copy(folder, name: str, spec, progress=lambda msg: None) -> dict | None:
    """{module: spec} for module `name` (one input (batch, rows, width), outputs (batch, heads,
    rows, head_dim)) made to take any row count on the CPU: its own file where it serves onnxruntime
    alone, else a `@cpu` variant beside it; {} where it takes any already; None where its outputs'
    first rows change when rows are appended to its input (checked on random values)."""
    import onnx

    from ..runtime.onnxrt import OnnxRuntimeRunner
    from .cpu_variants import CPU_TAG
    from .simplify import io_specs

    if len(spec.inputs) != 1 or len(spec.inputs[0].shape) != 3 or not all(len(t.shape) == 4 for t in spec.outputs):
        return None
    rows, width = spec.inputs[0].shape[1:]
    if not isinstance(width, int):
        return None
    path = Path(folder) / spec.file
    model = onnx.load(str(path), load_external_data=False)
    free = isinstance(rows, str)
    if not free:
        _free_rows(model.graph, spec.inputs[0].name, rows)
    n = rows if not free else 7
    runner = OnnxRuntimeRunner(path, threads=1, graph=model.SerializeToString())
    x = np.random.default_rng(0).standard_normal((1, n, width)).astype(np.float32)
    want = runner.infer({spec.inputs[0].name: x})
    got = runner.infer({spec.inputs[0].name: np.concatenate([x, np.zeros((1, 2, width), np.float32)], axis=1)})
    for key, a in want.items():
        b = got[key]
        if b.shape[2] != a.shape[2] + 2 or np.abs(b[:, :, :a.shape[2]] - a).max() > 1e-5 * max(1.0, float(np.abs(a).max())):
            return None
    if free:
        return {}
    ort_only = set(spec.backends) <= {"cpu", "cuda"}
    base = spec.extra.get("variant_of", name)
    file = spec.file if ort_only else f"{spec.file.removesuffix('.onnx')}.{CPU_TAG}.onnx"
    onnx.save_model(model, str(Path(folder) / file))
    inputs, outputs = io_specs(Path(folder) / file)
    if ort_only:
        return {name: replace(spec, inputs=inputs, outputs=outputs)}
    progress(f"{base}: a CPU copy that takes any number of rows (the beam-heads decoder's spare slots)")
    return {name: replace(spec, backends=tuple(b for b in spec.backends if b != "cpu")),
            f"{base}@{CPU_TAG}": replace(spec, file=file, inputs=inputs, outputs=outputs, backends=("cpu",),
                                         extra={**spec.extra, "variant_of": base})}


def _free_rows(graph, name: str, rows: int) -> None:
    """The input `name`'s row count and every output dim equal to it made symbolic ("keys"); the
    recorded intermediate shapes dropped (onnxruntime infers them again)."""
    values = [v for v in graph.input if v.name == name]
    values += [v for v in graph.output if len(v.type.tensor_type.shape.dim) == 4]
    for value in values:
        dims = value.type.tensor_type.shape.dim
        for i in ([1] if value.name == name else [2]):
            if dims[i].HasField("dim_value") and dims[i].dim_value == rows:
                dims[i].Clear()
                dims[i].dim_param = "keys"
    del graph.value_info[:]
