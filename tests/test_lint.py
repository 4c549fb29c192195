"""The TensorRT lint on real exported bundles: float and INT8 Q/DQ pass; onnxruntime-only variants,
contrib ops, If nodes, too-new opsets and uncovered dynamic axes are named node by node."""
import json
import shutil

from edgerun.lint import lint_bundle, max_opset
from edgerun.runtime.trtapi import parse_version


def _edit_manifest(src, dst, edit):
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_float_and_tensorrt_int8_bundles_pass(blip_bundle, blip_int8_bundle):
    float_report = lint_bundle(blip_bundle)
    assert float_report.ok and float_report.modules == ["vision", "cross_kv", "decoder"]
    assert float_report.target == "8.5" and "oldest supported" in float_report.target_source
    report = lint_bundle(blip_int8_bundle, "10.3")
    assert report.ok, [str(p) for p in report.problems]
    assert report.modules == ["vision@tensorrt", "cross_kv@tensorrt", "decoder@tensorrt"]
    assert report.target_source == "--trt-version"


def test_an_onnxruntime_only_variant_is_rejected_node_by_node(blip_int8_bundle, tmp_path):
    def cpu_variant_for_tensorrt(data):  # the CPU variants (U8S8, dynamic) marked for TensorRT
        for name, spec in data["modules"].items():
            spec["backends"] = ["cpu", "tensorrt"] if "@" not in name else ["ort-trt"]

    path = _edit_manifest(blip_int8_bundle, tmp_path / "bad", cpu_variant_for_tensorrt)
    report = lint_bundle(path)
    assert report.modules == ["vision", "cross_kv", "decoder"] and not report.ok
    text = [str(p) for p in report.problems]
    assert any(t.startswith("vision (vision.int8.onnx): node ") and "uint8" in t and "zero point" in t for t in text)
    # the decoders' CPU variant: block-wise (onnxruntime's MatMulNBits, a contrib op) where this
    # onnxruntime runs it, else dynamic (DynamicQuantizeLinear + MatMulInteger, U8 activations)
    decoder = [t for t in text if t.startswith("decoder (")]
    assert any("(MatMulNBits)" in t and "com.microsoft" in t for t in decoder) or \
        any("(MatMulInteger)" in t for t in decoder) and any("(DynamicQuantizeLinear)" in t for t in text)


def test_contrib_ops_if_nodes_opsets_and_uncovered_axes(blip_bundle, tmp_path):
    import onnx
    from onnx import helper

    path = _edit_manifest(blip_bundle, tmp_path / "odd", lambda d: d["modules"]["vision"]["inputs"][0]
                          .__setitem__("shape", ["frames", 3, 32, 32]))
    model = onnx.load(str(path / "cross_kv.onnx"))
    model.graph.node.append(helper.make_node("FusedMatMul", ["a", "b"], ["c"], name="fused0", domain="com.microsoft"))
    branch = helper.make_graph([], "g", [], [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None)])
    model.graph.node.append(helper.make_node("If", ["cond"], ["d"], name="branch0", then_branch=branch,
                                             else_branch=branch))
    model.opset_import[0].version = 21
    (path / "cross_kv.onnx").write_bytes(model.SerializeToString())
    from edgerun.lint import lint_module
    from edgerun.manifest import ModuleSpec

    specs = json.loads((path / "manifest.json").read_text())["modules"]
    spec = ModuleSpec.from_dict(specs["cross_kv"])
    problems = [str(p) for p in lint_module("cross_kv", path / "cross_kv.onnx", spec, parse_version("8.6"))]
    assert any("node fused0 (FusedMatMul): a com.microsoft contrib op" in p for p in problems)
    assert any("node branch0 (If)" in p for p in problems)
    assert any("opset 21; TensorRT 8.6 parses up to 17" in p for p in problems)
    vision = ModuleSpec.from_dict(specs["vision"])
    problems = [str(p) for p in lint_module("vision", path / "vision.onnx", vision, parse_version("10.3"))]
    assert problems == [("vision (vision.onnx): graph input pixel_values: dynamic axis 0 'frames' is covered by no "
                         "optimization profile (profile axes: batch, rows, past, new, seq)")]


def test_max_opset_table_is_read_by_parsed_version():
    assert max_opset(parse_version("8.6.1")) == 17 and max_opset(parse_version("10.10.0")) == 20
    assert max_opset(parse_version("11.2")) == 25
