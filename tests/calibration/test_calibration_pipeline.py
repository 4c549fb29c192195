"""calibrate() end to end on the tiny BLIP caption bundle."""
import json

import cv2
import numpy as np
import pytest

import edgerun
from edgerun.calibration.pipeline import AccuracyDropError, CalibrationOptions, calibrate
from edgerun.calibration.trtcache import read_cache
from edgerun.errors import BundleError, OptionError
from edgerun.runtime.variants import select_module

FAST = {"samples": 6, "eval_samples": 8, "decoder_samples": 4}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel"):
        cv2.imwrite(str(folder / f"{name}.jpg"), getattr(data, name)()[..., :3][..., ::-1])
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(folder / f"noise{i}.png"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return folder


@pytest.fixture(scope="module")
def calibrated(blip_bundle, photos, tmp_path_factory):
    """One INT8 bundle per method, made once for the module."""
    out = {}
    for method in ("entropy", "minmax", "percentile", "auto"):
        dest = tmp_path_factory.mktemp("int8") / method
        report = calibrate(blip_bundle, str(photos), dest, CalibrationOptions(method=method, **FAST))
        out[method] = (dest, report)
    return out


def test_every_method_yields_a_bundle_that_runs(calibrated, photos):
    image = str(photos / "astronaut.jpg")
    for method, (path, report) in calibrated.items():
        model = edgerun.load(path)
        caption = model.caption(image)
        assert caption.text and caption.token_ids
        q = model.manifest.quantization
        assert q["method"] == method and q["samples"] == 6 and q["seed"] == 0
        assert {"vision", "vision@tensorrt", "cross_kv", "cross_kv@tensorrt", "decoder", "decoder@tensorrt"} \
            <= set(model.manifest.modules)
        assert all(model.manifest.modules[n].precision == "int8" for n in ("vision", "decoder@tensorrt"))
        assert model.manifest.tasks["caption"].modules == ("vision", "cross_kv", "decoder")
        reports = {r["variant"]: r for r in q["accuracy"]["variants"]}
        assert set(reports) == {"cpu", "tensorrt"} and q["accuracy"]["held_out"] == 8
        metrics = {m["metric"]: m for m in reports["cpu"]["metrics"]}
        assert {"exact_caption_agreement", "logits_cosine", "next_token_agreement"} <= set(metrics)
        assert 0.9 < metrics["logits_cosine"]["value"] <= 1.0
        assert report.accuracy[0].variant == "cpu"
        assert q["modules"]["decoder"]["kept_float"] == {"/Gemm": "output head"}


def test_methods_give_different_scales(calibrated):
    caches = {m: read_cache(path / "vision.trt-calib.cache")[1] for m, (path, _) in calibrated.items()}
    assert caches["entropy"] != caches["minmax"] != caches["percentile"]
    assert all(caches["entropy"][k] <= caches["minmax"][k] * (1 + 1e-6) for k in caches["minmax"])


def test_auto_picks_a_method_per_tensor(calibrated):
    """auto: each tensor's range is one of the three methods' ranges for it, and the manifest counts
    which method served how many tensors."""
    q = json.loads((calibrated["auto"][0] / "manifest.json").read_text())["quantization"]
    assert q["method"] == "auto" and q["auto_method"]["candidates"] == ["percentile", "minmax", "entropy"]
    chosen = {}
    for module in ("vision", "cross_kv", "decoder"):
        caches = {m: read_cache(calibrated[m][0] / f"{module}.trt-calib.cache")[1]
                  for m in ("auto", "entropy", "minmax", "percentile")}
        counts = q["modules"][module]["activation_methods"]
        assert sum(counts.values()) == len(caches["auto"])
        for tensor, value in caches["auto"].items():
            matches = {m for m in ("entropy", "minmax", "percentile") if caches[m][tensor] == value}
            assert matches, tensor
            for m in matches:
                chosen[m] = chosen.get(m, 0) + 1
        for method, n in counts.items():
            assert n <= chosen.get(method, 0)
    assert len({m for module in q["modules"].values() for m in module["activation_methods"]}) >= 2


def test_variants_are_selected_per_backend(calibrated):
    path, _ = calibrated["entropy"]
    manifest = edgerun.load(path).manifest
    assert select_module(manifest, "vision", "cpu")[0] == "vision"
    assert select_module(manifest, "vision", "ort-trt")[0] == "vision@tensorrt"
    assert select_module(manifest, "decoder", "tensorrt")[1].file == "decoder.int8-tensorrt.onnx"
    assert select_module(manifest, "vision", "rocm")[0] == "vision"
    # onnxruntime's variant runs self-attention as its fused MultiHeadAttention; TensorRT's keeps standard ops
    import onnx

    written = manifest.quantization["modules"]["vision"]["variants"]
    layers = sum(n.op_type == "Softmax" for n in onnx.load(str(path / "vision.int8-tensorrt.onnx")).graph.node)
    assert written["vision"]["fused_attention"] == layers > 0 and "fused_attention" not in written["vision@tensorrt"]
    ops = [n.op_type for n in onnx.load(str(path / "vision.int8.onnx")).graph.node]
    assert ops.count("MultiHeadAttention") == layers and "Softmax" not in ops


def test_a_quantized_bundle_is_refused(calibrated, photos, tmp_path):
    path, _ = calibrated["minmax"]
    with pytest.raises(BundleError, match="already quantized"):
        calibrate(path, str(photos), tmp_path / "again", CalibrationOptions(**FAST))


def test_max_drop_failure_leaves_no_bundle(blip_bundle, photos, tmp_path):
    dest = tmp_path / "strict"
    with pytest.raises(AccuracyDropError, match="exceeds --max-drop 0.0.*No bundle was written"):
        calibrate(blip_bundle, str(photos), dest, CalibrationOptions(max_drop=0.0, **FAST))
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_calibration_leaves_no_bundle(blip_bundle, photos, tmp_path):
    def interrupt(msg):
        if msg.startswith("held-out: cpu"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(blip_bundle, str(photos), tmp_path / "out", CalibrationOptions(**FAST), progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_keep_float_and_sensitivity(blip_bundle, photos, tmp_path):
    options = CalibrationOptions(keep_float=("*fc2*", "decoder:*/intermediate/*"), sensitivity=True, **FAST)
    report = calibrate(blip_bundle, str(photos), tmp_path / "out", options)
    q = json.loads((tmp_path / "out" / "manifest.json").read_text())["quantization"]
    kept = q["modules"]["vision"]["kept_float"]
    assert any("fc2" in n for n in kept) and all(v != "output head" for v in kept.values())
    assert any("/intermediate/" in n for n in q["modules"]["decoder"]["kept_float"])
    errors = [e.error for e in report.sensitivity]
    assert errors == sorted(errors, reverse=True) and len(errors) == len(q["sensitivity"])
    assert not any("fc2" in e.node for e in report.sensitivity)


def test_auto_keeps_the_fewest_sensitive_layers_float(blip_bundle, photos, tmp_path, monkeypatch):
    """The held-out metric passes once five layers are float: --auto keeps exactly the five worst of
    the ranking (doubling 0, 1, 2, 4, 8, then bisecting 6, 5), where growing the float set by
    doubling alone would have stopped at eight."""
    from edgerun.calibration import pipeline
    from edgerun.calibration.accuracy import AccuracyReport, Metric

    seen = []

    def evaluate(job, batches, variants, tags, reference):
        kept = sum(map(len, job.auto_float.values()))
        seen.append((kept, {t.node for p in job.plans.values() for t in p.quantized}))
        return [AccuracyReport("cpu", 8, [Metric("caption", "exact_caption_agreement", 1.0 if kept >= 5 else 0.5)])]

    monkeypatch.setattr(pipeline._Job, "evaluate", evaluate)
    report = calibrate(blip_bundle, str(photos), tmp_path / "out", CalibrationOptions(auto=True, max_drop=0.1, **FAST))
    auto = report.quantization["auto"]
    assert len(report.sensitivity) > 8
    assert [p["float_layers"] for p in auto["probes"]] == [0, 1, 2, 4, 8, 6, 5]
    assert [p["passed"] for p in auto["probes"]] == [False] * 4 + [True] * 3
    assert auto["float_layers"] == 5 and auto["ranked_layers"] == len(report.sensitivity)
    kept = auto["kept_float"]
    worst = {(e.module, e.node) for e in report.sensitivity[:5]}
    assert {(m, n) for m, nodes in kept.items() for n in nodes} == worst
    for module, nodes in kept.items():
        assert set(nodes) <= set(report.quantization["modules"][module]["kept_float"])
    assert all(e.node in seen[0][1] for e in report.sensitivity)  # probe 0: nothing kept by --auto
    # the bundle written is the 5-layer probe's, not the last file set on disk before it
    model = edgerun.load(tmp_path / "out")
    assert model.caption(str(photos / "chelsea.jpg")).text


def test_auto_rewrites_the_best_probe_when_a_later_one_failed(blip_bundle, photos, tmp_path, monkeypatch):
    """Passing from 3 on: probes 0, 1, 2, 4, 3; the last probe passes. Passing from 4 on: probes
    0, 1, 2, 4, 3 with 3 failing, so the bundle must be rewritten with the 4 worst float."""
    from edgerun.calibration import pipeline
    from edgerun.calibration.accuracy import AccuracyReport, Metric

    def evaluate(job, batches, variants, tags, reference):
        kept = sum(map(len, job.auto_float.values()))
        return [AccuracyReport("cpu", 8, [Metric("caption", "exact_caption_agreement", 1.0 if kept >= 4 else 0.5)])]

    monkeypatch.setattr(pipeline._Job, "evaluate", evaluate)
    report = calibrate(blip_bundle, str(photos), tmp_path / "out", CalibrationOptions(auto=True, max_drop=0.1, **FAST))
    auto = report.quantization["auto"]
    assert [(p["float_layers"], p["passed"]) for p in auto["probes"]] == [(0, False), (1, False), (2, False),
                                                                            (4, True), (3, False)]
    assert auto["float_layers"] == 4
    worst = {(e.module, e.node) for e in report.sensitivity[:4]}
    on_disk = set()
    model = edgerun.load(tmp_path / "out")
    for name, spec in model.manifest.modules.items():
        import onnx

        graph = onnx.load(str(tmp_path / "out" / spec.file), load_external_data=False).graph
        quantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        for node in graph.node:
            if node.op_type in ("MatMul", "Gemm", "Conv") and not (set(node.input) & quantized):
                on_disk.add((name.partition("@")[0], node.name))
    assert worst <= on_disk


def test_auto_that_needs_every_layer_float_fails(blip_bundle, photos, tmp_path, monkeypatch):
    from edgerun.calibration import pipeline
    from edgerun.calibration.accuracy import AccuracyReport, Metric

    def evaluate(job, batches, variants, tags, reference):
        return [AccuracyReport("cpu", 8, [Metric("caption", "exact_caption_agreement", 1.0 if not variants else 0.5)])]

    monkeypatch.setattr(pipeline._Job, "evaluate", evaluate)
    with pytest.raises(AccuracyDropError, match="took every linear layer in float"):
        calibrate(blip_bundle, str(photos), tmp_path / "out", CalibrationOptions(auto=True, max_drop=0.1, **FAST))
    assert list(tmp_path.iterdir()) == []


def test_fp16_variants(blip_bundle, photos, tmp_path):
    report = calibrate(blip_bundle, str(photos), tmp_path / "fp16", CalibrationOptions(fp16=True, **FAST))
    model = edgerun.load(tmp_path / "fp16")
    spec = model.manifest.modules["vision@fp16"]
    assert spec.precision == "fp16" and spec.backends == ("cuda", "tensorrt", "ort-trt")
    assert model.manifest.modules["vision"].precision == "fp32"
    assert select_module(model.manifest, "decoder", "cuda")[0] == "decoder@fp16"
    assert model.manifest.quantization["method"] == "fp16"
    assert report.accuracy[0].variant == "fp16" and report.accuracy[0].worst.drop < 1.0
    assert model.caption(str(photos / "chelsea.jpg")).text


def test_more_samples_than_the_source_holds(blip_bundle, photos, tmp_path):
    report = calibrate(blip_bundle, str(photos), tmp_path / "out",
                       CalibrationOptions(samples=500, eval_samples=4, decoder_samples=2))
    assert report.quantization["samples"] == 12
    assert any("asked for 500 samples" in n for n in report.notes)


def test_option_mistakes():
    with pytest.raises(OptionError, match="minmax, entropy, percentile"):
        CalibrationOptions(method="kl")
    with pytest.raises(OptionError, match="auto requires max_drop"):
        CalibrationOptions(auto=True)
    with pytest.raises(OptionError, match="fraction"):
        CalibrationOptions(max_drop=5)


def test_calibration_imports_no_torch(blip_bundle, photos, tmp_path):
    """Jetson boards calibrate from the bundle alone, without torch."""
    import subprocess
    import sys

    code = ("import sys; from edgerun.calibration.pipeline import CalibrationOptions, calibrate; "
            f"calibrate({str(blip_bundle)!r}, {str(photos)!r}, {str(tmp_path / 'out')!r}, "
            "CalibrationOptions(samples=2, eval_samples=2, decoder_samples=1)); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_nothing_left_to_quantize(blip_bundle, photos, tmp_path):
    with pytest.raises(OptionError, match="no linear layer is left to quantize"):
        calibrate(blip_bundle, str(photos), tmp_path / "out", CalibrationOptions(keep_float=("MatMul,Gemm", "Conv"), **FAST))
    assert list(tmp_path.iterdir()) == []


def test_the_manifest_counts_the_centred_activations_of_the_tensorrt_variant(calibrated):
    import onnx

    path, _ = calibrated["entropy"]
    written = edgerun.load(path).manifest.quantization["modules"]["vision"]["variants"]
    trt = onnx.load(str(path / "vision.int8-tensorrt.onnx"), load_external_data=False).graph.node
    centred = [n for n in trt if n.op_type == "Sub" and n.name.endswith("_Centre")]
    assert written["vision@tensorrt"].get("centred_activations", 0) == len(centred) > 0  # the MLPs' GELU outputs
    assert "centred_activations" not in written["vision"]  # uint8 in onnxruntime's: nothing to centre
