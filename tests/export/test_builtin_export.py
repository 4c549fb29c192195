"""Built-in families: train a few steps on generated data, save a checkpoint, export `ckpt:` bundles,
and hold the runtime to the torch model: the same numpy beam search over a torch `Inference`
(teacher-forcing forward, no cache) gives the exact token ids the ONNX bundle gives; embeddings
agree to cosine 0.9999; classifier VQA picks the same classes."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import edgerun
from edgerun.errors import OptionError, UnsupportedModelError
from edgerun.export.builtin import export_checkpoint
from edgerun.models.families import build_model, build_tokenizer, preprocess_config, save_checkpoint
from edgerun.models.families.reference import answer_probabilities, generate_answers, generate_captions
from edgerun.models.families.toydata import quick_fit, toy_dataset
from edgerun.runtime.decoding import DecodingOptions

CONFIGS = ["tiny-cnn-lstm", "tiny-cnn-lstm-input", "tiny-vit-all", "tiny-cnn-gru-concat", "tiny-vit-bow-attention",
           "tiny-cnn-mean-concat"]
CAPTIONERS = ["tiny-cnn-lstm", "tiny-cnn-lstm-input", "tiny-vit-all", "tiny-cnn-gru-concat"]
GENERATIVE_VQA = ["tiny-vit-all", "tiny-cnn-mean-concat"]
CLASSIFIER_VQA = ["tiny-cnn-gru-concat", "tiny-vit-bow-attention"]
RETRIEVAL = ["tiny-vit-all", "tiny-vit-bow-attention", "tiny-cnn-mean-concat"]
OPTIONS = [
    DecodingOptions(num_beams=1, max_new_tokens=10),
    DecodingOptions(num_beams=3, max_new_tokens=10),
    DecodingOptions(num_beams=3, max_new_tokens=8, num_return_sequences=2, length_penalty=0.5, early_stopping=True),
    DecodingOptions(num_beams=2, max_new_tokens=7, early_stopping="never", no_repeat_ngram_size=2),
]


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return toy_dataset(24, size=40, seed=0)


@pytest.fixture(scope="module")
def family(data, tmp_path_factory):
    """config name -> trained model, tokenizer, checkpoint and its `--task all` bundle, made once."""
    made = {}

    def get(name: str):
        if name not in made:
            tok = build_tokenizer(data.texts())
            answers = data.answer_set()
            torch.manual_seed(0)
            model = build_model(name, vocab_size=tok.vocab_size, answers=None if "lstm" in name else answers)
            prep = preprocess_config(model)
            losses = quick_fit(model, data.batch(tok, prep, answers if model.answers else None), steps=25)
            folder = tmp_path_factory.mktemp(name)
            ckpt = save_checkpoint(model, folder / "best.pt", tokenizer=tok, metadata={"losses": losses[-1]})
            report = export_checkpoint(f"ckpt:{ckpt}", "all", folder / "bundle")
            pixels = data.batch(tok, prep, rows=range(6))["images"]
            made[name] = SimpleNamespace(model=model, tok=tok, ckpt=ckpt, report=report, pixels=pixels,
                                         runtime=edgerun.load(report.path, threads=1), losses=losses)
        return made[name]

    return get


@pytest.mark.parametrize("name", CONFIGS)
def test_training_lowers_the_loss_and_export_passes_parity(family, name):
    f = family(name)
    assert f.losses[-1] < f.losses[0]
    assert f.runtime.tasks == f.model.tasks
    assert all(diff < 1e-4 for diff in f.report.max_abs_diff.values()), f.report.max_abs_diff


def _ids(results):
    """Token ids and scores per image, whatever num_return_sequences gave."""
    rows = [r if isinstance(r, list) else [r] for r in results]
    return [[c.token_ids for c in row] for row in rows], [[c.score for c in row] for row in rows]


@pytest.mark.parametrize("options", OPTIONS, ids=["greedy", "beam3", "beam3-return2-lp-early", "beam2-never-ngram"])
@pytest.mark.parametrize("name", CAPTIONERS)
def test_caption_ids_match_torch(family, name, options):
    f = family(name)
    want = generate_captions(f.model, f.pixels, options)
    got = f.runtime.caption_batch(pixel_values=f.pixels.numpy(), **dataclasses.asdict(options))
    got_ids, got_scores = _ids(got)
    assert got_ids == [[h.token_ids for h in item] for item in want]
    np.testing.assert_allclose(got_scores, [[h.score for h in item] for item in want], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CAPTIONERS)
def test_captions_finish_and_say_something(family, name):
    """Trained a little, captions end with [EOS] before the limit: the early-finish paths run."""
    f = family(name)
    got = f.runtime.caption_batch(pixel_values=f.pixels.numpy(), num_beams=3, max_new_tokens=12)
    assert any(c.token_ids[-1] == f.tok.eos_id and len(c.token_ids) < 14 for c in got)
    assert all(c.token_ids[0] == f.tok.bos_id for c in got)
    assert any(c.text for c in got)


def _questions(data, n):
    return [data.questions[i] for i in range(n)]


@pytest.mark.parametrize("options", OPTIONS, ids=["greedy", "beam3", "beam3-return2-lp-early", "beam2-never-ngram"])
@pytest.mark.parametrize("name", GENERATIVE_VQA)
def test_generative_vqa_ids_match_torch(family, data, name, options):
    options = dataclasses.replace(options, max_new_tokens=6)  # answer decoders hold 8 positions
    f = family(name)
    questions = _questions(data, len(f.pixels))
    ids, mask = f.tok.batch(questions)
    want = generate_answers(f.model, f.pixels, torch.from_numpy(ids), torch.from_numpy(mask), options)
    got = f.runtime.answer_batch(pixel_values=f.pixels.numpy(), questions=questions, **dataclasses.asdict(options))
    got_ids, got_scores = _ids(got)
    assert got_ids == [[h.token_ids for h in item] for item in want]
    np.testing.assert_allclose(got_scores, [[h.score for h in item] for item in want], rtol=1e-4, atol=1e-5)
    alone = f.runtime.answer(pixel_values=f.pixels[1:2].numpy(), question=questions[1], **dataclasses.asdict(options))
    assert _ids([alone])[0][0] == got_ids[1]  # padding in the batch changes nothing


@pytest.mark.parametrize("name", CLASSIFIER_VQA)
def test_classifier_vqa_classes_match_torch(family, data, name):
    f = family(name)
    questions = _questions(data, len(f.pixels))
    ids, mask = f.tok.batch(questions)
    probs = answer_probabilities(f.model, f.pixels, torch.from_numpy(ids), torch.from_numpy(mask))
    got = f.runtime.answer_batch(pixel_values=f.pixels.numpy(), questions=questions)
    assert [a.text for a in got] == [f.model.answers[i] for i in probs.argmax(-1)]
    np.testing.assert_allclose([a.score for a in got], probs.max(-1), rtol=1e-4, atol=1e-6)
    top = f.runtime.answer(pixel_values=f.pixels[:1].numpy(), question=questions[0], num_return_sequences=3)
    assert [a.text for a in top] == [f.model.answers[i] for i in np.argsort(-probs[0], kind="stable")[:3]]
    assert top[0].token_ids == f.tok.encode(top[0].text, add_special_tokens=False)


@pytest.mark.parametrize("name", RETRIEVAL)
def test_retrieval_embeddings_match_torch(family, data, name):
    f = family(name)
    with torch.no_grad():
        want_images = f.model.image_embeds(f.model.encode_image(f.pixels)).numpy()
        texts = data.captions[:5] + ["a red", "what is this long caption about a green bar on black"]
        ids, mask = f.tok.batch(texts)
        want_texts = f.model.text_embeds(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    for got, want in ((f.runtime.embed_images(pixel_values=f.pixels.numpy()), want_images),
                      (f.runtime.embed_texts(texts), want_texts)):
        assert got.shape == want.shape and got.dtype == np.float32
        cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cosine.min() >= 0.9999


def test_manifest_describes_caches_roles_and_answers(family):
    lstm = family("tiny-cnn-lstm").runtime.manifest
    assert lstm.modules["decoder"].extra["cache"]["type"] == "rnn"
    assert lstm.modules["decoder"].extra["cache"]["state"] == ["h", "c"]
    assert lstm.provenance["source"].startswith("ckpt:") and lstm.provenance["family"] == "lstm"
    multi = family("tiny-vit-all").runtime.manifest
    assert set(multi.tasks) == {"caption", "vqa", "retrieval"}
    assert {t.modules[0] for t in multi.tasks.values()} == {"vision"}
    assert multi.modules["decoder"].extra["cache"]["type"] == "kv"
    assert multi.modules["vqa_decoder"].extra["role"] == "decoder"
    cls = family("tiny-cnn-gru-concat")
    assert cls.runtime.manifest.modules["vqa_classifier"].extra["answers"] == list(cls.model.answers)
    assert cls.runtime.manifest.model["vqa_mode"] == "classifier"


def test_single_task_export_and_bad_requests(family, tmp_path):
    f = family("tiny-vit-all")
    report = export_checkpoint(f"ckpt:{f.ckpt}", "caption", tmp_path / "caption")
    manifest = edgerun.load(report.path).manifest
    assert list(manifest.tasks) == ["caption"]
    assert set(manifest.modules) == {"vision", "vision@cpu", "cross_kv", "decoder", "decoder@cpu",
                                     "decoder@cpu-beams3"}  # + CPU variants (the last: beam_heads.py)
    assert manifest.modules["decoder@cpu-beams3"].extra["pad"]  # its cross_kv takes any number of rows already
    assert manifest.modules["decoder@cpu"].backends == ("cpu",) and "cpu" not in manifest.modules["decoder"].backends
    with pytest.raises(UnsupportedModelError, match="cannot be exported for task 'vqa'; it serves: caption"):
        export_checkpoint(f"ckpt:{family('tiny-cnn-lstm').ckpt}", "vqa", tmp_path / "x")
    with pytest.raises(OptionError, match="unknown task 'captions'; valid: caption, vqa, retrieval, all"):
        export_checkpoint(f"ckpt:{f.ckpt}", "captions", tmp_path / "y")
    with pytest.raises(OptionError, match="--revision applies to hub names"):
        export_checkpoint(f"ckpt:{f.ckpt}", "caption", tmp_path / "y", revision="main")
    with pytest.raises(OptionError, match="opset must be between 14 and 21"):
        export_checkpoint(f"ckpt:{f.ckpt}", "caption", tmp_path / "y", opset=9)
    with pytest.raises(OptionError, match="does not exist"):
        export_checkpoint(f"ckpt:{tmp_path / 'none.pt'}", "caption", tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_default_max_new_tokens_fits_the_decoder(family):
    """Without max_new_tokens, generation stops at the decoder's positions instead of failing."""
    f = family("tiny-cnn-mean-concat")  # answer decoder of 8 positions
    got = f.runtime.answer(pixel_values=f.pixels[:1].numpy(), question="what shape is it?")
    assert len(got.token_ids) <= 8
    with pytest.raises(OptionError, match="exceeds the model's 8 positions"):
        f.runtime.answer(pixel_values=f.pixels[:1].numpy(), question="what shape is it?", max_new_tokens=10)
