"""Measured, not built: a batch-1 beam search's cross-attention as onnxruntime's
GroupQueryAttention, the beams as query heads (docs/benchmarks.md, eighth round).

    python benchmarks/beam_heads_probe.py BUNDLE [--rounds 12]

BUNDLE's CPU decoder (a GroupQueryAttention graph: `decoder@cpu` of an export, `decoder` of a
calibrated bundle) is rewritten: each layer's cross-attention (a product per head and beam against
the image's one K/V copy, Softmax, a product against V) becomes one GroupQueryAttention with
num_heads = heads x 3 beams sharing kv_num_heads = heads. The op appends each call's K/V to its
past, so the image's K/V are copied once per caption into buffers with spare slots, bound as past
and present; a dummy K/V goes there and `cross_bias` (-inf) masks it. The script checks the
rewrite against the decoder (prints how far its logits are over a prompt, steps and a reorder), writes
the rewritten bundle next to BUNDLE (hard links, `BUNDLE-beamheads`), and alternates captions of
the two in one process (graph_probe.py captions: scikit-image's astronaut, 3 beams, 20 tokens).
The head counts are attributes, so a graph serves one image and one beam count: a product would
need a second decoder session per beam count, and the spare slots a copy of the cross K/V (or the
cross_kv module run on padded rows) for every caption.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerun.export import gqa
from edgerun.export.simplify import _attr, _perm, drop_dead_nodes
from edgerun.runtime.kvcache import GqaDecoderInference

CROSS_INPUTS = ("cross_seqlens_k", "cross_total_sequence_length", "cross_bias")


def present_name(name: str) -> str:
    return f"present_{name}"


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

    def layer(self, key: str) -> _Cross | None:
        """The cross-attention reading graph input `key` through Unsqueeze(2) and a transpose, as
        `shared_kv_attention` with no key mask traces, or None."""
        unsq = self.only_reader(key, "Unsqueeze")
        if not self.unsqueezed(unsq):
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
                or len(self.readers.get(unsq_v.input[0], [])) != 1:
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
    if not found or any(present_name(n) in taken for c in found for n in (c.key, c.value)) \
            or any(n in taken for n in CROSS_INPUTS):
        return 0
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


class BeamHeadsInference(GqaDecoderInference):
    """A GroupQueryAttention decoder whose cross-attention is GroupQueryAttention too, the beams of
    its one image as query heads (edgerun.export.beam_heads): for batch 1 and exactly the beam count
    the graph was made for. Each cross K/V input sits in a buffer with spare slots after the
    image's keys (a copy, made once, where the given one has no room), bound as the input and as its
    `present_` output (the op
    writes a dummy K/V there, which `cross_bias` masks); `cross_seqlens_k`,
    `cross_total_sequence_length` and `cross_bias` follow the number of new tokens. `spare`: slots
    the given cross K/V already have after the keys (Model._padded: the cross_kv module ran on
    its input with zero rows appended), used in place, without the copy."""

    def __init__(self, runner, cross: dict[str, np.ndarray], rows: int, capacity: int, dims: dict,
                 group: int | None = None, spare: int = 0):
        outputs = {o.name for o in runner.outputs}
        self._caches = [n for n in cross if present_name(n) in outputs]
        shapes = {cross[n].shape for n in self._caches}
        if not self._caches or len(shapes) != 1 or next(iter(shapes))[0] != 1:
            raise ValueError(f"decoder {runner.path.name}: its beam-heads cross-attention serves one image, "
                              f"got cross K/V of shapes {sorted(shapes)}")
        self._keys_n = next(iter(shapes))[2] - spare
        self._images = {n: cross.pop(n) for n in self._caches}  # the cross_kv outputs
        self._spare = 0
        self._given = spare
        self._seqlens_x = np.zeros(1, np.int32)
        self._total_x = np.zeros((), np.int32)
        self._biases: dict[int, np.ndarray] = {}
        super().__init__(runner, cross, rows, capacity, dims, group=group)
        binding = self._binding
        for name, array in ((CROSS_INPUTS[0], self._seqlens_x), (CROSS_INPUTS[1], self._total_x)):
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            self.cross[name] = array

    def _pad(self, spare: int) -> None:
        """Buffers of the image's keys + `spare` slots, bound as past and present: the given ones
        where they have the room, else copies."""
        for name, image in self._images.items():
            if spare <= self._given:
                buf = np.ascontiguousarray(image)
            else:
                buf = np.zeros((*image.shape[:2], self._keys_n + spare, image.shape[3]), image.dtype)
                buf[:, :, :self._keys_n] = image[:, :, :self._keys_n]
            shape = buf.shape
            self._binding.bind_input(name, "cpu", 0, buf.dtype, list(shape), buf.ctypes.data)
            self._binding.bind_output(present_name(name), "cpu", 0, buf.dtype, list(shape), buf.ctypes.data)
            self.cross[name] = buf
        self._spare = max(spare, self._given)

    def _step(self, ids: np.ndarray, past: int, new: int) -> np.ndarray:
        if new > self._spare:
            self._pad(new)
        n = self._keys_n
        self._seqlens_x[0] = n + new - 1
        self._total_x[...] = n + new
        bias = self._biases.get(new)
        if bias is None:
            bias = self._biases[new] = np.zeros((1, 1, new, n + new), np.float32)
            bias[..., n:] = -np.inf
        if self.cross.get(CROSS_INPUTS[2]) is not bias:
            self._binding.bind_input(CROSS_INPUTS[2], "cpu", 0, bias.dtype, list(bias.shape), bias.ctypes.data)
            self.cross[CROSS_INPUTS[2]] = bias
        return super()._step(ids, past, new)


def check(path: Path, dims: dict, beams: int = 3, *, prompt: int = 2, steps: int = 3, keys: int = 7):
    """(largest logits difference relative to their magnitude, rewritten model) over a prompt,
    `steps` steps and a reorder, one image of `keys` keys, through the runtime's inference classes."""
    import onnx

    from edgerun.runtime.onnxrt import OnnxRuntimeRunner

    model = onnx.load(str(path), load_external_data=False)
    standard_graph = model.SerializeToString()
    if not beam_heads_decoder(model, heads=dims["heads"], head_dim=dims["head_dim"], beams=beams):
        raise SystemExit(f"{path.name}: no cross-attention of the pattern this rewrite replaces")
    standard = OnnxRuntimeRunner(path, threads=1, graph=standard_graph)
    rewritten = OnnxRuntimeRunner(path, threads=1, graph=model.SerializeToString())
    rng, cross = np.random.default_rng(0), {}
    for arg in standard.session.get_inputs():
        if arg.name.startswith("past_") or arg.name in ("input_ids", "seqlens_k", "total_sequence_length"):
            continue
        shape = [d if isinstance(d, int) else 1 if i == 0 else keys for i, d in enumerate(arg.shape)]
        cross[arg.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    vocab = next(o.shape[-1] for o in rewritten.outputs if o.name == "logits")
    a = GqaDecoderInference(standard, dict(cross), beams, prompt + steps, dims, group=beams)
    b = BeamHeadsInference(rewritten, dict(cross), beams, prompt + steps, dims, group=beams)
    worst, tokens = 0.0, rng.integers(0, vocab, (beams, prompt))
    for step in range(steps + 1):
        ref, got = a.logits(tokens), b.logits(tokens)
        worst = max(worst, float(np.abs(ref - got).max() / max(1.0, float(np.abs(ref).max()))))
        tokens = rng.integers(0, vocab, (beams, 1))
        if step == 1:
            a.rearrange_kv_cache(np.zeros(beams, np.int64))
            b.rearrange_kv_cache(np.zeros(beams, np.int64))
    return worst, model


def main(argv=None) -> int:
    import onnx
    from graph_probe import captions

    import edgerun.runtime.model as model_module

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    name = next(n for n, m in manifest["modules"].items()
                if m["extra"].get("cache", {}).get("type") == "gqa" and "cpu" in m["backends"])
    spec = manifest["modules"][name]
    error, model = check(args.bundle / spec["file"], spec["extra"]["cache"])
    print(f"{name} ({spec['file']}): beams as cross-attention heads, logits within {error:.1e} of the decoder's "
          "(1e-6 in float; an INT8 decoder's activation codes move at rounding edges)")
    out = args.bundle.parent / f"{args.bundle.name}-beamheads"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    for f in args.bundle.iterdir():
        if f.is_file() and f.name not in ("manifest.json", spec["file"]):
            os.link(f, out / f.name)
    onnx.save_model(model, str(out / spec["file"]))
    data = (out / spec["file"]).read_bytes()
    manifest["files"][spec["file"]] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))

    plain = model_module.make_inference

    def make_inference(runner, values, batch, beams, capacity, cache):
        if CROSS_INPUTS[0] not in {i.name for i in runner.inputs}:
            return plain(runner, values, batch, beams, capacity, cache)
        own = {"input_ids", "seqlens_k", "total_sequence_length", *CROSS_INPUTS}
        feeds = {i.name: values[i.name] for i in runner.inputs if i.name not in own and not i.name.startswith("past_")}
        return BeamHeadsInference(runner, feeds, batch * beams, capacity, cache, group=beams)

    model_module.make_inference = make_inference
    captions([args.bundle, out], args.rounds)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
