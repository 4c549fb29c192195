"""The decoders' self-attention as GroupQueryAttention (edgerun.export.gqa) and its cache
(edgerun.runtime.kvcache.GqaDecoderInference): same logits, same captions, one kernel a layer."""
import json

import numpy as np
import pytest

import edgerun
from edgerun.errors import BundleError
from edgerun.export.gqa import check_gqa_decoder, gqa_decoder


def _decoders(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    return [(bundle / spec["file"], spec["extra"]["cache"]) for spec in manifest["modules"].values()
            if spec["extra"].get("cache", {}).get("type", "kv") == "kv" and "layers" in spec["extra"].get("cache", {})]


def _rewritten(path, dims):
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    n = gqa_decoder(model, layers=dims["layers"], heads=dims["heads"], head_dim=dims["head_dim"])
    return model, n


@pytest.mark.parametrize("fixture", ["blip_bundle", "vqa_bundle", "multi_bundle"])
def test_every_family_decoder_is_rewritten_and_gives_the_same_logits(fixture, request):
    """BLIP's caption decoder, BLIP VQA's answer decoder (a cross-attention mask input) and the
    built-in families' caption and answer decoders: every layer replaced, the logits over a prompt,
    single-token steps and a reorder within rounding of the time-major graph's."""
    decoders = _decoders(request.getfixturevalue(fixture))
    assert decoders
    for path, dims in decoders:
        import onnx

        before = [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]
        model, n = _rewritten(path, dims)
        ops = [node.op_type for node in model.graph.node]
        assert n == dims["layers"] == ops.count("GroupQueryAttention")
        assert ops.count("Softmax") == before.count("Softmax") - n  # the cross-attention keeps its own
        assert len(ops) < len(before) - 10 * n and "past_key" not in {i.name for i in model.graph.input}
        assert {"seqlens_k", "total_sequence_length", "past_key_0", "past_value_0"} <= {i.name for i in model.graph.input}
        assert check_gqa_decoder(path, dims) < 1e-5, path


def test_a_graph_off_the_pattern_is_left_unchanged(blip_bundle):
    import onnx

    (path, dims), = _decoders(blip_bundle)
    model = onnx.load(str(path), load_external_data=False)
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.attribute[0].i = 2  # softmax over another axis: not attention as GroupQueryAttention does it
    before = model.SerializeToString()
    assert gqa_decoder(model, layers=dims["layers"], heads=dims["heads"], head_dim=dims["head_dim"]) == 0
    assert model.SerializeToString() == before
    plain = onnx.load(str(path), load_external_data=False)
    where = next(n for n in plain.graph.node if n.op_type == "Where")
    where.input[0] = "input_ids"  # a mask read from the tokens' values (padding), not from the lengths
    assert gqa_decoder(plain, layers=dims["layers"], heads=dims["heads"], head_dim=dims["head_dim"]) == 0
    with pytest.raises(ValueError, match="not the pattern"):
        check_gqa_decoder(bundle_copy_with(path, plain), dims)


def bundle_copy_with(path, model):
    import onnx

    out = path.with_name("altered.onnx")
    onnx.save_model(model, str(out))
    return out


def test_captions_are_the_same_through_the_gqa_decoder(blip_bundle):
    """The exported bundle's CPU variant (decoder@cpu): beam search with reorders over the in-place
    cache gives the same tokens and scores as the time-major decoder, alone and in batches."""
    from skimage import data

    from edgerun.calibration.collect import file_model

    gqa = edgerun.load(blip_bundle, threads=1)
    plain = file_model(blip_bundle, {}, threads=1)  # every module's own file: the time-major decoder
    assert gqa.runner("decoder").path.name == "decoder.cpu.onnx" and plain.runner("decoder").path.name == "decoder.onnx"
    for image in (data.astronaut(), data.coffee()):
        want = plain.caption(image, num_beams=3, max_new_tokens=12, min_new_tokens=12)
        got = gqa.caption(image, num_beams=3, max_new_tokens=12, min_new_tokens=12)
        assert got.token_ids == want.token_ids and got.score == pytest.approx(want.score, abs=1e-5)
    images = [data.astronaut(), data.coffee()]
    assert [c.token_ids for c in gqa.caption_batch(images, num_beams=2, max_new_tokens=6)] == \
        [c.token_ids for c in plain.caption_batch(images, num_beams=2, max_new_tokens=6)]


def test_a_gqa_row_is_computed_the_same_wherever_it_sits(blip_bundle):
    """What a reorder's partial copies rely on for token-exact float captions, in the GQA variant:
    rows fed the same tokens get bit-identical logits and cache, whatever their position."""
    from edgerun.runtime.kvcache import GqaDecoderInference, make_inference

    model = edgerun.load(blip_bundle, threads=1)
    cross = {n: np.random.default_rng(1).standard_normal((1, 4, 17, 8)).astype(np.float32)
             for n in ("cross_key_0", "cross_key_1", "cross_value_0", "cross_value_1")}
    inference = make_inference(model.runner("decoder"), cross, 1, 3, 6, model.manifest.modules["decoder@cpu"].extra["cache"])
    assert isinstance(inference, GqaDecoderInference)
    for tokens in ([[118], [118], [118]], [[5], [9], [5]], [[7], [3], [7]]):
        logits = inference.logits(np.array(tokens))
        np.testing.assert_array_equal(logits[0], logits[2])
    for buffers in (inference._keys, inference._values):
        for buf in buffers:
            np.testing.assert_array_equal(buf[0, :, :3], buf[2, :, :3])
    assert not np.array_equal(logits[0], logits[1])


def test_the_calibrated_decoder_runs_gqa_on_the_cpu_and_standard_ops_on_cuda(blip_int8_bundle, blip_bundle):
    import onnx

    from edgerun.manifest import Manifest
    from edgerun.runtime.variants import select_module

    manifest = json.loads((blip_int8_bundle / "manifest.json").read_text())
    cpu, cuda = manifest["modules"]["decoder"], manifest["modules"]["decoder@cuda"]
    # the float bundle's own decoder@cpu and its weights are left behind with the float decoder
    assert "decoder.cpu.onnx" in json.loads((blip_bundle / "manifest.json").read_text())["files"]
    assert "decoder@cpu" not in manifest["modules"]
    assert not {"decoder.cpu.onnx", "decoder.onnx.data"} & set(manifest["files"])
    assert cpu["backends"] == ["cpu"] and cuda["backends"] == ["cuda"]
    assert cpu["extra"]["cache"]["type"] == "gqa" and cuda["extra"]["cache"].get("type", "kv") == "kv"
    assert cpu["external_data"] == cuda["external_data"] == ["decoder.int8.onnx.data"]  # weights stored once
    layers = cpu["extra"]["cache"]["layers"]
    ops = [n.op_type for n in onnx.load(str(blip_int8_bundle / cpu["file"]), load_external_data=False).graph.node]
    standard = [n.op_type for n in onnx.load(str(blip_int8_bundle / cuda["file"]), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == layers and "GroupQueryAttention" not in standard
    assert ops.count("MatMulNBits") == standard.count("MatMulNBits") > 0
    # the head left float (no --int8-head) is prepacked on the CPU, from the float table's own bytes
    from edgerun.export.simplify import PREPACKED_HEAD

    heads = [i for i in onnx.load(str(blip_int8_bundle / cpu["file"]), load_external_data=False).graph.initializer
             if i.name.endswith(PREPACKED_HEAD)]
    assert len(heads) == 1 and heads[0].external_data[0].value == "decoder.int8.onnx.data"
    parsed = Manifest.from_dict(manifest)
    assert select_module(parsed, "decoder", "cuda")[0] == "decoder@cuda"
    assert select_module(parsed, "decoder", "cpu")[0] == "decoder"
    variants = manifest["quantization"]["modules"]["decoder"]["variants"]
    assert variants["decoder"]["cache"] == "gqa"
    caption = edgerun.load(blip_int8_bundle, threads=1).caption(np.zeros((40, 40, 3), np.uint8), num_beams=3,
                                                                 max_new_tokens=6)
    assert caption.token_ids


def test_a_gqa_cache_needs_the_gqa_graph_and_the_cpu(blip_bundle):
    from edgerun.runtime.kvcache import make_inference
    from edgerun.runtime.onnxrt import IOSpec, OnnxRuntimeRunner

    model = edgerun.load(blip_bundle, threads=1)
    runner = OnnxRuntimeRunner(model.bundle.file(model.bundle.module("decoder").file))  # the time-major graph
    cache = {**model.bundle.module("decoder").extra["cache"], "type": "gqa"}
    with pytest.raises(BundleError, match="no seqlens_k input"):
        make_inference(runner, {}, 1, 1, 4, cache)

    from types import SimpleNamespace

    on_device = SimpleNamespace(device_resident=True, path=runner.path,
                                inputs=[*runner.inputs, IOSpec("seqlens_k", np.int32, ("rows",))])
    with pytest.raises(BundleError, match="CPU only"):
        make_inference(on_device, {}, 1, 1, 4, cache)
    with pytest.raises(BundleError, match="unknown cache type 'paged'"):
        make_inference(runner, {}, 1, 1, 4, {**cache, "type": "paged"})


def test_the_roofline_counts_what_a_gqa_step_reads(blip_int8_bundle):
    """bench's decode-step floor: the feeds of an IO-bound step are captured as the time-major
    decoder's would be: the same cache bytes for the same past, the cross K/V, the ids."""
    from edgerun.runtime.roofline import captured_feeds, stage_work

    model = edgerun.load(blip_int8_bundle, threads=1)
    with captured_feeds(model, {"vision": (0,), "cross_kv": (0,), "decoder": (0, 4)}) as feeds:
        model.caption(np.zeros((40, 40, 3), np.uint8), num_beams=2, max_new_tokens=6, min_new_tokens=6)
    step = feeds[("decoder", 4)]
    dims = model.bundle.module("decoder").extra["cache"]
    past = sum(v.nbytes for k, v in step.items() if k.startswith("past_"))
    assert past == 2 * dims["layers"] * 2 * dims["heads"] * 4 * dims["head_dim"] * 4  # K and V, 2 rows, past 4
    assert step["input_ids"].shape == (2, 1) and int(step["total_sequence_length"]) == 5
    work = stage_work(model, feeds, 1)
    assert work["decoder_per_token"]["bytes"] == model.bundle.module_bytes("decoder") + sum(
        v.nbytes for v in step.values())
    assert work["decoder_first"]["bytes"] < work["decoder_per_token"]["bytes"]
    assert "run_binding" not in vars(model.runner("decoder"))  # the hook is gone afterwards


def test_the_cpu_decoder_prepacks_its_tied_head_from_the_tables_bytes(blip_bundle):
    """decoder@cpu: the LM head reads its own constant naming the embedding table's bytes in the
    decoder's weights file (onnxruntime prepacks it; the table stays one copy on disk)."""
    import onnx

    from edgerun.export.simplify import PREPACKED_HEAD

    model = onnx.load(str(blip_bundle / "decoder.cpu.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    head = next(n for n in model.graph.node if n.op_type == "Gemm" and n.output[0] == "logits")
    assert head.input[1].endswith(PREPACKED_HEAD)
    table = inits[head.input[1].removesuffix(PREPACKED_HEAD)]
    assert list(inits[head.input[1]].external_data) == list(table.external_data)
    assert any(n.op_type == "Gather" and n.input[0] == table.name for n in model.graph.node)
    standard = onnx.load(str(blip_bundle / "decoder.onnx"), load_external_data=False)
    assert not any(i.name.endswith(PREPACKED_HEAD) for i in standard.graph.initializer)  # CUDA, TensorRT: as exported
