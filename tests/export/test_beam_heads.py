"""A decoder's CPU variant for one image and G beams, the beams as cross-attention query heads
(edgerun.export.beam_heads): made at export and calibration, picked for exactly its calls."""
import json

import numpy as np
import onnx
import pytest

import edgerun
from edgerun.errors import BundleError
from edgerun.export.beam_heads import beam_counts, beam_heads_decoder, check_beam_heads
from edgerun.manifest import Manifest
from edgerun.runtime.variants import select_decoder, select_module


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_the_export_makes_the_variant_and_a_cross_kv_that_takes_spare_rows(blip_bundle):
    modules = _manifest(blip_bundle)["modules"]
    beams = modules["decoder@cpu-beams3"]
    assert beams["file"] == "decoder.cpu-beams3.onnx" and beams["backends"] == ["cpu"]
    assert beams["extra"]["when"] == {"batch": 1, "beams": 3} and beams["extra"]["variant_of"] == "decoder"
    assert beams["extra"]["pad"] == "image_embeds"  # the cross K/V are made row by row from it
    assert beams["external_data"] == modules["decoder@cpu"]["external_data"]  # the same weights file
    graph = onnx.load(str(blip_bundle / beams["file"]), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    layers = modules["decoder@cpu"]["extra"]["cache"]["layers"]
    assert ops.count("GroupQueryAttention") == 2 * layers and "Softmax" not in ops  # self- and cross-attention
    heads = {a.i for n in graph.node if n.name.startswith("beam_heads_") for a in n.attribute if a.name == "num_heads"}
    assert heads == {3 * modules["decoder@cpu"]["extra"]["cache"]["heads"]}
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert shapes["input_ids"][0] == 3 and shapes["cross_key_0"][2] == "cross_capacity"
    cross = modules["cross_kv@cpu"]  # the K/V module's CPU copy takes any number of rows; TensorRT keeps 17
    assert cross["inputs"][0]["shape"][1] == "keys" and modules["cross_kv"]["inputs"][0]["shape"][1] == 17
    assert "cpu" not in modules["cross_kv"]["backends"] and cross["backends"] == ["cpu"]


def test_the_variant_serves_only_the_calls_it_names(blip_bundle):
    manifest = Manifest.from_dict(_manifest(blip_bundle))
    assert select_decoder(manifest, "decoder", "cpu", 1, 3)[0] == "decoder@cpu-beams3"
    for batch, beams in ((2, 3), (1, 2), (1, 1)):
        assert select_decoder(manifest, "decoder", "cpu", batch, beams)[0] == "decoder@cpu"
    assert select_decoder(manifest, "decoder", "cuda", 1, 3)[0] == "decoder"
    assert select_module(manifest, "decoder", "cpu")[0] == "decoder@cpu"  # never the conditional one
    model = edgerun.load(blip_bundle, threads=1)
    assert model.runner("decoder", batch=1, beams=3).path.name == "decoder.cpu-beams3.onnx"
    assert model.runner("decoder", batch=2, beams=3).path.name == "decoder.cpu.onnx"
    assert model.runner("decoder").path.name == "decoder.cpu.onnx"
    assert beam_counts(None) == [3] and beam_counts(1) == [3] and beam_counts(4) == [3, 4]


def test_warm_makes_the_session_the_call_will_use(blip_bundle):
    model = edgerun.load(blip_bundle, threads=1)
    model.warm(["caption"], num_beams=3)
    assert {r.path.name for r in model._runners.values()} >= {"decoder.cpu-beams3.onnx", "cross_kv.cpu.onnx"}
    assert "decoder.cpu.onnx" not in {r.path.name for r in model._runners.values()}  # no second decoder
    made = dict(model._runners)
    model.caption(np.zeros((30, 40, 3), np.uint8), num_beams=3, max_new_tokens=4)
    assert model._runners == made


def test_captions_through_the_variant_are_the_general_decoders(blip_bundle):
    """Token-exact with the general GroupQueryAttention decoder (itself token-exact with
    generate(), test_gqa.py), the image's K/V made with their spare slots by cross_kv."""
    from skimage import data

    heads = edgerun.load(blip_bundle, threads=1)
    general = edgerun.load(blip_bundle, threads=1)
    general._runners["decoder@cpu-beams3"] = general.runner("decoder")  # the call goes to the general graph
    for image in (data.astronaut(), data.coffee()):
        for prompt in (None, "a picture of"):
            want = general.caption(image, prompt=prompt, num_beams=3, max_new_tokens=12, min_new_tokens=12)
            got = heads.caption(image, prompt=prompt, num_beams=3, max_new_tokens=12, min_new_tokens=12)
            assert got.token_ids == want.token_ids and got.score == pytest.approx(want.score, abs=1e-5)
    values, spare = heads._padded("decoder", ["cross_kv"], {"image_embeds": np.zeros((1, 17, 24), np.float32)}, 1, 3, 4)
    assert spare == 4 and values["image_embeds"].shape == (1, 21, 24)  # no copy: cross_kv makes the slots
    assert heads._padded("decoder", ["cross_kv"], {"image_embeds": np.zeros((2, 17, 24), np.float32)}, 2, 3, 4)[1] == 0


def test_a_cross_kv_with_fixed_rows_leaves_the_copy_to_the_decoder(blip_bundle):
    """A K/V module that takes only the exported row count (a TensorRT engine, the standard graph)
    gets its input as it is; the decoder copies the K/V into buffers with spare slots: same captions."""
    from edgerun.runtime.onnxrt import OnnxRuntimeRunner

    image = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    free, fixed = edgerun.load(blip_bundle, threads=1), edgerun.load(blip_bundle, threads=1)
    fixed._runners["cross_kv"] = OnnxRuntimeRunner(blip_bundle / "cross_kv.onnx", threads=1)
    assert fixed._padded("decoder", ["cross_kv"], {"image_embeds": np.zeros((1, 17, 24), np.float32)}, 1, 3, 2)[1] == 0
    a, b = (m.caption(image, num_beams=3, max_new_tokens=8) for m in (free, fixed))
    assert a.token_ids == b.token_ids and a.score == pytest.approx(b.score, abs=1e-6)


def test_the_rewrite_is_checked_and_a_masked_cross_attention_is_left_alone(blip_bundle, vqa_bundle):
    cache = _manifest(blip_bundle)["modules"]["decoder@cpu"]["extra"]["cache"]
    for beams in (2, 3):  # the copying path (the check gives the K/V without spare slots)
        error, _ = check_beam_heads(blip_bundle / "decoder.cpu.onnx", cache, beams)
        assert error < 1e-5
    modules = _manifest(vqa_bundle)["modules"]
    decoders = [n for n, m in modules.items() if (m["extra"].get("cache") or {}).get("type") == "gqa"]
    assert decoders and not any(m["extra"].get("when") for m in modules.values())  # its K/V carry a mask
    graph = onnx.load(str(vqa_bundle / modules[decoders[0]]["file"]), load_external_data=False)
    assert beam_heads_decoder(graph, heads=4, head_dim=8, beams=3) == 0


def test_a_call_the_variant_was_not_made_for_is_refused(blip_bundle):
    from edgerun.runtime.kvcache import make_inference

    model = edgerun.load(blip_bundle, threads=1)
    runner = model.runner("decoder", batch=1, beams=3)
    values = {f"cross_{t}_{i}": np.zeros((1, 4, 17, 8), np.float32) for t in ("key", "value") for i in range(2)}
    cache = model.bundle.module("decoder@cpu").extra["cache"]
    with pytest.raises(BundleError, match="serves one image and 3 beams"):
        make_inference(runner, values, 1, 2, 8, cache)


def test_the_bench_counts_what_a_beam_heads_step_reads(blip_int8_bundle):
    from edgerun.runtime.roofline import captured_feeds, stage_work

    modules = _manifest(blip_int8_bundle)["modules"]
    assert modules["decoder@cpu-beams3"]["file"] == "decoder.int8-beams3.onnx"
    assert modules["decoder@cpu-beams3"]["precision"] == "int8" and modules["decoder@cpu-beams3"]["extra"]["pad"]
    model = edgerun.load(blip_int8_bundle, threads=1)
    with captured_feeds(model, {"cross_kv": (0,), "decoder": (0, 4)}, batch=1, beams=3) as feeds:
        model.caption(np.zeros((40, 40, 3), np.uint8), num_beams=3, max_new_tokens=6, min_new_tokens=6)
    step = feeds[("decoder", 4)]
    keys = 17  # the tiny BLIP's image tokens
    assert step["input_ids"].shape == (3, 1) and step["cross_key_0"].shape[2] == keys + 1  # one prompt token
    assert int(step["cross_total_sequence_length"]) == keys + 1 and np.isneginf(step["cross_bias"][..., keys:]).all()
    work = stage_work(model, feeds, 1)
    assert work["decoder_per_token"]["bytes"] == model.bundle.module_bytes("decoder") + sum(
        v.nbytes for v in step.values())


def test_the_bench_counts_the_padded_cross_kv_on_the_graph_that_ran(blip_bundle):
    """cross_kv ran on 17 + 1 rows through its CPU copy; the base graph takes 17 only."""
    from edgerun.runtime.roofline import captured_feeds, stage_work

    model = edgerun.load(blip_bundle, threads=1)
    with captured_feeds(model, {"cross_kv": (0,)}, batch=1, beams=3) as feeds:
        model.caption(np.zeros((40, 40, 3), np.uint8), num_beams=3, max_new_tokens=3)
    assert feeds[("cross_kv", 0)]["image_embeds"].shape == (1, 18, 24)
    assert stage_work(model, feeds, 1)["cross_kv"]["flops"] > 0
