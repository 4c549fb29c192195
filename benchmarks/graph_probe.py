"""Small measurements behind docs/benchmarks.md's notes on kernels: where a graph's time goes, two
bundles alternating, and two isolated kernel comparisons.

    python benchmarks/graph_probe.py profile MODULE.onnx [--past 10]     # a decoder step or an encoder, by op type
    python benchmarks/graph_probe.py captions BUNDLE_A BUNDLE_B [--rounds 12]   # alternating captions
    python benchmarks/graph_probe.py captions BUNDLE --general   # its beam-heads decoder against its general one
    python benchmarks/graph_probe.py gqa [--past 10]     # 12 self-attentions: decomposed vs GroupQueryAttention
    python benchmarks/graph_probe.py head [--vocab 50257]   # tied LM head: through a Reshape vs prepacked
    python benchmarks/graph_probe.py xattn [--keys 577]  # 12 cross-attentions: decomposed vs GroupQueryAttention
    python benchmarks/graph_probe.py rows                # MatMulNBits chained at 1-4 rows
    python benchmarks/graph_probe.py transposed          # the same chain as W^T x^T with MatMulInteger
    python benchmarks/graph_probe.py load MODULE.onnx    # session creation, with and without prepacking

`profile` feeds random inputs (3 rows, one new token, the given past, batch 1; 384 px for an image
input unless its size is fixed; a GroupQueryAttention decoder's cache bound in place as the runtime
binds it) to a session with 2 threads and spinning off, and sums
onnxruntime's profiler per op type over 25 calls (the profiler inflates small kernels).
`captions`: one process, both bundles loaded, captions of scikit-image's astronaut (3 beams, exactly
20 new tokens) taken in turn; medians of the decoder time, the step, and the bookkeeping.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def _options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _feeds(session, past: int) -> dict:
    dims = {"rows": 3, "new": 1, "past": past, "batch": 1}
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else dims.get(d, 1) for d in i.shape]
        if i.name == "pixel_values":
            shape = [1, 3] + [d if isinstance(d, int) else 384 for d in i.shape[2:]]
        if "int64" in i.type:
            feeds[i.name] = rng.integers(0, 1000, shape).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _caller(session, past: int):
    """A function running `session` once on random inputs; a GroupQueryAttention decoder
    (edgerun.export.gqa) runs as the runtime runs it, its cache bound as past and present at once."""
    feeds = _feeds(session, past)
    if "seqlens_k" not in feeds:
        return lambda: session.run(None, feeds)
    rows = feeds["input_ids"].shape[0]
    feeds["seqlens_k"] = np.full(rows, past, np.int32)
    feeds["total_sequence_length"] = np.array(past + 1, np.int32)
    binding = session.io_binding()
    for arg in session.get_inputs():
        if arg.name.startswith("past_"):
            cache = feeds[arg.name] = np.zeros((rows, arg.shape[1], past + 8, arg.shape[3]), np.float32)
            binding.bind_output(arg.name.replace("past_", "present_"), "cpu", 0, np.float32, list(cache.shape),
                                cache.ctypes.data)
        binding.bind_cpu_input(arg.name, feeds[arg.name])
    binding.bind_output("logits")
    return lambda: session.run_with_iobinding(binding)


def profile(path: Path, past: int) -> None:
    import onnxruntime as ort

    plain = ort.InferenceSession(str(path), _options(), providers=["CPUExecutionProvider"])
    run = _caller(plain, past)
    for _ in range(5):
        run()
    times = []
    for _ in range(30):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(f"{path.name}: {np.median(times) * 1e3:.2f} ms a call (median of 30)")
    so = _options()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / "graph_probe")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    run, calls = _caller(session, past), 25
    for _ in range(calls):
        run()
    report = Path(session.end_profiling())
    events = json.loads(report.read_text())
    report.unlink()
    spent, count = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            spent[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    print(f"kernels: {sum(spent.values()) / calls / 1e3:.2f} ms, {sum(count.values()) // calls} a call")
    for op, us in sorted(spent.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {op:26s} {us / calls / 1e3:7.2f} ms  x{count[op] // calls}")


def captions(bundles: list[Path], rounds: int, general: bool = False) -> None:
    """`general`: one bundle, captioned through its beam-heads decoder variant and through its
    general CPU decoder (edgerun.export.beam_heads), alternating."""
    from skimage import data

    import edgerun

    image = data.astronaut()
    opts = {"num_beams": 3, "max_new_tokens": 20, "min_new_tokens": 20}
    models = [edgerun.load(b, threads=2) for b in bundles]
    if general:
        plain = edgerun.load(bundles[0], threads=2)
        variant = plain.decoder_variant("decoder", 1, 3)
        if variant == "decoder":
            raise SystemExit(f"{bundles[0]} has no beam-heads decoder for one image and 3 beams")
        plain._runners[variant] = plain.runner("decoder")  # the call goes to the general decoder
        models, bundles = [plain, *models], [Path(f"{bundles[0]} (general decoder)"), *bundles]
    first = [m.caption(image, **opts) for m in models]
    print("same tokens:", all(c.token_ids == first[0].token_ids for c in first),
          "scores:", [round(c.score, 6) for c in first])
    seen = [{"decoder": [], "step": [], "bookkeeping": [], "cache": [], "decode": []} for _ in models]
    for _ in range(rounds):
        for m, s in zip(models, seen):
            m.caption(image, **opts)
            t = m.last_timings
            s["decoder"].append(t["decoder"] * 1e3)
            s["step"].append(t["decoder_per_token"] * 1e3)
            s["bookkeeping"].append(t["beam_bookkeeping"] * 1e3)
            s["cache"].append(t["kv_cache"] * 1e3)
            s["decode"].append(t["decode"] * 1e3)
    for b, s in zip(bundles, seen):
        print(f"{b}: decoder {np.median(s['decoder']):.1f} ms, step {np.median(s['step']):.2f} ms, "
              f"bookkeeping {np.median(s['bookkeeping']):.2f} ms, cache {np.median(s['cache']):.2f} ms, "
              f"decoding in all {np.median(s['decode']):.1f} ms")


def _alternate(sessions: dict, feeds: dict, rounds: int = 200) -> None:
    for run in sessions.values():
        for _ in range(20):
            run()
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, run in sessions.items():
            start = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - start)
    for k, v in times.items():
        print(f"  {k:28s} {np.median(v) * 1e3:.3f} ms (median of {rounds} alternating calls)")


def gqa(past: int, layers: int = 12, rows: int = 3, heads: int = 8, size: int = 96, room: int = 32) -> None:
    """`layers` self-attentions over a cached past: the standard-op form of edge-run's decoders
    (split, per-head reshapes, products against past and new keys apart) against com.microsoft
    GroupQueryAttention writing the new K/V into a preallocated buffer (past = present via IO binding)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    width = heads * size
    f32 = TensorProto.FLOAT

    def ints(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    nodes, inputs, outputs = [], [], []
    inits = [ints("heads_shape", [0, 0, heads, size]), ints("merged_shape", [0, 0, width]),
             ints("widths", [width] * 3), ints("zero", [0]), ints("past", [past]), ints("end", [past + 1]),
             ints("last", [-1]), numpy_helper.from_array(np.array(np.sqrt(size), np.float32), "scale")]
    for layer in range(layers):
        p = f"l{layer}_"
        inputs += [helper.make_tensor_value_info(p + "qkv", f32, [rows, 1, 3 * width]),
                   helper.make_tensor_value_info(p + "pk", f32, [rows, heads, past, size]),
                   helper.make_tensor_value_info(p + "pv", f32, [rows, heads, past, size])]
        nodes.append(helper.make_node("Split", [p + "qkv", "widths"], [p + "q", p + "k", p + "v"], axis=-1))
        for x in "qkv":
            nodes += [helper.make_node("Reshape", [p + x, "heads_shape"], [p + x + "r"]),
                      helper.make_node("Transpose", [p + x + "r"], [p + x + "t"], perm=[0, 2, 1, 3])]
        nodes += [helper.make_node("Transpose", [p + "pk"], [p + "pkT"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", [p + "qt", p + "pkT"], [p + "s1"]),
                  helper.make_node("Transpose", [p + "kt"], [p + "kT"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", [p + "qt", p + "kT"], [p + "s2"]),
                  helper.make_node("Concat", [p + "s1", p + "s2"], [p + "s"], axis=-1),
                  helper.make_node("Div", [p + "s", "scale"], [p + "sd"]),
                  helper.make_node("Softmax", [p + "sd"], [p + "pr"], axis=-1),
                  helper.make_node("Slice", [p + "pr", "zero", "past", "last"], [p + "p1"]),
                  helper.make_node("Slice", [p + "pr", "past", "end", "last"], [p + "p2"]),
                  helper.make_node("MatMul", [p + "p1", p + "pv"], [p + "o1"]),
                  helper.make_node("MatMul", [p + "p2", p + "vt"], [p + "o2"]),
                  helper.make_node("Add", [p + "o1", p + "o2"], [p + "o"]),
                  helper.make_node("Transpose", [p + "o"], [p + "ot"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [p + "ot", "merged_shape"], [p + "out"])]
        outputs += [helper.make_tensor_value_info(p + n, f32, None) for n in ("out", "kr", "vr")]
    standard = helper.make_model(helper.make_graph(nodes, "standard", inputs, outputs, inits),
                                 opset_imports=[helper.make_opsetid("", 18)])
    nodes, inputs, outputs = [], [helper.make_tensor_value_info("seqlens", TensorProto.INT32, [rows]),
                                  helper.make_tensor_value_info("total", TensorProto.INT32, [1])], []
    for layer in range(layers):
        p = f"l{layer}_"
        inputs += [helper.make_tensor_value_info(p + "qkv", f32, [rows, 1, 3 * width]),
                   helper.make_tensor_value_info(p + "pk", f32, [rows, heads, room, size]),
                   helper.make_tensor_value_info(p + "pv", f32, [rows, heads, room, size])]
        nodes.append(helper.make_node("GroupQueryAttention", [p + "qkv", "", "", p + "pk", p + "pv", "seqlens", "total"],
                                      [p + "out", p + "k_out", p + "v_out"], domain="com.microsoft",
                                      num_heads=heads, kv_num_heads=heads))
        outputs += [helper.make_tensor_value_info(p + "out", f32, None),
                    helper.make_tensor_value_info(p + "k_out", f32, [rows, heads, room, size]),
                    helper.make_tensor_value_info(p + "v_out", f32, [rows, heads, room, size])]
    fused = helper.make_model(helper.make_graph(nodes, "gqa", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    rng = np.random.default_rng(0)
    feeds = {}
    for layer in range(layers):
        feeds[f"l{layer}_qkv"] = rng.standard_normal((rows, 1, 3 * width), np.float32)
        for x in ("pk", "pv"):
            feeds[f"l{layer}_{x}"] = rng.standard_normal((rows, heads, past, size), np.float32)
    a = ort.InferenceSession(standard.SerializeToString(), _options(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(fused.SerializeToString(), _options(), providers=["CPUExecutionProvider"])
    binding, buffers = b.io_binding(), {}
    for layer in range(layers):
        p = f"l{layer}_"
        for x, out in (("pk", "k_out"), ("pv", "v_out")):
            buf = np.zeros((rows, heads, room, size), np.float32)
            buf[:, :, :past] = feeds[p + x]
            buffers[p + x] = buf
            binding.bind_cpu_input(p + x, buf)
            binding.bind_output(p + out, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        binding.bind_cpu_input(p + "qkv", feeds[p + "qkv"])
        binding.bind_output(p + "out")
    binding.bind_cpu_input("seqlens", np.full(rows, past, np.int32))
    binding.bind_cpu_input("total", np.array([past + 1], np.int32))
    want = a.run(["l0_out"], feeds)[0]
    b.run_with_iobinding(binding)
    got = binding.get_outputs()[2].numpy()
    written = buffers["l0_pk"][:, :, past] - feeds["l0_qkv"][:, 0, width:2 * width].reshape(rows, heads, size)
    print(f"{layers} layers, {rows} rows, {heads} heads x {size}, past {past}: outputs within "
          f"{np.abs(got - want).max():.1e}, new key written in place within {np.abs(written).max():.1e}")
    _alternate({"standard ops": lambda: a.run(None, feeds), "GroupQueryAttention": lambda: b.run_with_iobinding(binding)},
               feeds)


def head(vocab: int, width: int = 768, rows: int = 3) -> None:
    """A tied LM head: the table read through a run-time Reshape (as edge-run exports it, so that
    onnxruntime does not prepack a copy), the same with the table as the streamed operand, and
    the plain constant Gemm that onnxruntime prepacks."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    table = (np.random.default_rng(0).standard_normal((vocab, width)) * 0.02).astype(np.float32)

    def model(kind: str):
        inits = [numpy_helper.from_array(table, "E")] + [numpy_helper.from_array(np.array([v], np.int64), n)
                                                         for n, v in (("one", 1), ("two", 2), ("rows", -1))]
        nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0)]
        if kind == "prepacked constant":
            nodes.append(helper.make_node("Gemm", ["x", "E"], ["y"], transB=1))
        else:
            nodes += [helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Slice", ["xs", "one", "two"], ["w"]),
                      helper.make_node("Concat", ["rows", "w"], ["es"], axis=0),
                      helper.make_node("Reshape", ["E", "es"], ["Er"])]
            if kind == "through a Reshape":
                nodes.append(helper.make_node("Gemm", ["x", "Er"], ["y"], transB=1))
            else:
                nodes += [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
                          helper.make_node("MatMul", ["Er", "xt"], ["yt"]),
                          helper.make_node("Transpose", ["yt"], ["y"], perm=[1, 0])]
        graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", width]),
                                                  helper.make_tensor_value_info("ids", TensorProto.INT64, ["r"])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                                   helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    feeds = {"x": np.random.default_rng(1).standard_normal((rows, width)).astype(np.float32),
             "ids": np.arange(rows, dtype=np.int64)}
    kinds = ("through a Reshape", "streamed as MatMul(E, h^T)", "prepacked constant")
    sessions = {k: ort.InferenceSession(model(k).SerializeToString(), _options(), providers=["CPUExecutionProvider"])
                for k in kinds}
    want = sessions[kinds[0]].run(["y"], feeds)[0]
    for k, s in sessions.items():
        print(f"  {k}: logits within {np.abs(s.run(['y'], feeds)[0] - want).max():.1e}")
    print(f"{vocab} x {width} table ({table.nbytes / 1e6:.0f} MB), {rows} rows:")
    _alternate({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, feeds, rounds=40)


def xattn(keys: int, layers: int = 12, beams: int = 3, heads: int = 8, size: int = 96) -> None:
    """Cross-attention of `layers` layers at one new token: as the decoders run it (each (head,
    beam) product against the image's one K/V copy, then Softmax, then V) against one
    GroupQueryAttention per layer with the beams as query heads sharing each head's K/V (the K/V
    as the past of one batch entry, one spare slot for the token the op appends, masked by
    attention_bias = -inf). Same outputs; not built (see docs/benchmarks.md, seventh round)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    width, rng = heads * size, np.random.default_rng(0)
    kv = [rng.standard_normal((2, 1, heads, keys, size)).astype(np.float32) for _ in range(layers)]
    x = rng.standard_normal((beams, 1, width)).astype(np.float32)

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    def build(kind: str):
        spare = int(kind == "gqa")
        ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)]
        outs, nodes, prev = [], [], "x"
        inits = [const("ax0", np.array([0], np.int64)), const("scale", np.float32(size ** -0.5)),
                 const("q_split", np.array([beams, heads, size], np.int64)),
                 const("back", np.array([beams, 1, width], np.int64))]
        if spare:
            bias = np.zeros((1, 1, 1, keys + 1), np.float32)
            bias[..., keys] = -np.inf
            inits += [const("bias", bias), const("zeros", np.zeros((1, 1, width), np.float32)),
                      const("q_flat", np.array([1, 1, beams * width], np.int64)),
                      const("o_split", np.array([heads, beams, size], np.int64))]
            ins += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                    helper.make_tensor_value_info("total", TensorProto.INT32, [])]
        for i in range(layers):
            for t in "kv":
                ins.append(helper.make_tensor_value_info(f"{t}{i}", TensorProto.FLOAT, [1, heads, keys + spare, size]))
            q = [helper.make_node("Reshape", [prev, "q_split"], [f"q3_{i}"]),
                 helper.make_node("Transpose", [f"q3_{i}"], [f"qt_{i}"], perm=[1, 0, 2])]  # (heads, beams, size)
            if kind == "gqa":
                outs += [helper.make_tensor_value_info(f"{t}{i}_out", TensorProto.FLOAT, None) for t in "kv"]
                nodes += q + [
                    helper.make_node("Reshape", [f"qt_{i}", "q_flat"], [f"q_{i}"]),
                    helper.make_node("GroupQueryAttention", [f"q_{i}", "zeros", "zeros", f"k{i}", f"v{i}", "seqlens_k",
                                                             "total", "", "", "", "bias"],
                                     [f"a_{i}", f"k{i}_out", f"v{i}_out"], domain="com.microsoft",
                                     num_heads=heads * beams, kv_num_heads=heads, scale=size ** -0.5),
                    helper.make_node("Reshape", [f"a_{i}", "o_split"], [f"a3_{i}"])]
            else:
                nodes += q + [
                    helper.make_node("Unsqueeze", [f"qt_{i}", "ax0"], [f"q4_{i}"]),  # (1, heads, beams, size)
                    helper.make_node("Transpose", [f"k{i}"], [f"kt_{i}"], perm=[0, 1, 3, 2]),
                    helper.make_node("MatMul", [f"q4_{i}", f"kt_{i}"], [f"s_{i}"]),
                    helper.make_node("Mul", [f"s_{i}", "scale"], [f"ss_{i}"]),
                    helper.make_node("Softmax", [f"ss_{i}"], [f"p_{i}"], axis=-1),
                    helper.make_node("MatMul", [f"p_{i}", f"v{i}"], [f"a4_{i}"]),
                    helper.make_node("Reshape", [f"a4_{i}", "o_split_d"], [f"a3_{i}"])]
            nodes += [helper.make_node("Transpose", [f"a3_{i}"], [f"at_{i}"], perm=[1, 0, 2]),
                      helper.make_node("Reshape", [f"at_{i}", "back"], [f"o_{i}"])]
            prev = f"o_{i}"
        if kind != "gqa":
            inits.append(const("o_split_d", np.array([heads, beams, size], np.int64)))
        nodes.append(helper.make_node("Identity", [prev], ["y"]))
        graph = helper.make_graph(nodes, kind, ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), *outs],
                                  inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        return ort.InferenceSession(model.SerializeToString(), _options(), providers=["CPUExecutionProvider"])

    plain = build("decomposed")
    plain_feeds = {"x": x, **{f"{t}{i}": kv[i][j] for i in range(layers) for j, t in enumerate("kv")}}
    gqa_session, keep = build("gqa"), []
    binding = gqa_session.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_cpu_input("seqlens_k", np.array([keys], np.int32))
    binding.bind_cpu_input("total", np.array(keys + 1, np.int32))
    for i in range(layers):
        for j, t in enumerate("kv"):
            buffer = np.zeros((1, heads, keys + 1, size), np.float32)
            buffer[:, :, :keys] = kv[i][j]
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            keep += [buffer, value]
            binding.bind_ortvalue_input(f"{t}{i}", value)
            binding.bind_ortvalue_output(f"{t}{i}_out", value)
    binding.bind_output("y")
    want = plain.run(["y"], plain_feeds)[0]
    gqa_session.run_with_iobinding(binding)
    got = binding.get_outputs()[-1].numpy()
    print(f"{layers} cross-attentions, {beams} beams x {heads} heads x {size}, {keys} keys: outputs within "
          f"{np.abs(got - want).max():.1e}")
    _alternate({"decomposed (as the decoders)": lambda: plain.run(["y"], plain_feeds),
                "GroupQueryAttention, beams as heads": lambda: gqa_session.run_with_iobinding(binding)},
               {}, rounds=40)


def rows() -> None:
    """MatMulNBits (8 bits, blocks of 256, int8 compute) chained through 12 MLP pairs
    (768 -> 3072 -> 768) at 1-4 rows: the bytes stay the same, the time does not."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng, layers, block = np.random.default_rng(0), 12, 256
    nodes, inits, prev = [], [], "x"
    for i in range(2 * layers):
        k, n = (768, 3072) if i % 2 == 0 else (3072, 768)
        w = (rng.standard_normal((n, k // block, block)) * 0.02).astype(np.float32)
        scales = (np.abs(w).max(axis=2) / 127).astype(np.float32)
        codes = (np.clip(np.rint(w / scales[..., None]), -127, 127) + 128).astype(np.uint8)
        inits += [numpy_helper.from_array(codes, f"w{i}"), numpy_helper.from_array(scales.reshape(-1), f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", [prev, f"w{i}", f"s{i}"], [f"h{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=8, block_size=block, accuracy_level=4))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "rows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 768])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), _options(), providers=["CPUExecutionProvider"])
    megabytes = sum(i.raw_data.__len__() for i in inits if i.name.startswith("w")) / 1e6
    feeds = {m: {"x": rng.standard_normal((m, 768)).astype(np.float32)} for m in (1, 2, 3, 4)}
    print(f"{2 * layers} chained MatMulNBits, {megabytes:.0f} MB of int8 weights:")
    runs = {f"{m} row(s)": (lambda f=f: session.run(None, f)) for m, f in feeds.items()}
    _alternate(runs, {}, rounds=25)


def transposed() -> None:
    """The chain of `rows` as y^T = W^T x^T: the weights as MatMulInteger's first operand, which
    onnxruntime's integer GEMM streams once for all the rows (the activations, 1-3 columns,
    quantized per call), against MatMulNBits taking the rows in pairs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng, layers = np.random.default_rng(0), 12
    c = numpy_helper.from_array
    variants = {}
    for kind in ("u8 weights x s8 activations", "s8 weights x s8 activations"):
        nodes, prev = [], "xT"
        inits = [c(np.array(127, np.float32), "c127"), c(np.array(0, np.int8), "z8"), c(np.array(128, np.uint8), "z128")]
        for i in range(2 * layers):
            k, n = (768, 3072) if i % 2 == 0 else (3072, 768)
            w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
            s = (np.abs(w).max(axis=1) / 127).astype(np.float32)
            q = np.clip(np.rint(w / s[:, None]), -127, 127)
            unsigned = kind.startswith("u8")
            inits += [c((q + 128).astype(np.uint8) if unsigned else q.astype(np.int8), f"w{i}"), c(s[:, None], f"s{i}")]
            nodes += [helper.make_node("Abs", [prev], [f"a{i}"]),
                      helper.make_node("ReduceMax", [f"a{i}"], [f"m{i}"], keepdims=0),
                      helper.make_node("Div", [f"m{i}", "c127"], [f"qs{i}"]),
                      helper.make_node("QuantizeLinear", [prev, f"qs{i}", "z8"], [f"q{i}"]),
                      helper.make_node("MatMulInteger", [f"w{i}", f"q{i}"] + (["z128"] if unsigned else []), [f"y{i}"]),
                      helper.make_node("Cast", [f"y{i}"], [f"f{i}"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f"s{i}", f"qs{i}"], [f"ss{i}"]),
                      helper.make_node("Mul", [f"f{i}", f"ss{i}"], [f"h{i}"])]
            prev = f"h{i}"
        graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("xT", TensorProto.FLOAT, [768, "m"])],
                                  [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        variants[kind] = ort.InferenceSession(model.SerializeToString(), _options(), providers=["CPUExecutionProvider"])
    runs = {}
    for kind, session in variants.items():
        for m in (1, 3):
            feed = {"xT": rng.standard_normal((768, m)).astype(np.float32)}
            runs[f"{kind}, {m} row(s)"] = lambda s=session, f=feed: s.run(None, f)
    print("24 chained products as W^T x^T (MatMulInteger), 57 MB of int8 weights; compare `rows`:")
    _alternate(runs, {}, rounds=25)


def load(path: Path, rounds: int = 3) -> None:
    """Creating a session of `path` as the runtime does (all optimizations, 2 threads), against
    the same with basic optimizations only and with weight prepacking off: where a cold start's
    load time goes."""
    import onnxruntime as ort

    def made(level, prepack: bool = True) -> float:
        so = _options()
        so.graph_optimization_level = level
        so.enable_cpu_mem_arena = False
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        start = time.perf_counter()
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return time.perf_counter() - start

    levels = ort.GraphOptimizationLevel
    times = {"all optimizations": [], "basic only": [], "no prepacking": []}
    for _ in range(rounds):
        times["all optimizations"].append(made(levels.ORT_ENABLE_ALL))
        times["basic only"].append(made(levels.ORT_ENABLE_BASIC))
        times["no prepacking"].append(made(levels.ORT_ENABLE_ALL, prepack=False))
    print(f"{path.name}: session creation, medians of {rounds}: "
          + ", ".join(f"{k} {np.median(v):.3f} s" for k, v in times.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile")
    p.add_argument("module", type=Path)
    p.add_argument("--past", type=int, default=10)
    p = sub.add_parser("captions")
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--general", action="store_true", help="one bundle: its beam-heads decoder against its general one")
    sub.add_parser("gqa").add_argument("--past", type=int, default=10)
    sub.add_parser("head").add_argument("--vocab", type=int, default=50257)
    sub.add_parser("xattn").add_argument("--keys", type=int, default=577)
    sub.add_parser("rows")
    sub.add_parser("transposed")
    sub.add_parser("load").add_argument("module", type=Path)
    args = ap.parse_args(argv)
    if args.command == "profile":
        profile(args.module, args.past)
    elif args.command == "captions":
        if len(args.bundles) != (1 if args.general else 2):
            ap.error("captions takes two bundles, or one with --general")
        captions(args.bundles, args.rounds, args.general)
    elif args.command == "gqa":
        gqa(args.past)
    elif args.command == "xattn":
        xattn(args.keys)
    elif args.command == "rows":
        rows()
    elif args.command == "transposed":
        transposed()
    elif args.command == "load":
        load(args.module)
    else:
        head(args.vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
