"""The ViT-GPT2 exporter: graphs, manifest, and captions from the bundle against generate()."""
import numpy as np
import onnx
import pytest
import torch
from parity import assert_matches_generate, strip_padding

import edgerun
from edgerun.bundle import open_bundle
from edgerun.errors import EdgeRunError
from edgerun.export.pipeline import export
from edgerun.models.tiny_vit_gpt2 import save_vit_gpt2_caption

BEAMS = (1, 2, 3, 4)
EARLY = (True, False, "never")
MAX_NEW = (1, 3, 8, 15)
OPTIONS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "early_stopping",
           "no_repeat_ngram_size", "repetition_penalty", "num_return_sequences")


def _cases(n=48, seed=11):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        beams = BEAMS[i % len(BEAMS)]
        max_new = MAX_NEW[(i // len(BEAMS)) % len(MAX_NEW)]
        cases.append({
            "batch": int(rng.choice([1, 2])),
            "num_beams": beams,
            "max_new_tokens": max_new,
            "min_new_tokens": min(max_new, int(rng.choice([0, 0, 0, 2]))),
            "length_penalty": float(rng.choice([-0.5, 0.0, 1.0, 1.5])),
            "early_stopping": EARLY[(i // 3) % len(EARLY)],
            "no_repeat_ngram_size": int(rng.choice([0, 0, 2])),
            "repetition_penalty": float(rng.choice([1.0, 1.0, 1.4])),
            "num_return_sequences": int(rng.integers(1, beams + 1)),
            "prompt": [None, None, "a picture of"][int(rng.integers(3))],
            "seed": i,
        })
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny ViT-GPT2 (ViT narrower than GPT-2, so with enc_to_dec_proj) whose beams end at varied steps."""
    return save_vit_gpt2_caption(tmp_path_factory.mktemp("ckpt") / "tiny-vit-gpt2", init_std=0.5, stop_bias=8.0,
                                 seed=3)


@pytest.fixture(scope="module")
def report(checkpoint, tmp_path_factory):
    return export(f"hf:{checkpoint}", task="caption", output=tmp_path_factory.mktemp("bundles") / "vit-gpt2")


@pytest.fixture(scope="module")
def model(report):
    return edgerun.load(report.path, threads=1)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import VisionEncoderDecoderModel

    torch.set_num_threads(1)
    return VisionEncoderDecoderModel.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def _prompt(hf_model, hf_tokenizer, case, batch):
    start = [hf_model.generation_config.decoder_start_token_id]
    ids = start + (hf_tokenizer(case["prompt"]).input_ids if case["prompt"] else [])
    return torch.tensor([ids] * batch)


def _generate(hf_model, hf_tokenizer, pixels, case):
    prompt = _prompt(hf_model, hf_tokenizer, case, len(pixels))
    with torch.no_grad():
        out = hf_model.generate(pixel_values=torch.from_numpy(pixels), decoder_input_ids=prompt, do_sample=False,
                                output_scores=True, return_dict_in_generate=True, **{k: case[k] for k in OPTIONS})
    return out, prompt.shape[1]


def _pixels(case):
    return np.random.default_rng(case["seed"]).standard_normal((case["batch"], 3, 32, 32)).astype(np.float32)


def _captions(model, case):
    got = model.caption_batch(pixel_values=_pixels(case), prompt=case["prompt"], **{k: case[k] for k in OPTIONS})
    return [g if case["num_return_sequences"] > 1 else [g] for g in got]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c['seed']}" for c in CASES])
def test_caption_matches_generate(model, hf_model, hf_tokenizer, case):
    out, prompt_len = _generate(hf_model, hf_tokenizer, _pixels(case), case)
    stop = hf_model.generation_config.eos_token_id
    results = _captions(model, case)
    assert all(len(item) == case["num_return_sequences"] for item in results)
    assert_matches_generate(results, out, prompt_len=prompt_len, stop_ids=stop, tokenizer=hf_tokenizer,
                            num_beams=case["num_beams"])


def test_cases_cover_early_finish_and_max_length(model):
    """The parity cases are only worth something if beams really finish early, and some run out."""
    stop = model.manifest.decoding["stop_ids"][0]
    early, full = {True: [], False: []}, {True: 0, False: 0}  # keyed by num_beams > 1
    for case in CASES:
        prompt_len = len(model._prompt_ids(case["prompt"]))
        for results in _captions(model, case):
            for res in results:
                generated = len(res.token_ids) - prompt_len
                if res.token_ids[-1] == stop and generated < case["max_new_tokens"]:
                    early[case["num_beams"] > 1].append(generated)
                elif generated == case["max_new_tokens"]:
                    full[case["num_beams"] > 1] += 1
    # (measured: beams 44 early at 12 distinct steps, 64 at max length; greedy 3 early, 12 at max length)
    assert len(early[True]) >= 20 and full[True] >= 20
    assert len(set(early[True])) >= 6  # finishes at varied steps, not all at the first
    assert len(early[False]) >= 2 and full[False] >= 5


def test_bundle_graphs_and_decoding_ids(report, hf_model):
    b = open_bundle(report.path, verify="full")
    assert b.task("caption").modules == ("vision", "cross_kv", "decoder")
    for name in ("vision", "cross_kv", "decoder"):
        graph = onnx.load(str(b.file(b.module(name).file)))
        assert not {n.op_type for n in graph.graph.node} & {"If", "Loop", "Scan"}
        assert 0 <= report.max_abs_diff[name] < 1e-3
    dec = b.module("decoder")
    assert [t.name for t in dec.inputs] == ["input_ids", "past_key", "past_value", "cross_key_0", "cross_key_1",
                                            "cross_value_0", "cross_value_1"]
    assert dec.inputs[1].shape[0] == "past" and dec.inputs[3].shape[0] == "batch"
    assert dec.extra["cache"] == {"layout": "time,layer,row,head,dim", "layers": 2, "heads": 4, "head_dim": 8,
                                  "max_positions": 64}
    m = b.manifest
    end = hf_model.generation_config.eos_token_id
    assert end == m.model["vocab_size"] - 1  # <|endoftext|> last, as in GPT-2
    assert m.decoding["decoder_start_ids"] == [end] and m.decoding["stop_ids"] == [end]
    assert m.decoding["pad_id"] == end and m.model["max_positions"] == 64
    assert m.preprocess["size"] == [32, 32] and m.preprocess["resample"] == "bilinear"


def test_decoding_ids_resolve_as_generate_does(checkpoint):
    """No decoder_start_token_id: generate() starts with bos; no pad_token_id: it pads with the eos."""
    from transformers import VisionEncoderDecoderModel

    from edgerun.export.vision_encoder_decoder import VisionEncoderDecoderExporter

    hf = VisionEncoderDecoderModel.from_pretrained(checkpoint)
    hf.generation_config.bos_token_id, hf.generation_config.eos_token_id = 7, [5, 6]
    hf.generation_config.decoder_start_token_id = hf.generation_config.pad_token_id = None
    decoding = VisionEncoderDecoderExporter(hf).manifest_parts(None)["decoding"]
    assert (decoding["decoder_start_ids"], decoding["stop_ids"], decoding["pad_id"]) == ([7], [5, 6], 5)
    hf.generation_config.bos_token_id = None
    with pytest.raises(EdgeRunError, match="decoder_start_token_id"):
        VisionEncoderDecoderExporter(hf).manifest_parts(None)


def test_decoder_stores_embedding_once_and_no_cross_weights(report, hf_model):
    graph = onnx.load(str(report.path / "decoder.onnx"))
    wte = hf_model.decoder.transformer.wte.weight.detach().numpy()
    assert hf_model.decoder.lm_head.weight is hf_model.decoder.transformer.wte.weight
    assert len([t for t in graph.graph.initializer if tuple(t.dims) in (wte.shape, wte.shape[::-1])]) == 1
    kv_w = hf_model.decoder.transformer.h[0].crossattention.c_attn.weight.detach().numpy()
    for t in graph.graph.initializer:
        arr = onnx.numpy_helper.to_array(t)
        assert not any(arr.shape == w.shape and np.array_equal(arr, w) for w in (kv_w, kv_w.T))


def test_decoder_products_read_their_inputs_unflattened(report, hf_model):
    """GPT-2's Conv1D layers (addmm over x.view(-1, K), viewed back) run as MatMul + Add on the 3-D
    input: no Reshape on either side of a weight product, and no shape arithmetic left for them."""
    from edgerun.export.simplify import ranks

    model = onnx.load(str(report.path / "decoder.onnx"), load_external_data=False)
    graph, rank = model.graph, ranks(model)
    inits = {t.name for t in graph.initializer}
    products = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    layers = hf_model.decoder.config.n_layer
    assert len(products) == 6 * layers  # c_attn, c_proj, q_attn, cross c_proj, c_fc, mlp c_proj
    assert [rank.get(n.input[0]) for n in products] == [3] * len(products)  # (rows, new, width), not flattened
    readers = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n.op_type)
    biased = [readers[n.output[0]] for n in products]
    assert all(r == ["Add"] for r in biased)
    assert sum(n.op_type == "Shape" for n in graph.node) < len(products)  # was 3 per product


def test_vit_self_attention_fuses_for_the_cpu_variant(report, hf_model, tmp_path):
    """Hugging Face's ViT, exported with eager attention (a float Cast after the Softmax, heads as
    -1 in a shape computed from the input's dims), fuses into MultiHeadAttention, same output."""
    import onnxruntime as ort

    from edgerun.export.simplify import fuse_attention

    vision = report.path / "vision.onnx"
    model = onnx.load(str(vision))
    layers = hf_model.config.encoder.num_hidden_layers
    assert fuse_attention(model) == layers
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MultiHeadAttention") == layers and "Softmax" not in ops
    heads = {a.i for n in model.graph.node if n.op_type == "MultiHeadAttention" for a in n.attribute
             if a.name == "num_heads"}
    assert heads == {hf_model.config.encoder.num_attention_heads}
    fused = tmp_path / "vision-fused.onnx"
    onnx.save_model(model, str(fused))
    size = hf_model.config.encoder.image_size
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    want, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
                 for p in (vision, fused))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_real_photo_caption_matches_generate(model, hf_model, checkpoint):
    from skimage import data
    from transformers import ViTImageProcessorPil

    image = data.astronaut()
    want_pixels = ViTImageProcessorPil.from_pretrained(checkpoint)(image, return_tensors="np").pixel_values
    np.testing.assert_allclose(model.pixel_values([image]), want_pixels, atol=1e-6)
    res = model.caption(image, num_beams=3, max_new_tokens=12)
    with torch.no_grad():
        out = hf_model.generate(pixel_values=torch.from_numpy(want_pixels), num_beams=3, max_new_tokens=12,
                                do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert res.token_ids == strip_padding(out.sequences[0].tolist(), 1, hf_model.generation_config.eos_token_id)
    assert res.score == pytest.approx(float(out.sequences_scores[0]), rel=1e-4, abs=1e-4)


def test_greedy_score_is_sum_of_log_probs(model, hf_model):
    pixels = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    res = model.caption(pixel_values=pixels, num_beams=1, max_new_tokens=6)
    with torch.no_grad():
        logits = hf_model(pixel_values=torch.from_numpy(pixels), decoder_input_ids=torch.tensor([res.token_ids])).logits
    logp = torch.log_softmax(logits[0], -1)
    want = sum(float(logp[i, res.token_ids[i + 1]]) for i in range(len(res.token_ids) - 1))
    assert res.score == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_same_width_encoder_without_projection(tmp_path):
    """The ViT-GPT2 hub layout: ViT and GPT-2 equally wide, so no enc_to_dec_proj."""
    from transformers import VisionEncoderDecoderModel

    vit = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 40,
           "image_size": 32, "patch_size": 16}
    ckpt = save_vit_gpt2_caption(tmp_path / "ckpt", encoder=vit, stop_bias=4.0, seed=5)
    hf = VisionEncoderDecoderModel.from_pretrained(ckpt).eval()
    assert not hasattr(hf, "enc_to_dec_proj")
    bundle = export(f"hf:{ckpt}", task="caption", output=tmp_path / "bundle").path
    pixels = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = edgerun.load(bundle, threads=1).caption_batch(pixel_values=pixels, num_beams=2, max_new_tokens=8)
    with torch.no_grad():
        out = hf.generate(pixel_values=torch.from_numpy(pixels), num_beams=2, max_new_tokens=8, do_sample=False)
    for b in range(2):
        assert got[b].token_ids == strip_padding(out[b].tolist(), 1, hf.generation_config.eos_token_id)


def test_non_gpt2_decoder_is_refused():
    from transformers import BertConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    from edgerun.export.vision_encoder_decoder import VisionEncoderDecoderExporter

    enc = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                    image_size=16, patch_size=8)
    dec = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                     vocab_size=50, is_decoder=True, add_cross_attention=True)
    ved = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    with pytest.raises(EdgeRunError, match="GPT-2 decoder"):
        VisionEncoderDecoderExporter(ved)


def test_gpt2_self_attention_becomes_group_query_attention(report):
    """GPT-2's packed q/k/v product feeds GroupQueryAttention whole (no Split), with the same logits."""
    import json

    import onnx

    from edgerun.export.gqa import check_gqa_decoder, gqa_decoder

    spec = json.loads((report.path / "manifest.json").read_text())["modules"]["decoder"]
    dims, path = spec["extra"]["cache"], report.path / spec["file"]
    model = onnx.load(str(path), load_external_data=False)
    assert gqa_decoder(model, layers=dims["layers"], heads=dims["heads"], head_dim=dims["head_dim"]) == dims["layers"]
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[1] == n.input[2] == "" for n in attention)  # packed: key and value come with the query
    assert check_gqa_decoder(path, dims) < 1e-5
