"""IO binding with the KV cache in device buffers: on CPU OrtValues here, the same code as on CUDA."""
import numpy as np
import pytest

import edgerun
from edgerun.errors import OptionError
from edgerun.runtime import iobinding
from edgerun.runtime.iobinding import DeviceDecoderInference, IOBindingRunner, gather_model
from edgerun.runtime.kvcache import make_inference
from edgerun.runtime.onnxrt import OnnxRuntimeRunner

IMAGE = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)


def _bound(path):
    model = edgerun.load(path)
    for name in ("vision", "cross_kv", "decoder"):
        model._runners[name] = IOBindingRunner(model.bundle.file(model.manifest.modules[name].file), backend="cpu")
    model._runners["decoder@cpu-beams3"] = model._runners["decoder"]  # a device backend has no beam-heads variant
    return model


@pytest.mark.parametrize("options", [{"num_beams": 3, "max_new_tokens": 12}, {"num_beams": 1, "max_new_tokens": 8},
                                     {"num_beams": 4, "max_new_tokens": 10, "num_return_sequences": 2}])
def test_captions_through_io_binding_are_token_identical(blip_bundle, options):
    want = edgerun.load(blip_bundle).caption(IMAGE, **options)
    model = _bound(blip_bundle)
    got = model.caption(IMAGE, **options)
    want, got = (want, got) if isinstance(want, list) else ([want], [got])
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.score for g in got] == pytest.approx([w.score for w in want], abs=1e-5)
    assert model.runner("decoder").calls == model.last_timings["decoder_calls"]


def test_the_decoder_inference_keeps_its_cache_in_ortvalues(blip_bundle):
    model = _bound(blip_bundle)
    runner = model.runner("decoder")
    cross = {n: np.random.default_rng(1).standard_normal((1, 4, 17, 8)).astype(np.float32)
             for n in ("cross_key_0", "cross_key_1", "cross_value_0", "cross_value_1")}
    cache = model.manifest.modules["decoder"].extra["cache"]
    inference = make_inference(runner, cross, 1, 2, 6, cache)
    assert isinstance(inference, DeviceDecoderInference)
    standard = OnnxRuntimeRunner(model.bundle.file(model.manifest.modules["decoder"].file))  # not the GQA variant
    plain = make_inference(standard, cross, 1, 2, 6, cache)
    tokens = np.array([[118], [118]])
    np.testing.assert_allclose(inference.logits(tokens), plain.logits(tokens), atol=1e-5)
    np.testing.assert_allclose(inference.logits(np.array([[5], [7]])), plain.logits(np.array([[5], [7]])), atol=1e-5)
    for inf in (inference, plain):
        inf.rearrange_kv_cache(np.array([1, 1]))
    np.testing.assert_allclose(inference.logits(np.array([[9], [9]])), plain.logits(np.array([[9], [9]])), atol=1e-5)
    key = inference._key.numpy()[:3]
    np.testing.assert_allclose(key, plain._key[:3], atol=1e-5)  # the device cache holds what the host one does


def test_the_handmade_gather_graph_matches_numpy():
    for elem, dtype in ((1, np.float32), (10, np.float16)):
        session = iobinding.plain_session(gather_model(elem), ["CPUExecutionProvider"])
        data = np.random.default_rng(2).standard_normal((3, 2, 4, 2, 5)).astype(dtype)
        idx = np.array([3, 0, 0, 2])
        np.testing.assert_array_equal(session.run(None, {"data": data, "indices": idx})[0], np.take(data, idx, axis=2))


def test_missing_gpu_provider_reports_what_is_installed(blip_bundle, monkeypatch):
    with pytest.raises(OptionError, match=r"CUDAExecutionProvider.*has only .*CPUExecutionProvider.*pip install onnxruntime-gpu"):
        edgerun.load(blip_bundle, backend="cuda")
    monkeypatch.setattr(iobinding, "ort_distributions", lambda: ["onnxruntime 1.32.0", "onnxruntime-gpu 1.32.0"])
    with pytest.raises(OptionError, match="overwrite each other"):
        edgerun.load(blip_bundle, backend="ort-trt")


def test_ort_trt_options_give_caches_and_explicit_profiles(blip_bundle):
    bundle = edgerun.load(blip_bundle).bundle
    spec = bundle.manifest.modules["decoder"]
    options = iobinding.ort_trt_options(bundle, "decoder", spec)
    sha = bundle.manifest.files["decoder.onnx"].sha256
    assert options["trt_engine_cache_path"].endswith(sha[:16]) and options["trt_timing_cache_enable"] == "True"
    mins = options["trt_profile_min_shapes"].split(",")
    assert "past_key:0x2x1x4x8" in mins and all(k in options for k in ("trt_profile_opt_shapes", "trt_profile_max_shapes"))


@pytest.mark.gpu
def test_cuda_backend_captions_match_cpu(blip_bundle):
    want = edgerun.load(blip_bundle).caption(IMAGE, num_beams=3, max_new_tokens=12)
    model = edgerun.load(blip_bundle, backend="cuda")
    got = model.caption(IMAGE, num_beams=3, max_new_tokens=12)
    assert isinstance(model.runner("decoder"), IOBindingRunner)
    assert got.token_ids == want.token_ids
