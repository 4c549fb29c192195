"""Encode once, serve every task: `Model.encode()` and `state=` in caption, answer and embed_images."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import edgerun
from edgerun.errors import InputError, OptionError
from edgerun.export.builtin import export_checkpoint
from edgerun.models.families import build_model, build_tokenizer, preprocess_config, save_checkpoint
from edgerun.models.families.toydata import quick_fit, toy_dataset
from edgerun.runtime.state import ImageState


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return toy_dataset(12, size=40, seed=2)


def _bundle(name, data, folder):
    tok = build_tokenizer(data.texts())
    torch.manual_seed(0)
    model = build_model(name, vocab_size=tok.vocab_size, answers=data.answer_set())
    quick_fit(model, data.batch(tok, preprocess_config(model), data.answer_set()), steps=15)
    ckpt = save_checkpoint(model, folder / "best.pt", tokenizer=tok)
    return export_checkpoint(f"ckpt:{ckpt}", "all", folder / "bundle").path


@pytest.fixture(scope="module")
def multi(data, tmp_path_factory):
    """caption + generative VQA + retrieval in one bundle."""
    return edgerun.load(_bundle("tiny-vit-all", data, tmp_path_factory.mktemp("multi")), threads=1)


@pytest.fixture(scope="module")
def classifier(data, tmp_path_factory):
    """classifier VQA + retrieval in one bundle."""
    return edgerun.load(_bundle("tiny-vit-bow-attention", data, tmp_path_factory.mktemp("cls")), threads=1)


def test_one_encoding_serves_every_task(multi, data):
    image = data.images[0]
    state = multi.encode(image)
    assert isinstance(state, ImageState) and len(state) == 1 and set(state.values) == {"image_features"}
    assert "vision" in multi.last_timings
    from_state = multi.caption(state=state, num_beams=3)
    assert "vision" not in multi.last_timings  # the encoder did not run again
    assert from_state == multi.caption(image, num_beams=3)
    question = data.questions[0]
    assert multi.answer(question=question, state=state, num_beams=2) == multi.answer(image, question, num_beams=2)
    np.testing.assert_array_equal(multi.embed_images(state=state), multi.embed_images([image]))


def test_batches_and_pixel_values(multi, data):
    images = data.images[:3]
    state = multi.encode(images)
    assert len(state) == 3
    assert multi.caption_batch(state=state, num_beams=2) == multi.caption_batch(images, num_beams=2)
    questions = data.questions[:3]
    assert multi.answer_batch(state=state, questions=questions) == multi.answer_batch(images, questions)
    pixels = multi.pixel_values(images)
    np.testing.assert_array_equal(multi.encode(pixel_values=pixels).values["image_features"],
                                  state.values["image_features"])
    np.testing.assert_array_equal(multi.embed_images(state=state), multi.embed_images(pixel_values=pixels))


def test_classifier_answers_from_a_state(classifier, data):
    image, question = data.images[1], data.questions[1]
    state = classifier.encode([image])
    top = classifier.answer(question=question, state=state, num_return_sequences=3)
    assert top[0] == classifier.answer(image, question)
    scores = [a.score for a in top]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    np.testing.assert_array_equal(classifier.embed_images(state=state), classifier.embed_images([image]))


def test_a_state_from_another_model_is_refused(multi, classifier, data):
    state = classifier.encode(data.images[0])
    with pytest.raises(InputError, match="encoded by another model"):
        multi.caption(state=state)
    with pytest.raises(InputError, match="encoded by another model"):
        multi.embed_images(state=state)
    with pytest.raises(InputError, match="encoded by another model"):
        classifier.answer(question="what?", state=multi.encode(data.images[0]))


def test_a_copy_of_the_bundle_accepts_the_state(multi, data, tmp_path):
    """The state is bound to the model and its encoder file, not to a directory."""
    copy = edgerun.load(shutil.copytree(multi.bundle.path, tmp_path / "copy"), threads=1)
    state = multi.encode(data.images[0])
    assert copy.caption(state=state) == multi.caption(state=state)


def test_bad_uses_of_a_state(multi, data):
    state = multi.encode(data.images[:2])
    with pytest.raises(InputError, match="batch of 1; got 2 images: use caption_batch"):
        multi.caption(state=state)
    with pytest.raises(InputError, match="batch of 1; got 2 images: use answer_batch"):
        multi.answer(question="what?", state=state)
    with pytest.raises(InputError, match="exactly one of image or pixel_values"):
        multi.caption(data.images[0], state=state)
    with pytest.raises(InputError, match="goes in as state="):
        multi.caption(state)
    with pytest.raises(InputError, match="goes in as state="):
        multi.embed_images([state])
    with pytest.raises(InputError, match="one question per image: 2 image"):
        multi.answer_batch(state=state, questions=["what?"])
    with pytest.raises(InputError, match="state must be an ImageState"):
        multi.caption(state=np.zeros((1, 17, 32), np.float32))


def test_encode_once_on_a_hugging_face_bundle(blip_bundle, multi):
    from skimage import data as images

    blip = edgerun.load(blip_bundle, threads=1)
    state = blip.encode(images.chelsea())
    assert blip.caption(state=state, num_beams=2, max_new_tokens=6) == blip.caption(images.chelsea(), num_beams=2,
                                                                                    max_new_tokens=6)
    with pytest.raises(InputError, match="encoded by another model"):
        multi.caption(state=state)
    with pytest.raises(OptionError, match="does not serve retrieval; it serves: caption"):
        blip.embed_images(state=state)
