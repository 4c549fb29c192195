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
