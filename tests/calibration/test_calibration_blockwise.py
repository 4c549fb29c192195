"""The decoders' block-wise INT8 CPU variant: MatMulNBits layers, one uint8 table for a tied head."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgerun.calibration.blockwise import (
    block_size,
    decoder_scheme,
    dequantize_blocks,
    fold_biases,
    merge_parallel,
    quantize_blocks,
    quantize_blockwise_weights,
    supported,
)

pytestmark = pytest.mark.skipif(not supported(), reason="block-wise INT8 needs onnxruntime >= 1.23")


def test_blocks_round_to_half_a_step_and_pad_what_does_not_divide():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 40)).astype(np.float32)
    w[1, :16] = 0.0  # a zero block: scale 1, values 0
    w[2, 3] = 50.0  # an outlier only widens its own block's step
    block = block_size(40)
    assert block == 16 and block_size(768) == 256 and block_size(640) == 128 and block_size(96) == 32
    q, scales = quantize_blocks(w, block)
    assert q.dtype == np.uint8 and q.shape == (5, 3, 16) and scales.shape == (5, 3)
    assert scales[1, 0] == 1.0 and np.all(q[1, 0] == 128)
    back = dequantize_blocks(q, scales, 40)
    step = np.repeat(scales, 16, axis=1)[:, :40]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    assert np.abs(back[2, 16:] - w[2, 16:]).max() < 0.02  # the outlier's block is the first one
    assert q.min() >= 1  # symmetric: -127..127 around 128


def _tied_graph(vocab=50, hidden=40, out=24):
    """ids -> embedding Gather (tied) -> MatMul (hidden x out) -> MatMul (out x hidden) -> head Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    emb = rng.standard_normal((vocab, hidden)).astype(np.float32)
    w1 = (rng.standard_normal((hidden, out)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((out, hidden)) * 0.2).astype(np.float32)
    bias = rng.standard_normal(vocab).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "w2"], ["h2"], name="fc2"),
             helper.make_node("Reshape", ["h2", "flat"], ["h3"], name="flatten"),
             helper.make_node("Gemm", ["h3", "emb", "bias"], ["logits"], name="head", transB=1)]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((emb, "emb"), (w1, "w1"), (w2, "w2"), (bias, "bias"),
                                                   (np.array([-1, hidden], np.int64), "flat"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), emb


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_the_tied_table_is_one_uint8_copy_the_gather_and_the_head_both_read():
    from edgerun.calibration.nodes import find_targets

    model, emb = _tied_graph()
    ids = np.array([[3, 7, 49], [0, 1, 2]], np.int64)
    ref_logits, ref_x = _session(model).run(None, {"ids": ids})
    n = quantize_blockwise_weights(model, find_targets(model.graph))
    assert n == 3
    names = [i.name for i in model.graph.initializer]
    assert "emb" not in names and names.count("emb_q8") == 1
    readers = sorted(nd.op_type for nd in model.graph.node if "emb_q8" in nd.input)
    assert readers == ["GatherBlockQuantized", "MatMulNBits"]
    logits, x = _session(model).run(None, {"ids": ids})
    q = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "emb_q8"))
    s = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "emb_q8_scales"))
    table = dequantize_blocks(q, s, emb.shape[1])
    np.testing.assert_array_equal(x, table[ids])  # rows gathered and unpadded exactly (40 = 16 + 16 + 8)
    assert np.abs(x - ref_x).max() < np.abs(emb).max() / 127
    assert logits.shape == ref_logits.shape
    assert np.corrcoef(logits.ravel(), ref_logits.ravel())[0, 1] > 0.999
    assert (logits.argmax(1) == ref_logits.argmax(1)).mean() >= 0.9


def test_a_decoder_rewritten_blockwise_follows_the_float_one(blip_bundle, tmp_path):
    import json
    from collections import Counter

    from edgerun.calibration.decoder import write_decoder
    from edgerun.calibration.nodes import calibration_view, find_targets

    spec = json.loads((blip_bundle / "manifest.json").read_text())["modules"]["decoder"]
    path = blip_bundle / spec["file"]
    graph = onnx.load(str(path), load_external_data=False).graph
    calibration_view(graph)  # the tied head's table as its weight: a target like the other layers
    targets = find_targets(graph)
    assert write_decoder(path, tmp_path / "d.onnx", targets, scheme="blockwise") == len(targets)
    rewritten = onnx.load(str(tmp_path / "d.onnx"), load_external_data=False)
    ops = [nd.op_type for nd in rewritten.graph.node]
    readers = Counter(t.activation for t in targets)
    merged = [nd for nd in rewritten.graph.node if nd.name.endswith("_merged")]
    assert len(merged) == sum(c > 1 for c in readers.values()) > 0
    assert all("query" in nd.name and nd.output[0] not in readers for nd in merged)  # each self-attention's q, k, v
    assert ops.count("MatMulNBits") == len(readers) and "MatMulInteger" not in ops
    assert any(o.domain == "com.microsoft" for o in rewritten.opset_import)
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in spec["inputs"]:
        dims = [d if isinstance(d, int) else {"rows": 3, "new": 1, "past": 4, "batch": 1}.get(d, 5)
                for d in inp["shape"]]
        feeds[inp["name"]] = (rng.integers(5, 90, dims).astype(np.int64) if inp["dtype"] == "int64"
                              else rng.standard_normal(dims).astype(np.float32))
    run = lambda p, f: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["logits"], f)[0]
    ref, got = run(path, feeds), run(tmp_path / "d.onnx", feeds)
    cos = np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99
    other = dict(feeds, input_ids=feeds["input_ids"][::-1].copy())
    assert not np.allclose(run(tmp_path / "d.onnx", other), got)  # the int8 embedding follows the ids


def test_auto_picks_blockwise_only_where_onnxruntime_runs_it(monkeypatch):
    import onnxruntime

    assert supported("1.23.0") and supported("1.32.1") and not supported("1.22.1") and not supported("1.16.3")
    assert decoder_scheme("dynamic") == "dynamic"
    monkeypatch.setattr(onnxruntime, "__version__", "1.22.0")
    assert decoder_scheme("auto") == "dynamic"
    monkeypatch.setattr(onnxruntime, "__version__", "1.23.2")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert decoder_scheme("auto") == "blockwise"
    monkeypatch.setattr("platform.machine", lambda: "aarch64")  # not measured there
    assert decoder_scheme("auto") == "dynamic" and decoder_scheme("blockwise") == "blockwise"


def test_a_module_needing_a_newer_onnxruntime_is_refused_with_the_fix():
    from edgerun.errors import BundleError
    from edgerun.manifest import ModuleSpec, TensorSpec
    from edgerun.runtime.variants import check_requirements

    spec = ModuleSpec(file="decoder.int8.onnx", inputs=(TensorSpec("input_ids", "int64", ("rows", "new")),),
                      outputs=(TensorSpec("logits", "float32", ("rows", 10)),),
                      extra={"requires": {"onnxruntime": "1.23"}})
    check_requirements("decoder", spec, {"onnxruntime": "1.23.0"})
    check_requirements("decoder", spec, {"onnxruntime": "1.30.1"})
    with pytest.raises(BundleError, match=r"needs onnxruntime >= 1.23; this machine has 1.19.2.*--decoder-int8 dynamic"):
        check_requirements("decoder", spec, {"onnxruntime": "1.19.2"})
    check_requirements("decoder", ModuleSpec(file="d.onnx", inputs=spec.inputs, outputs=spec.outputs),
                       {"onnxruntime": "1.0"})  # nothing required: nothing checked


@pytest.mark.parametrize("scheme", ["blockwise", "dynamic"])
def test_gpt2_style_gemms_without_transb_are_quantized_too(scheme):
    """GPT-2's Conv1D layers export as Gemm(x, W (in, out), b): both schemes rewrite them."""
    from onnx import TensorProto, helper, numpy_helper

    from edgerun.calibration.blockwise import quantize_blockwise_weights
    from edgerun.calibration.decoder import quantize_dynamic_weights
    from edgerun.calibration.nodes import find_targets

    rng = np.random.default_rng(3)
    w1, b1 = (rng.standard_normal((64, 96)) * 0.1).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    w2 = (rng.standard_normal((96, 32)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="c_fc"),
             helper.make_node("Gemm", ["h", "w2"], ["y"], name="c_proj", transB=0)]
    graph = helper.make_graph(nodes, "conv1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ref = _session(model).run(None, {"x": x})[0]
    rewrite = quantize_blockwise_weights if scheme == "blockwise" else quantize_dynamic_weights
    assert rewrite(model, find_targets(model.graph)) == 2
    assert not {"w1", "w2"} & {i.name for i in model.graph.initializer}  # no float weight left
    assert "Gemm" not in {n.op_type for n in model.graph.node}
    got = _session(model).run(None, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.03


def test_products_sharing_one_bias_are_merged_and_the_bias_kept_for_its_other_readers():
    """An exporter shares equal initializers (a random model's zero biases) through Identity nodes."""
    from onnx import TensorProto, helper, numpy_helper

    from edgerun.calibration.nodes import find_targets

    rng = np.random.default_rng(8)
    ws = [(rng.standard_normal((16, 8)) * 0.1).astype(np.float32) for _ in range(2)]
    zero = np.zeros(8, np.float32)
    nodes = [helper.make_node("Identity", ["zero"], [f"z{i}"], name=f"share{i}") for i in range(2)]
    nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"p{i}"], name=f"proj{i}") for i in range(2)]
    nodes += [helper.make_node("Add", [f"p{i}", f"z{i}"], [f"y{i}"], name=f"bias{i}") for i in range(2)]
    nodes += [helper.make_node("Add", ["y0", "zero"], ["y2"], name="other_reader")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", 16])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2")],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)]
                              + [numpy_helper.from_array(zero, "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": rng.standard_normal((3, 16)).astype(np.float32)}
    ref = _session(model).run(None, x)
    quantize_blockwise_weights(model, find_targets(model.graph))
    product = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 1 and product.input[5].endswith("_bias")
    assert "zero" in {i.name for i in model.graph.initializer}  # still read by other_reader
    for got, want in zip(_session(model).run(None, x), ref):
        assert np.abs(got - want).max() < 0.02


def _parallel_graph(widths=(24, 24, 40), hidden=64, biases=False):
    """x -> LayerNorm-free q/k/v: three MatMuls of one input (and a fourth reading their sum); with
    `biases`, each of the three adds a vector of its width, as a Linear layer exports (bias + x W)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    ws = [(rng.standard_normal((hidden, w)) * 0.1).astype(np.float32) for w in widths]
    bs = [rng.standard_normal(w).astype(np.float32) for w in widths]
    down = (rng.standard_normal((widths[0], hidden)) * 0.1).astype(np.float32)
    products = [f"p{i}" if biases else f"y{i}" for i in range(len(widths))]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [p], name=f"proj{i}") for i, p in enumerate(products)]
    if biases:
        nodes += [helper.make_node("Add", [f"b{i}", p], [f"y{i}"], name=f"bias{i}") for i, p in enumerate(products)]
    nodes += [helper.make_node("Add", ["y0", "y1"], ["s"], name="sum"),
              helper.make_node("MatMul", ["s", "down"], ["z"], name="down")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y0", "y1", "y2", "z")]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)] + [numpy_helper.from_array(down, "down")]
    if biases:
        inits += [numpy_helper.from_array(b, f"b{i}") for i, b in enumerate(bs)]
    graph = helper.make_graph(nodes, "parallel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", hidden])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_products_of_one_input_are_merged_into_one_with_the_same_outputs(monkeypatch):
    from edgerun.calibration import blockwise
    from edgerun.calibration.nodes import find_targets

    x = {"x": np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)}
    separate, merged = _parallel_graph(), _parallel_graph()
    with monkeypatch.context() as m:
        m.setattr(blockwise, "merge_parallel", lambda model: 0)
        assert quantize_blockwise_weights(separate, find_targets(separate.graph)) == 4
    assert quantize_blockwise_weights(merged, find_targets(merged.graph)) == 4
    ops = [n.op_type for n in merged.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("Split") == 1  # proj0-2 as one, down alone
    product = next(n for n in merged.graph.node if n.name.endswith("_merged"))
    assert next(a.i for a in product.attribute if a.name == "N") == 24 + 24 + 40
    assert not {"w0_q8", "w1_q8", "w2_q8"} & {i.name for i in merged.graph.initializer}  # the tables held once
    for got, want in zip(_session(merged).run(None, x), _session(separate).run(None, x)):
        np.testing.assert_array_equal(got, want)  # each column is the same product as before


def test_a_table_read_elsewhere_is_not_merged():
    from onnx import helper

    model, _ = _tied_graph()
    from edgerun.calibration.nodes import find_targets

    quantize_blockwise_weights(model, find_targets(model.graph))
    # the head reads the tied table, the Gather too: and a second product of the head's input would
    # have to copy the table into a merged one, so it stays on its own
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] == "emb_q8")
    model.graph.node.append(helper.make_node("MatMulNBits", [head.input[0], "emb_q8", head.input[2]], ["again"],
                                             domain="com.microsoft", **{a.name: helper.get_attribute_value(a)
                                                                        for a in head.attribute}))
    assert merge_parallel(model) == 0


def test_bias_adds_move_into_the_products_and_merge_with_them(monkeypatch):
    from edgerun.calibration import blockwise
    from edgerun.calibration.nodes import find_targets

    x = {"x": np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)}
    added, folded = _parallel_graph(biases=True), _parallel_graph(biases=True)
    with monkeypatch.context() as m:  # the Adds kept, nothing merged: the reference
        m.setattr(blockwise, "fold_biases", lambda model: 0)
        m.setattr(blockwise, "merge_parallel", lambda model: 0)
        quantize_blockwise_weights(added, find_targets(added.graph))
    assert quantize_blockwise_weights(folded, find_targets(folded.graph)) == 4
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("Add") == 1 and ops.count("MatMulNBits") == 2  # only the sum of two outputs is left
    product = next(n for n in folded.graph.node if n.name.endswith("_merged"))
    assert list(product.input[3:5]) == ["", ""] and product.input[5].endswith("_merged_bias")
    bias = next(i for i in folded.graph.initializer if i.name == product.input[5])
    assert list(bias.dims) == [24 + 24 + 40]
    assert not {"b0", "b1", "b2"} & {i.name for i in folded.graph.initializer}
    for got, want in zip(_session(folded).run(None, x), _session(added).run(None, x)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # the same sums, up to an ulp


def test_only_an_add_of_a_constant_vector_of_the_products_width_is_folded():
    from onnx import TensorProto, helper, numpy_helper

    from edgerun.calibration.nodes import find_targets

    def graph(other_shape, other_is_input=False, through_identity=False):
        rng = np.random.default_rng(5)
        w = (rng.standard_normal((16, 8)) * 0.1).astype(np.float32)
        nodes = [helper.make_node("Identity", ["c"], ["c_shared"], name="share")] if through_identity else []
        nodes += [helper.make_node("MatMul", ["x", "w"], ["p"], name="proj"),
                  helper.make_node("Add", ["p", "c_shared" if through_identity else "c"], ["y"], name="add")]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", 16])]
        inits = [numpy_helper.from_array(w, "w")]
        if other_is_input:
            inputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [8]))
        else:
            inits.append(numpy_helper.from_array(rng.standard_normal(other_shape).astype(np.float32), "c"))
        g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        quantize_blockwise_weights(model, find_targets(model.graph))
        return [n.op_type for n in model.graph.node]

    assert graph((8,)) == ["MatMulNBits"]
    assert graph((8,), through_identity=True) == ["Identity", "MatMulNBits"]  # a shared bias, read directly
    assert graph((3, 8)) == ["MatMulNBits", "Add"]  # a matrix: not a bias
    assert graph((1,)) == ["MatMulNBits", "Add"]  # broadcast scalar: not the op's (N,) bias
    assert graph(None, other_is_input=True) == ["MatMulNBits", "Add"]  # not a constant
    assert fold_biases(onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))) == 0
