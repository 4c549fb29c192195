"""An exported encoder's onnxruntime CPU variant: self-attentions fused into MultiHeadAttention."""
import json

import numpy as np
import onnx

import edgerun
from edgerun.export.cpu_variants import output_error
from edgerun.manifest import Manifest
from edgerun.runtime.roofline import count_flops
from edgerun.runtime.variants import select_module


def test_the_vision_encoder_gets_fused_attention_for_the_cpu(blip_bundle):
    manifest = json.loads((blip_bundle / "manifest.json").read_text())
    vision, fused = manifest["modules"]["vision"], manifest["modules"]["vision@cpu"]
    assert fused["file"] == "vision.cpu.onnx" and fused["backends"] == ["cpu"]
    assert "cpu" not in vision["backends"] and {"cuda", "ort-trt"} <= set(vision["backends"])
    assert fused["extra"]["variant_of"] == "vision" and fused["external_data"] == vision["external_data"]
    ops = [n.op_type for n in onnx.load(str(blip_bundle / "vision.cpu.onnx"), load_external_data=False).graph.node]
    standard = [n.op_type for n in onnx.load(str(blip_bundle / "vision.onnx"), load_external_data=False).graph.node]
    assert ops.count("MultiHeadAttention") == standard.count("Softmax") > 0 and "Softmax" not in ops
    parsed = Manifest.from_dict(manifest)
    assert select_module(parsed, "vision", "cpu")[0] == "vision@cpu"
    assert select_module(parsed, "vision", "cuda")[0] == "vision"
    cross = onnx.load(str(blip_bundle / manifest["modules"]["cross_kv@cpu"]["file"]), load_external_data=False)
    assert "MultiHeadAttention" not in [n.op_type for n in cross.graph.node]  # no self-attention to fuse there


def test_the_fused_encoder_gives_the_same_outputs_and_the_same_flops(blip_bundle):
    graph = (blip_bundle / "vision.cpu.onnx").read_bytes()
    assert output_error(blip_bundle / "vision.onnx", graph) < 1e-5
    spec = json.loads((blip_bundle / "manifest.json").read_text())["modules"]["vision"]["inputs"][0]
    pixels = {spec["name"]: np.random.default_rng(0).standard_normal(
        [d if isinstance(d, int) else 1 for d in spec["shape"]]).astype(np.float32)}
    # the roofline counts MultiHeadAttention's products as it counts the MatMuls they replace
    assert count_flops(blip_bundle / "vision.cpu.onnx", pixels) == count_flops(blip_bundle / "vision.onnx", pixels)


def test_captions_through_the_fused_encoder_are_the_standard_graphs(blip_bundle):
    from edgerun.runtime.onnxrt import OnnxRuntimeRunner

    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    fused, standard = edgerun.load(blip_bundle, threads=1), edgerun.load(blip_bundle, threads=1)
    assert fused.runner("vision").path.name == "vision.cpu.onnx"  # what the CPU loads by default
    standard._runners["vision"] = OnnxRuntimeRunner(blip_bundle / "vision.onnx", threads=1)
    a, b = (m.caption(image, num_beams=2, max_new_tokens=6) for m in (fused, standard))
    assert a.token_ids == b.token_ids and abs(a.score - b.score) < 1e-4
