"""The onnxruntime CPU variant of decoders: dynamic INT8 linear layers, and the tied LM head."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def decoder(blip_bundle):
    import json

    manifest = json.loads((blip_bundle / "manifest.json").read_text())
    return blip_bundle / manifest["modules"]["decoder"]["file"], manifest["modules"]["decoder"]


def _targets(path):
    from edgerun.calibration.nodes import calibration_view, default_float, find_targets

    graph = onnx.load(str(path), load_external_data=False).graph
    calibration_view(graph)
    targets = find_targets(graph)
    return targets, default_float(graph, "decoder", targets)


def _feeds(spec, rows=3, past=4, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in spec["inputs"]:
        name, shape = inp["name"], inp["shape"]
        dims = [d if isinstance(d, int) else {"rows": rows, "new": 1, "past": past, "batch": 1}.get(d, 5)
                for d in shape]
        if inp["dtype"] == "int64":
            feeds[name] = rng.integers(5, 90, dims).astype(np.int64)
        else:
            feeds[name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _run(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


def _cosine(a, b):
    a, b = a.ravel(), b.ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_the_tied_head_becomes_one_int8_table(decoder, tmp_path):
    from edgerun.calibration.decoder import write_dynamic

    path, spec = decoder
    targets, kept = _targets(path)
    head = next(t for t in targets if t.node in kept)
    assert head.op == "Gemm"
    n = write_dynamic(path, tmp_path / "d.onnx", targets)
    assert n == len(targets)
    model = onnx.load(str(tmp_path / "d.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert head.weight not in inits  # the float table is gone, for the head and the embedding
    table = inits[f"{head.weight}_quantized"]
    vocab_hidden = onnx.load(str(path)).graph
    float_shape = next(tuple(i.dims) for i in vocab_hidden.initializer if i.name == head.weight)
    assert table.dtype == np.int8 and table.shape == float_shape[::-1]  # stored once, (hidden, vocab)
    same_size = [k for k, v in inits.items() if v.size == table.size and v.dtype == np.int8]
    assert same_size == [f"{head.weight}_quantized"]
    gathers = [nd for nd in model.graph.node if nd.op_type == "Gather" and nd.input[0] == table_name(head)]
    assert gathers, "the token embedding reads the int8 table"

    feeds = _feeds(spec)
    ref, got = _run(path, feeds), _run(tmp_path / "d.onnx", feeds)
    assert got.shape == ref.shape
    assert _cosine(ref, got) > 0.95
    # other tokens in, other logits out: the int8 embedding really follows the ids
    other = dict(feeds, input_ids=feeds["input_ids"][::-1].copy())
    assert not np.allclose(_run(tmp_path / "d.onnx", other), got)
    assert _cosine(_run(path, other), _run(tmp_path / "d.onnx", other)) > 0.95


def table_name(head):
    return f"{head.weight}_quantized"


def test_without_the_head_the_table_stays_float_and_single(decoder, tmp_path):
    from edgerun.calibration.decoder import write_dynamic

    path, spec = decoder
    targets, kept = _targets(path)
    n = write_dynamic(path, tmp_path / "d.onnx", [t for t in targets if t.node not in kept])
    assert n == len(targets) - len(kept)
    model = onnx.load(str(tmp_path / "d.onnx"))
    head = next(t for t in targets if t.node in kept)
    names = [i.name for i in model.graph.initializer]
    assert names.count(head.weight) == 1 and f"{head.weight}_quantized" not in names
    assert [nd.op_type for nd in model.graph.node if nd.name == head.node] == ["Gemm"]
    feeds = _feeds(spec, seed=1)
    assert _cosine(_run(path, feeds), _run(tmp_path / "d.onnx", feeds)) > 0.95


def test_a_gemm_with_scaling_stays_float():
    from onnx import TensorProto, helper, numpy_helper

    from edgerun.calibration.decoder import rewritable
    from edgerun.calibration.nodes import find_targets

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="scaled", transB=1, alpha=0.5),
             helper.make_node("Gemm", ["x", "w2"], ["z"], name="plain", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
                              [w, numpy_helper.from_array(np.ones((4, 3), np.float32), "w2")])
    assert [t.node for t in rewritable(graph, find_targets(graph))] == ["plain"]


def test_variants_share_one_copy_of_their_int8_weights(tmp_path):
    """The TensorRT variant reads the weights it has in common with the CPU variant from the CPU
    variant's data file; what differs stays in its own."""
    import os

    from onnx import TensorProto, helper, numpy_helper

    from edgerun.calibration.shared import share_weights

    rng = np.random.default_rng(0)
    common = rng.integers(-127, 127, (64, 64)).astype(np.int8)
    def save(name, other):
        inits = [numpy_helper.from_array(common, "w_quantized"), numpy_helper.from_array(other, "only")]
        nodes = [helper.make_node("Cast", ["w_quantized"], ["a"], to=TensorProto.FLOAT),
                 helper.make_node("Cast", ["only"], ["b"], to=TensorProto.FLOAT),
                 helper.make_node("MatMul", ["x", "a"], ["y0"]), helper.make_node("MatMul", ["y0", "b"], ["y"])]
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], inits)
        path = tmp_path / f"{name}.onnx"
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                        save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data",
                        size_threshold=16)
        return path

    cpu = save("cpu", rng.integers(-127, 127, (64, 64)).astype(np.int8))
    trt = save("trt", rng.integers(-127, 127, (64, 64)).astype(np.int8))  # differs: stays its own
    import onnxruntime as ort

    x = {"x": rng.standard_normal((1, 64)).astype(np.float32)}
    before = ort.InferenceSession(str(trt), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert share_weights(cpu, trt) == common.nbytes
    model = onnx.load(str(trt), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data}["location"] for t in model.graph.initializer}
    assert where == {"w_quantized": "cpu.onnx.data", "only": "trt.onnx.data"}
    assert os.path.getsize(tmp_path / "trt.onnx.data") == common.nbytes  # only its own weight left
    after = ort.InferenceSession(str(trt), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(before, after)
