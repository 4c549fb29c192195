"""The Q/DQ graphs on the tiny BLIP: what TensorRT needs, and nothing around the float ops."""
import numpy as np
import onnx
import pytest

from edgerun.calibration.collect import StatsRunner
from edgerun.calibration.nodes import default_float, find_targets, matching, parse_patterns
from edgerun.calibration.qdq import insert_qdq
from edgerun.calibration.stats import tensor_range
from edgerun.calibration.trtcache import read_cache, write_cache

FLOAT_OPS = ("LayerNormalization", "Softmax")


@pytest.fixture(scope="module")
def vision(blip_bundle):
    path = blip_bundle / "vision.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    targets = find_targets(graph)
    runner = StatsRunner(path, ["image_embeds"], [t.activation for t in targets], threads=1)
    rng = np.random.default_rng(0)
    runner.infer({"pixel_values": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)})
    ranges = {k: tensor_range(s, "entropy") for k, s in runner.stats.items()}
    return path, graph, targets, ranges


def _qdq(path, targets, ranges, scheme):
    model = onnx.load(str(path))
    insert_qdq(model, targets, ranges, scheme=scheme)
    return model


def test_linear_layers_and_defaults(vision):
    _, graph, targets, _ = vision
    assert {t.op for t in targets} == {"MatMul", "Conv"}
    assert all(t.weight in {i.name for i in graph.initializer} for t in targets)
    kept = default_float(graph, "image_encoder", targets)
    assert list(kept) == ["/vision_model/embeddings/patch_embedding/Conv"]


def test_tensorrt_variant_is_symmetric_standard_qdq(vision):
    path, graph, targets, ranges = vision
    kept = default_float(graph, "image_encoder", targets)
    quantized = [t for t in targets if t.node not in kept]
    model = _qdq(path, quantized, ranges, "tensorrt")
    onnx.checker.check_model(model)
    nodes = model.graph.node
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}
    assert not any(n.op_type == "If" for n in nodes)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        zero = inits[n.input[2]]
        assert zero.dtype == np.int8 and not zero.any()
    consumers = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in nodes:
        if n.op_type == "DequantizeLinear":
            assert {c.op_type for c in consumers[n.output[0]]} <= {"MatMul", "Gemm", "Conv"}
    by_name = {n.name: n for n in nodes}
    produced_by_dq = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    for name in kept:
        assert not set(by_name[name].input) & produced_by_dq
    for n in nodes:
        if n.op_type in FLOAT_OPS:  # they read float tensors, not dequantized ones
            assert not set(n.input) & produced_by_dq
    weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(inits[n.input[0]].dtype == np.int8 for n in weights)
    assert all(np.abs(inits[n.input[0]]).max() <= 127 for n in weights)


def test_cpu_variant_is_u8s8(vision):
    path, _, targets, ranges = vision
    model = _qdq(path, targets[1:], ranges, "cpu")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zeros = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zeros and all(z.dtype == np.uint8 for z in zeros)


def test_keep_float_patterns(vision):
    _, _, targets, _ = vision
    patterns = parse_patterns(["*fc2*,Conv", "decoder:*fc1*"])
    names = matching("vision", targets, patterns)
    assert names and all("fc2" in n or n.endswith("Conv") for n in names)
    assert not any("fc1" in n for n in names)
    assert any("fc1" in n for n in matching("decoder", targets, patterns))


def test_trt_cache_round_trip(tmp_path, vision):
    _, _, _, ranges = vision
    path = write_cache(tmp_path / "v.cache", ranges, "entropy")
    header, scales = read_cache(path)
    assert header == "TRT-8601-EntropyCalibration2"
    assert set(scales) == set(ranges)
    for name, r in ranges.items():
        assert scales[name] == pytest.approx(r.amax / 127.0, rel=1e-6)
    line = path.read_text().splitlines()[1]
    assert len(line.rsplit(": ", 1)[1]) == 8


def _depthwise_model(bias: bool = True):
    """x (N, 4, 6, 6) -> depthwise 3x3 Conv whose kernels have a dominant centre tap (as
    EfficientNet-Lite's do), so that rounding the small taps shifts the output mean."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    w = rng.uniform(0.2, 0.45, (4, 1, 3, 3)).astype(np.float32)
    w[:, 0, 1, 1] = 30.0
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(np.array([0.5, -1.0, 0.0, 2.0], np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="dw", group=4, kernel_shape=[3, 3])
    graph = helper.make_graph([node], "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def test_bias_correction_removes_the_mean_shift_of_rounded_weights():
    import onnxruntime as ort

    from edgerun.calibration.stats import Range

    rng = np.random.default_rng(3)
    x = (3.0 + rng.standard_normal((64, 4, 6, 6))).astype(np.float32)  # inputs with a clear mean
    mean = x.mean(axis=(0, 2, 3))
    outputs = {}
    for name, means in (("float", None), ("plain", {}), ("corrected", {"x": mean})):
        model, _ = _depthwise_model()
        if means is not None:
            targets = find_targets(model.graph)
            insert_qdq(model, targets, {"x": Range(10.0, -10.0, 10.0)}, scheme="tensorrt", means=means)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs[name] = sess.run(None, {"x": x})[0]
        if name == "corrected":
            inits = {t.name for t in model.graph.initializer}
            assert model.graph.node[-1].input[2] == "dw_bias_corrected" and "b" not in inits
    shift = {k: np.abs((outputs[k] - outputs["float"]).mean(axis=(0, 2, 3))).max() for k in ("plain", "corrected")}
    assert shift["plain"] > 0.01 and shift["corrected"] < shift["plain"] / 10


def test_bias_correction_skips_a_conv_without_bias():
    model, _ = _depthwise_model(bias=False)
    insert_qdq(model, find_targets(model.graph), {"x": tensor_range_of(np.arange(-5, 6, dtype=np.float32))},
               scheme="cpu", means={"x": np.ones(4, np.float32)})
    assert len(model.graph.node[-1].input) == 2


def tensor_range_of(values):
    from edgerun.calibration.stats import TensorStats

    stats = TensorStats()
    stats.fold(values)
    return tensor_range(stats, "minmax")


def test_stats_runner_collects_per_channel_means(vision):
    path, _, targets, _ = vision
    conv = next(t for t in targets if t.op == "Conv")
    runner = StatsRunner(path, ["image_embeds"], [t.activation for t in targets], threads=1, means=[conv.activation])
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((n, 3, 32, 32)) + np.array([1.0, -2.0, 0.5])[:, None, None]).astype(np.float32)
               for n in (2, 3)]
    for pixels in batches:
        runner.infer({"pixel_values": pixels})
    want = np.concatenate(batches).mean(axis=(0, 2, 3))
    got = runner.channel_means()
    assert set(got) == {conv.activation} and np.allclose(got[conv.activation], want, atol=1e-5)


def _relu_conv_model(group: int = 1, pads=(1, 1, 1, 1), bias: bool = True, matmul_reader: bool = False):
    """x -> Relu -> Conv 3x3 (padded) [and a MatMul reading the same Relu output]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 4 // group, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["r", "w"]
    if bias:
        inits.append(numpy_helper.from_array(np.array([0.5, -1.0, 0.0, 2.0], np.float32), "b"))
        inputs.append("b")
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Conv", inputs, ["y"], name="conv", group=group, kernel_shape=[3, 3], pads=list(pads))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if matmul_reader:
        inits.append(numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "m"))
        nodes.append(helper.make_node("MatMul", ["r", "m"], ["z"], name="mm"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "relu_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("group", [1, 4])
def test_a_never_negative_input_is_quantized_centred_and_the_conv_stays_exact(group):
    from edgerun.calibration.stats import Range

    high = 6.0
    step = high / 2 / 127  # centred: 255 codes over [0, 6]
    codes = np.random.default_rng(6).integers(0, 255, (2, 4, 6, 6))
    x = (codes * step).astype(np.float32)  # inputs on the centred grid: only the weights are rounded
    model, _ = _relu_conv_model(group)
    targets = find_targets(model.graph)
    insert_qdq(model, targets, {"r": Range(high, 0.0, high)}, scheme="tensorrt")
    ops = [n.op_type for n in model.graph.node]
    assert ops.index("Sub") < ops.index("Pad") < ops.index("QuantizeLinear") < ops.index("Conv")
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert list(next(a.ints for a in conv.attribute if a.name == "pads")) == [0, 0, 0, 0]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any()  # TensorRT's form
    act_scale = next(inits[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert act_scale == pytest.approx(step)
    np.testing.assert_allclose(_run(model, x)[0], _run(_rounded_weights(group), x)[0], atol=2e-4, rtol=1e-5)


def _rounded_weights(group: int = 1):
    """The float conv of `_relu_conv_model` with its weights rounded per channel, padded with zeros."""
    model, w = _relu_conv_model(group)
    scale = np.abs(w).max(axis=(1, 2, 3), keepdims=True) / 127
    next(i for i in model.graph.initializer if i.name == "w").CopyFrom(
        onnx.numpy_helper.from_array((np.rint(w / scale) * scale).astype(np.float32), "w"))
    return model


def test_centring_halves_the_activation_error_of_relu_outputs(monkeypatch):
    from edgerun.calibration import qdq
    from edgerun.calibration.stats import Range

    x = np.random.default_rng(7).uniform(-1, 6, (8, 4, 6, 6)).astype(np.float32)
    float_out = _run(_rounded_weights(), x)[0]  # what is left is the activations' rounding
    errors = {}
    for centred in (True, False):
        model, _ = _relu_conv_model()
        with monkeypatch.context() as m:
            if not centred:
                m.setattr(qdq, "centred_tensors", lambda *a: set())
            insert_qdq(model, find_targets(model.graph), {"r": Range(6.0, 0.0, 6.0)}, scheme="tensorrt")
        errors[centred] = np.linalg.norm(_run(model, x)[0] - float_out)
    assert errors[True] < 0.6 * errors[False]  # half the step: about half the error


def test_a_tensor_is_centred_only_when_lopsided_and_every_reader_can_take_the_shift_back():
    from onnx import helper

    from edgerun.calibration.qdq import centred_tensors
    from edgerun.calibration.stats import Range

    model, _ = _relu_conv_model(matmul_reader=True)
    targets = find_targets(model.graph)
    assert {t.op for t in targets} == {"Conv", "MatMul"}
    relu = Range(6.0, 0.0, 6.0)
    assert centred_tensors(model.graph, targets, {"r": relu}) == {"r"}  # a conv and a MatMul: both can
    assert centred_tensors(model.graph, targets, {"r": Range(6.0, -0.2, 6.0)}) == {"r"}  # GELU-like
    assert centred_tensors(model.graph, targets, {"r": Range(6.0, -5.0, 6.0)}) == set()  # near symmetric
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
    assert centred_tensors(model.graph, targets, {"r": relu}) == set()  # its padding is implicit
    model, _ = _relu_conv_model(matmul_reader=True)
    insert_qdq(model, find_targets(model.graph), {"r": relu}, scheme="cpu")  # uint8 already spans [0, 6]
    assert "Sub" not in [n.op_type for n in model.graph.node]


def test_a_centred_matmul_input_gets_its_shift_back_after_the_product():
    from edgerun.calibration.stats import Range

    model, _ = _relu_conv_model(matmul_reader=True)
    step = 6.0 / 2 / 127
    x = (np.random.default_rng(8).integers(0, 255, (2, 4, 6, 6)) * step).astype(np.float32)  # on the grid
    floats = _run(_relu_conv_model(matmul_reader=True)[0], x)
    insert_qdq(model, find_targets(model.graph), {"r": Range(6.0, 0.0, 6.0)}, scheme="tensorrt")
    mm = next(n for n in model.graph.node if n.op_type == "MatMul")
    add = next(n for n in model.graph.node if mm.output[0] in n.input)
    assert add.op_type == "Add" and add.output[0] == "z"
    m = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "m_quantized"))
    s = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "m_scale"))
    wq = m * s  # the MatMul's (6, 5) weight, per output column
    np.testing.assert_allclose(_run(model, x)[1], np.maximum(x, 0) @ wq, atol=2e-4, rtol=1e-5)
    assert np.abs(floats[1] - np.maximum(x, 0) @ wq).max() > 1e-3  # the weights were rounded


@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_centred_gemm_input_gets_its_shift_back_in_the_bias(trans_b):
    from onnx import TensorProto, helper, numpy_helper

    from edgerun.calibration.stats import Range

    rng = np.random.default_rng(9)
    w = rng.standard_normal((5, 6) if trans_b else (6, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w", "b"], ["y"], name="fc", transB=trans_b)],
        "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.arange(5, dtype=np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = (rng.integers(0, 255, (7, 6)) * (4.0 / 2 / 127)).astype(np.float32)  # on the centred grid of [0, 4]
    insert_qdq(model, find_targets(model.graph), {"r": Range(4.0, 0.0, 4.0)}, scheme="tensorrt")
    ops = [n.op_type for n in model.graph.node]
    assert "Sub" in ops and "Add" not in ops  # the shift went into the Gemm's bias
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    axis = 0 if trans_b else 1
    wq = inits["w_quantized"] * np.expand_dims(inits["w_scale"], 1 - axis)
    want = x @ (wq.T if trans_b else wq) + np.arange(5)
    np.testing.assert_allclose(_run(model, x)[0], want, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_the_onnxruntime_variant_adds_its_biases_inside_the_integer_kernel(shared):
    """`shared`: the bias reaches the Add through an Identity, as the exporter shares equal
    constants (a random-weight model's zero biases)."""
    from onnx import TensorProto, helper, numpy_helper

    from edgerun.calibration.qdq import integer_matmuls
    from edgerun.calibration.stats import Range

    rng = np.random.default_rng(11)
    w, b, w2 = (rng.standard_normal(shape).astype(np.float32) for shape in ((8, 6), (6,), (8, 4)))

    def model():
        share = [helper.make_node("Identity", ["b"], ["b_shared"], name="share")] if shared else []
        graph = helper.make_graph(
            [*share, helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Add", ["b_shared" if shared else "b", "h"], ["y"], name="bias"),
             helper.make_node("MatMul", ["x", "w2"], ["z"], name="nobias")],
            "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
             helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(w2, "w2")])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        insert_qdq(m, find_targets(m.graph), {"x": Range(3.0, -1.0, 3.0)}, scheme="cpu")
        return m

    x = rng.uniform(-1, 3, (5, 8)).astype(np.float32)
    plain, fused = model(), model()
    assert integer_matmuls(fused) == 1  # the product with a bias; the other has nothing to fold
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 1 and ops.count("Add") == 0 and ops.count("MatMul") == 1
    assert "DequantizeLinear" in ops and "Identity" not in ops  # the second product still reads the dequantized input
    for got, want in zip(_run(fused, x), _run(plain, x)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # the bias added in another order: ulps
