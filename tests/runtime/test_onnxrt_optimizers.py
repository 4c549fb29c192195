"""Which onnxruntime rewrites the runner leaves out, and why (a Q/DQ 2-D MatMul + Add must stay integer)."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _qdq_linear(path):
    """x (m, 16) -> Q/DQ -> MatMul with a DQ'd int8 weight -> + bias: GPT-2's Conv1D in a U8S8 variant."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 127, (16, 8)).astype(np.int8), "w_q"),
             numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(8, np.int8), "w_z"),
             numpy_helper.from_array(np.array(0.02, np.float32), "x_s"),
             numpy_helper.from_array(np.array(128, np.uint8), "x_z"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["p"]), helper.make_node("Add", ["p", "b"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _optimized_ops(path, tmp_path, disabled):
    from edgerun.runtime.onnxrt import session_options

    so = session_options(1)
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_a_qdq_2d_matmul_with_bias_stays_an_integer_kernel(tmp_path):
    from edgerun.runtime.onnxrt import DISABLED_OPTIMIZERS

    path = _qdq_linear(tmp_path / "m.onnx")
    fused_first = _optimized_ops(path, tmp_path, [])
    assert "Gemm" in fused_first and "DequantizeLinear" in fused_first  # the weights dequantized per call
    ours = _optimized_ops(path, tmp_path, list(DISABLED_OPTIMIZERS))
    assert "MatMulIntegerToFloat" in ours and "Gemm" not in ours


def test_the_runner_creates_its_sessions_without_them(tmp_path, monkeypatch):
    from edgerun.runtime import onnxrt

    seen = {}
    real = ort.InferenceSession

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    runner = onnxrt.OnnxRuntimeRunner(_qdq_linear(tmp_path / "m.onnx"), threads=1)
    assert seen["disabled_optimizers"] == list(onnxrt.DISABLED_OPTIMIZERS)
    out = runner.infer({"x": np.ones((2, 16), np.float32)})
    assert out["y"].shape == (2, 8)
