"""Which linear layers stay float by default, on small hand-built graphs."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgerun.calibration.nodes import default_float, find_targets


def _embedder(head: bool):
    """tokens (B, T, 8) -> two residual blocks (MatMul, Add) -> LayerNorm -> [MatMul head] -> mean
    over T -> embeds: the shape of MiniLM's mean-pooled text graph (no head) or of a projected one."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}") for i in range(3)]
    inits += [numpy_helper.from_array(np.ones(8, np.float32), "gamma"), numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
              numpy_helper.from_array(np.array([1], np.int64), "axes")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["b0"], name="block0/out"),
             helper.make_node("Add", ["x", "b0"], ["r0"], name="res0"),
             helper.make_node("MatMul", ["r0", "w1"], ["b1"], name="block1/out"),
             helper.make_node("Add", ["r0", "b1"], ["r1"], name="res1"),
             helper.make_node("LayerNormalization", ["r1", "gamma", "beta"], ["n"], name="final_norm", axis=-1)]
    last = "n"
    if head:
        nodes.append(helper.make_node("MatMul", ["n", "w2"], ["p"], name="head"))
        last = "p"
    nodes.append(helper.make_node("ReduceMean", [last, "axes"], ["embeds"], name="pool", keepdims=0))
    graph = helper.make_graph(nodes, "embedder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 8])],
                              [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, ["B", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model.graph


def test_the_head_walk_stops_at_the_final_norm():
    graph = _embedder(head=False)
    targets = find_targets(graph)
    assert [t.node for t in targets] == ["block0/out", "block1/out"]
    assert default_float(graph, "text_embedder", targets) == {}  # residual branches are no head


def test_a_projection_after_the_norm_is_the_head():
    graph = _embedder(head=True)
    targets = find_targets(graph)
    assert default_float(graph, "text_embedder", targets) == {"head": "output head"}
    assert default_float(graph, "image_encoder", targets) == {}  # no head rule for encoders
