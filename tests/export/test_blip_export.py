import json

import numpy as np
import onnx
import pytest
import torch

import edgerun
from edgerun.bundle import open_bundle
from edgerun.errors import EdgeRunError, ExportError, OptionError, UnsupportedModelError
from edgerun.export import hf
from edgerun.export.pipeline import export
from edgerun.models.tiny import save_blip_caption


def test_bundle_has_three_graphs_and_no_cache_branches(blip_bundle):
    b = open_bundle(blip_bundle, verify="full")
    assert b.task("caption").modules == ("vision", "cross_kv", "decoder")
    for name in ("vision", "cross_kv", "decoder"):
        model = onnx.load(str(b.file(b.module(name).file)))
        assert model.opset_import[0].version == 17
        assert not {n.op_type for n in model.graph.node} & {"If", "Loop", "Scan"}
    dec = b.module("decoder")
    assert [t.name for t in dec.inputs] == ["input_ids", "past_key", "past_value", "cross_key_0", "cross_key_1",
                                            "cross_value_0", "cross_value_1"]
    assert dec.inputs[1].shape[0] == "past" and dec.inputs[1].shape[2] == "rows"
    assert dec.inputs[3].shape[0] == "batch"  # one cross-K/V copy per image, not per beam
    assert b.manifest.decoding["decoder_start_ids"] == [b.manifest.model["vocab_size"] - 2]  # [DEC]


def test_decoder_stores_embedding_and_lm_head_once(blip_bundle, blip_torch):
    model = onnx.load(str(blip_bundle / "decoder.onnx"))
    emb = blip_torch.text_decoder.bert.embeddings.word_embeddings.weight.detach().numpy()
    same_shape = [t for t in model.graph.initializer if tuple(t.dims) in (emb.shape, emb.shape[::-1])]
    assert len(same_shape) == 1
    # and the cross-attention key/value weights live only in cross_kv.onnx
    key_w = blip_torch.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight.detach().numpy()
    for t in model.graph.initializer:
        arr = onnx.numpy_helper.to_array(t)
        assert not (arr.shape == key_w.shape and np.array_equal(arr, key_w))
        assert not (arr.shape == key_w.T.shape and np.array_equal(arr, key_w.T))


def test_bundle_records_tokenizer_preprocessing_and_provenance(blip_bundle):
    m = open_bundle(blip_bundle).manifest
    assert m.preprocess["size"] == [32, 32] and m.preprocess["resample"] == "bicubic"
    assert (blip_bundle / "tokenizer.json").is_file()
    assert m.decoding["stop_ids"] == [3] and m.decoding["pad_id"] == 0
    assert m.provenance["libraries"]["torch"].startswith("2.")
    assert m.provenance["opset"] == 17 and m.provenance["exported_at"].endswith("+00:00")
    for name in ("vision", "cross_kv", "decoder"):
        assert 0 <= m.modules[name].extra["max_abs_diff"] < 1e-3


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("variants")


def test_bf16_checkpoint_with_processor_config_and_48px_exports_fp32(variant_dir):
    ckpt = save_blip_caption(variant_dir / "bf16", vision={"hidden_size": 24, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "intermediate_size": 29, "image_size": 48, "patch_size": 16},
                             dtype="bfloat16", processor_layout="processor", seed=5)
    assert "bfloat16" in (ckpt / "config.json").read_text()
    report = export(f"hf:{ckpt}", task="caption", output=variant_dir / "bf16-bundle", opset=18)
    b = open_bundle(report.path)
    assert b.module("vision").inputs[0].shape == ("batch", 3, 48, 48)
    assert b.manifest.preprocess["size"] == [48, 48]
    vision = onnx.load(str(b.file("vision.onnx")))
    assert vision.opset_import[0].version == 18
    assert {t.data_type for t in vision.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    model = edgerun.load(report.path, threads=1)
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    assert model.caption(image, max_new_tokens=4).token_ids[0] == b.manifest.decoding["decoder_start_ids"][0]


def test_embedded_weights_bundle_loads_and_matches(blip_checkpoint, blip_bundle, variant_dir):
    assert open_bundle(blip_bundle).module("decoder").external_data == ("decoder.onnx.data",)
    report = export(f"hf:{blip_checkpoint}", task="caption", output=variant_dir / "emb",
                    external_data_bytes=1 << 40)
    b = open_bundle(report.path, verify="full")
    assert b.module("decoder").external_data == ()
    pixels = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    a = edgerun.load(report.path, threads=1).caption(pixel_values=pixels, num_beams=2, max_new_tokens=6)
    c = edgerun.load(blip_bundle, threads=1).caption(pixel_values=pixels, num_beams=2, max_new_tokens=6)
    assert a.token_ids == c.token_ids


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Blip2ForConditionalGeneration"]}))
    with pytest.raises(UnsupportedModelError, match="Blip2ForConditionalGeneration is not supported; "
                       "supported: BlipForConditionalGeneration"):
        export(f"hf:{tmp_path}", task="caption", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task, error, match", [
    ("captions", OptionError, "unknown task 'captions'; valid: caption, vqa, retrieval"),
    ("vqa", UnsupportedModelError, "cannot be exported for task 'vqa'; it serves: caption"),
])
def test_bad_task(blip_checkpoint, tmp_path, task, error, match):
    with pytest.raises(error, match=match):
        export(f"hf:{blip_checkpoint}", task=task, output=tmp_path / "out")


@pytest.mark.parametrize("source, match", [
    ("blip", "unknown source 'blip'; valid: hf:"),
    ("hf:", "unknown source"),
])
def test_bad_source(tmp_path, source, match):
    with pytest.raises(OptionError, match=match):
        export(source, task="caption", output=tmp_path / "out")


def test_folder_without_config(tmp_path):
    with pytest.raises(ExportError, match="has no config.json"):
        export(f"hf:{tmp_path}", task="caption", output=tmp_path / "out")


def test_hub_names_pass_the_revision_and_report_network_failures(monkeypatch, tmp_path):
    calls = []

    def fake_download(name, revision=None, allow_patterns=None):
        calls.append((name, revision))
        raise OSError("connection refused")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(ExportError, match="could not fetch 'Salesforce/blip-x' .* at revision abc123: "
                       "connection refused; pass a local folder"):
        hf.resolve("hf:Salesforce/blip-x", "abc123")
    assert calls == [("Salesforce/blip-x", "abc123")]


def test_failed_parity_leaves_no_bundle(blip_checkpoint, tmp_path, monkeypatch):
    from edgerun.export import blip

    def broken(self, run, atol):
        raise ExportError("decoder: ONNX output differs from torch by 1 (tolerance 0.001)")

    monkeypatch.setattr(blip.BlipCaptionExporter, "verify", broken)
    with pytest.raises(ExportError, match="differs from torch"):
        export(f"hf:{blip_checkpoint}", task="caption", output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary directory


def test_parity_check_compares_with_the_hf_forward(blip_checkpoint, monkeypatch):
    """The torch wrappers pass the check; the same outputs nudged by 0.01 must fail it."""
    from edgerun.export import blip

    model = hf.load_model(hf.resolve(f"hf:{blip_checkpoint}"))
    exporter = blip.BlipCaptionExporter(model)
    nudge = {"decoder": 0.0}

    def run(name, feeds):
        module = {"vision": exporter.vision, "cross_kv": exporter.cross_kv, "decoder": exporter.decoder}[name]
        with torch.no_grad():
            out = module(*[torch.from_numpy(v) for v in feeds.values()])
        out = out if isinstance(out, tuple) else (out,)
        names = {"vision": ["image_embeds"], "cross_kv": blip.cross_names(2),
                 "decoder": ["logits", "new_key", "new_value"]}[name]
        result = dict(zip(names, (o.numpy() for o in out)))
        if name == "decoder":
            result["logits"] = result["logits"] + nudge["decoder"]
        return result

    assert max(exporter.verify(run, atol=1e-3).values()) < 1e-3
    nudge["decoder"] = 0.01
    with pytest.raises(ExportError, match="decoder: ONNX output differs from torch"):
        exporter.verify(run, atol=1e-3)


def test_opset_out_of_range(blip_checkpoint, tmp_path):
    with pytest.raises(OptionError, match="opset must be between 14 and 21"):
        export(f"hf:{blip_checkpoint}", task="caption", output=tmp_path / "o", opset=9)


def test_existing_destination_is_refused_without_overwrite(blip_checkpoint, blip_bundle):
    with pytest.raises(EdgeRunError, match="exists"):
        export(f"hf:{blip_checkpoint}", task="caption", output=blip_bundle)


def test_processor_size_must_match_the_vision_model(blip_checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(blip_checkpoint, ckpt)
    cfg = json.loads((ckpt / "preprocessor_config.json").read_text())
    cfg["size"] = {"height": 64, "width": 64}
    (ckpt / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="makes 64x64 images but the vision model takes 32x32"):
        export(f"hf:{ckpt}", task="caption", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_intermediate_tensors_have_short_names(blip_bundle):
    import onnx

    graph = onnx.load(str(blip_bundle / "decoder.onnx"), load_external_data=False).graph
    io = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    inner = [o for n in graph.node for o in n.output if o not in io]
    assert inner and all(o.startswith("t") and o[1:].isdigit() for o in inner)
    assert len(set(inner)) == len(inner)
    assert any(n.name.startswith("/") for n in graph.node)  # node names still tell the module path
