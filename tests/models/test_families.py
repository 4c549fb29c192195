"""Built-in families: the config registry, the word-level tokenizer, losses, checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgerun.errors import InputError, OptionError
from edgerun.models.families import (
    build_model,
    build_tokenizer,
    list_models,
    load_checkpoint,
    model_config,
    preprocess_config,
    save_checkpoint,
)
from edgerun.models.families.reference import generate_captions
from edgerun.models.families.toydata import quick_fit, toy_dataset
from edgerun.runtime.decoding import DecodingOptions
from edgerun.runtime.tokenizer import Tokenizer

OPTIONS = {"image_encoder": {"cnn", "vit"}, "text_encoder": {"bow", "mean", "gru", "transformer"},
           "fusion": {"concat", "attention", "cross_transformer"},
           "heads": {"caption", "vqa:generative", "vqa:classifier", "retrieval"}, "lstm image_to": {"state", "input"}}


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return toy_dataset(12, size=36, seed=1)


@pytest.fixture(scope="module")
def tok(data):
    return build_tokenizer(data.texts())


def _build(name, tok, data):
    torch.manual_seed(0)
    family = model_config(name)["family"]
    return build_model(name, vocab_size=tok.vocab_size, answers=data.answer_set() if family == "transformer" else None)


# --- registry ------------------------------------------------------------------------------------


def test_list_models_covers_every_option():
    seen = {key: set() for key in OPTIONS}
    for name in list_models():
        cfg = model_config(name)
        if cfg["family"] == "lstm":
            seen["lstm image_to"].add(cfg["decoder"].get("image_to", "state"))
            seen["image_encoder"].add(cfg["image_encoder"]["type"])
            seen["heads"].add("caption")
            continue
        for key in ("image_encoder", "text_encoder", "fusion"):
            if key in cfg:
                seen[key].add(cfg[key]["type"])
        for head, head_cfg in cfg["heads"].items():
            seen["heads"].add(f"vqa:{head_cfg['type']}" if head == "vqa" else head)
    assert seen == OPTIONS
    assert "resnet18-lstm" in list_models() and list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_every_config_builds(name, tok, data):
    model = _build(name, tok, data)
    assert model.config["vocab_size"] == tok.vocab_size and model.config["name"] == name
    assert preprocess_config(model).size == (model.config["image_size"],) * 2


def test_config_mistakes_name_the_valid_choices(tok):
    with pytest.raises(OptionError, match=r"model tiny-vit not found; available models = \["):
        model_config("tiny-vit")
    cfg = model_config("tiny-vit-all")
    cfg["image_encoder"]["type"] = "swin"
    with pytest.raises(OptionError, match="unknown image encoder 'swin'; valid: cnn, vit"):
        build_model(cfg, vocab_size=tok.vocab_size)
    cfg = model_config("tiny-vit-all")
    cfg["fusion"]["layer"] = 2
    with pytest.raises(OptionError, match=r"fusion has unknown key\(s\) \['layer'\]"):
        build_model(cfg, vocab_size=tok.vocab_size)
    cfg = model_config("tiny-cnn-gru-concat")
    with pytest.raises(OptionError, match="needs the answer set"):
        build_model(cfg, vocab_size=tok.vocab_size)
    cfg["family"] = "rnn"
    with pytest.raises(OptionError, match="unknown family 'rnn'; valid: lstm, transformer"):
        build_model(cfg, vocab_size=tok.vocab_size)


def test_preprocessing_must_make_the_model_input(tok, data):
    cfg = model_config("tiny-vit-all")
    cfg["preprocess"] = {"size": [36, 36]}
    with pytest.raises(OptionError, match="makes 36x36 nchw images; the model takes 32x32"):
        preprocess_config(cfg)
    cfg["preprocess"] = {"size": [36, 36], "resize_mode": "shortest_edge", "crop_size": [32, 32]}
    assert preprocess_config(cfg).crop_size == (32, 32)
    with pytest.raises(OptionError, match="the lstm family captions only"):
        build_model("tiny-cnn-lstm", vocab_size=tok.vocab_size, answers=["yes", "no"])


# --- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_specials_words_and_runtime_file(tok, tmp_path):
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id] == [0, 1, 2, 3]
    ids = tok.encode("A Red square?")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == 6
    assert tok.decode(ids) == "a red square ?"
    assert tok.encode("a purple square", add_special_tokens=False)[1] == tok.unk_id
    path = tok.save(tmp_path / "tokenizer.json")
    runtime = Tokenizer(path)  # what a bundle's runtime reads
    assert runtime.encode("A Red square?") == ids and runtime.decode(ids) == "a red square ?"
    data = json.loads(path.read_text())
    assert data["model"]["type"] == "WordLevel"
    ids, mask = tok.batch(["a red square", "a red square on white with more words"], max_length=6)
    assert ids.shape == (2, 6) and ids[1, -1] == tok.eos_id and mask[0].tolist() == [1] * 5 + [0]


def test_tokenizer_ids_are_reproducible():
    a = build_tokenizer(["b a c", "a b", "a"])
    b = build_tokenizer(["a", "a b", "b a c"])
    assert a.to_json() == b.to_json()
    assert a.encode("a b c", add_special_tokens=False) == [4, 5, 6]  # by count, then alphabetically
    with pytest.raises(InputError, match="no words"):
        build_tokenizer([""])


# --- losses --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-cnn-lstm", "tiny-vit-all", "tiny-cnn-gru-concat", "tiny-vit-bow-attention"])
def test_losses_train_every_head(name, tok, data):
    model = _build(name, tok, data)
    batch = data.batch(tok, preprocess_config(model), model.answers)
    assert set(model.losses(batch)) == set(model.tasks)
    losses = quick_fit(model, batch, steps=8)
    assert losses[-1] < losses[0] and not model.training


def test_padding_is_ignored_by_the_caption_loss(tok, data):
    model = _build("tiny-cnn-lstm", tok, data).eval()
    batch = data.batch(tok, preprocess_config(model), rows=[0, 1])
    padded = dict(batch, caption_ids=torch.nn.functional.pad(batch["caption_ids"], (0, 3)))
    torch.testing.assert_close(model.loss(batch), model.loss(padded))


def test_batch_without_inputs_for_any_head(tok, data):
    model = _build("tiny-vit-bow-attention", tok, data)
    images = data.batch(tok, preprocess_config(model))["images"]
    with pytest.raises(InputError, match="feeds none of this model's heads"):
        model.loss({"images": images, "answer_ids": torch.zeros(12, 3, dtype=torch.long)})


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_round_trip(tok, data, tmp_path):
    model = _build("tiny-cnn-gru-concat", tok, data).eval()
    path = save_checkpoint(model, tmp_path / "run" / "best.pt", tokenizer=tok, metadata={"step": 7})
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temporary file left behind
    ckpt = load_checkpoint(path)
    assert ckpt.answers == model.answers and ckpt.metadata == {"step": 7} and ckpt.config == model.config
    assert ckpt.tokenizer.to_json() == tok.to_json() and ckpt.preprocess == preprocess_config(model)
    pixels = data.batch(tok, ckpt.preprocess, rows=[0, 1])["images"]
    options = DecodingOptions(num_beams=2, max_new_tokens=6)
    assert ([[h.token_ids for h in item] for item in generate_captions(ckpt.model, pixels, options)]
            == [[h.token_ids for h in item] for item in generate_captions(model, pixels, options)])
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt.model.state_dict()[key])


def test_checkpoint_refuses_other_files(tmp_path, tok, data):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(InputError, match="not an edge-run checkpoint"):
        load_checkpoint(other)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    model = _build("tiny-cnn-lstm", tok, data)
    with pytest.raises(InputError, match="the tokenizer has"):
        save_checkpoint(model, tmp_path / "x.pt", tokenizer=build_tokenizer(["only three words"]))


def test_save_over_an_existing_checkpoint_is_atomic(tmp_path, tok, data, monkeypatch):
    model = _build("tiny-cnn-lstm", tok, data)
    path = save_checkpoint(model, tmp_path / "best.pt", tokenizer=tok)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path, tokenizer=tok)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["best.pt"]
    assert np.isfinite(load_checkpoint(path).model.out.weight.detach().numpy()).all()
