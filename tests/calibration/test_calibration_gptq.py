"""gptq.py: error-compensating int8 rounding of pointwise and depthwise convolutions."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edgerun.calibration.collect import session
from edgerun.calibration.gptq import conv_codes, round_rows
from edgerun.calibration.nodes import find_targets, name_nodes
from edgerun.calibration.qdq import insert_qdq, quantize_weight, weight_scales
from edgerun.calibration.stats import Range


def _correlated(rng, n, c):
    """(n, c) inputs whose channels share a strong common component, as real activations do."""
    return rng.normal(size=(n, 1)) * 3 + rng.normal(size=(n, c)) * 0.3


def test_round_rows_lowers_the_output_error_of_nearest_rounding():
    rng = np.random.default_rng(0)
    x = _correlated(rng, 4000, 64)
    w = rng.normal(size=(16, 64)).astype(np.float32)
    scale = weight_scales(w, 0)
    nearest = quantize_weight(w, scale, 0)
    codes = round_rows(w, x.T @ x / len(x), scale)
    assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() <= 127
    assert np.abs(codes.astype(int) - nearest).max() <= 2  # same grid, nearby levels

    def error(c):
        return np.linalg.norm(x @ (c * scale[:, None]).T - x @ w.T)

    assert error(codes) < 0.5 * error(nearest)


@pytest.fixture()
def convs(tmp_path):
    """x (N, 16, 6, 6) -> 1x1 conv to 8 channels -> depthwise 3x3 conv (pads 1) -> y."""
    rng = np.random.default_rng(1)
    pw = numpy_helper.from_array(rng.normal(size=(8, 16, 1, 1)).astype(np.float32), "pw_w")
    dw = numpy_helper.from_array(rng.normal(size=(8, 1, 3, 3)).astype(np.float32), "dw_w")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "dw_b")
    nodes = [helper.make_node("Conv", ["x", "pw_w"], ["h"], name="pw"),
             helper.make_node("Conv", ["h", "dw_w", "dw_b"], ["y"], name="dw", group=8, kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 16, 6, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [pw, dw, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    feeds = [{"x": (rng.normal(size=(4, 1, 6, 6)) * 2 + rng.normal(size=(4, 16, 6, 6)) * 0.2).astype(np.float32)}]
    return path, model, feeds


def test_conv_codes_cover_pointwise_and_depthwise_and_beat_nearest(convs):
    path, model, feeds = convs
    name_nodes(model.graph)
    targets = find_targets(model.graph)
    codes = conv_codes(path, targets, feeds)
    assert set(codes) == {"pw_w", "dw_w"}
    assert codes["pw_w"].shape == (8, 16, 1, 1) and codes["dw_w"].shape == (8, 1, 3, 3)
    ref = session(model.SerializeToString(), path.parent, 1).run(["y"], feeds[0])[0]
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def output(weight_codes):
        """y with the weights dequantized from `weight_codes` (nearest rounding where None), activations float."""
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for init in m.graph.initializer:
            if init.name in ("pw_w", "dw_w"):
                w = weights[init.name]
                scale = weight_scales(w, 0)
                c = quantize_weight(w, scale, 0) if weight_codes is None else weight_codes[init.name]
                init.CopyFrom(numpy_helper.from_array((c * scale[:, None, None, None]).astype(np.float32), init.name))
        return session(m.SerializeToString(), path.parent, 1).run(["y"], feeds[0])[0]

    assert np.linalg.norm(output(codes) - ref) < 0.8 * np.linalg.norm(output(None) - ref)


def test_insert_qdq_writes_the_codes_given(convs):
    path, model, feeds = convs
    name_nodes(model.graph)
    targets = find_targets(model.graph)
    codes = conv_codes(path, targets, feeds)
    ranges = {t.activation: Range(10.0, -10.0, 10.0) for t in targets}
    for given in (codes, None):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        insert_qdq(m, targets, ranges, scheme="tensorrt", codes=given)
        stored = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        for name in ("pw_w", "dw_w"):
            w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))
            expected = codes[name] if given else quantize_weight(w, weight_scales(w, 0), 0)
            assert np.array_equal(stored[f"{name}_quantized"], expected)
    weights = {n: numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == n)) for n in codes}
    assert any(not np.array_equal(codes[n], quantize_weight(w, weight_scales(w, 0), 0)) for n, w in weights.items())


def test_inputs_never_seen_nonzero_keep_their_weights():
    """A channel that is 0 on every calibration input (a ReLU dead on those images) may be live on
    others: its weights are rounded to nearest, not dropped."""
    rng = np.random.default_rng(2)
    x = _correlated(rng, 2000, 8)
    x[:, 3] = 0.0
    w = rng.normal(size=(4, 8)).astype(np.float32)
    scale = weight_scales(w, 0)
    codes = round_rows(w, x.T @ x / len(x), scale)
    assert np.array_equal(codes[:, 3], quantize_weight(w, scale, 0)[:, 3]) and np.all(codes[:, 3] != 0)
