"""Training data: COCO / VQA files joined into examples, bad data, splits and batches."""
from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from edgerun.errors import EdgeRunError
from edgerun.models.families import build_model, build_tokenizer, model_config, preprocess_config
from edgerun.train.batches import Batcher, answer_set, config_tasks, epoch_batches, text_limits, trained_kinds
from edgerun.train.data import DataError, ImageStore, load_data, split_by_image


def _image(path, value: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((32, 32, 3), value, np.uint8)
    image[8:20, 8:20] = (200, 30, 30)
    cv2.imwrite(str(path), image)


def _dump(path, data) -> str:
    path.write_text(json.dumps(data, indent=1))
    return str(path)


@pytest.fixture
def coco(tmp_path):
    for i in range(4):
        _image(tmp_path / "pics" / f"{i}.png", 40 * i)
    images = [{"id": i, "file_name": f"pics/{i}.png"} for i in range(4)]
    captions = _dump(tmp_path / "captions.json", {"images": images, "annotations": [
        {"image_id": i, "caption": f"a red square number {i}"} for i in range(4)] + [
        {"image_id": 0, "caption": "A second caption."}]})
    questions = _dump(tmp_path / "questions.json", {"questions": [
        {"question_id": 10 + i, "image_id": i, "question": "what color is it?"} for i in range(4)]})
    answers = _dump(tmp_path / "answers.json", {"annotations": [
        {"question_id": 10 + i, "multiple_choice_answer": "red", "answers": [{"answer": "red"}, {"answer": "pink"}]}
        for i in range(4)]})
    return tmp_path, [captions, questions, answers]


def test_coco_and_vqa_files_join(coco):
    root, files = coco
    data = load_data(files)
    assert len(data.captions) == 5 and len(data.questions) == 4 and len(data.images) == 4
    assert data.images[0] == (root / "pics" / "0.png").resolve()
    q = data.questions[2]
    assert (q.question, q.answer, q.answers, q.question_id) == ("what color is it?", "red", ("red", "pink"), 12)
    assert not data.skipped.examples


def test_one_combined_file_with_inline_answers(tmp_path):
    _image(tmp_path / "a.png", 0)
    path = _dump(tmp_path / "all.json", {
        "images": [{"id": "a", "file_name": "a.png"}],
        "annotations": [{"image_id": "a", "caption": "a square"}],
        "questions": [{"question_id": 1, "image_id": "a", "question": "is it red?", "answer": "yes"},
                      {"question_id": 2, "image_id": "a", "question": "shape?", "answers": ["box", "square", "square"]}]})
    data = load_data(path)
    assert [q.answer for q in data.questions] == ["yes", "square"]
    assert data.questions[1].answers == ("box", "square", "square")


def test_vqa_v2_subtype_finds_coco_image_names(tmp_path):
    _image(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg", 10)
    questions = _dump(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"question_id": 5, "image_id": 42, "question": "what is it?"}]})
    answers = _dump(tmp_path / "a.json", {"annotations": [{"question_id": 5, "multiple_choice_answer": "box"}]})
    data = load_data([questions, answers])
    assert data.images == [(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").resolve()]


def test_missing_image_is_skipped_and_counted(coco):
    root, files = coco
    (root / "pics" / "1.png").unlink()
    data = load_data(files)
    assert len(data.captions) == 4 and len(data.questions) == 3
    assert (data.skipped.captions, data.skipped.questions) == (1, 1)
    assert "missing image files (1): " in data.skipped.summary() and "1.png" in data.skipped.summary()


def test_unknown_image_id_and_unanswered_question_are_skipped(coco):
    root, files = coco
    extra = _dump(root / "more.json", {"annotations": [{"image_id": 99, "caption": "nowhere"}],
                                       "questions": [{"question_id": 77, "image_id": 0, "question": "why?"}]})
    data = load_data(files + [extra])
    assert data.skipped.unknown_image_ids == {99} and data.skipped.unanswered == 1
    assert "without an answer" in data.skipped.summary()


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n  {"id": 1, "file_name": "a.png"},\n  oops\n]}')
    with pytest.raises(DataError, match=r"broken\.json:3:3: malformed JSON"):
        load_data(path)


@pytest.mark.parametrize("entry, match", [
    ({"image_id": 1}, r"annotations\[1\] is neither a caption"),
    ({"caption": "x"}, r"annotations\[1\] has no 'image_id'"),
    ({"image_id": 1, "caption": ""}, r"'caption' must be a non-empty str"),
    ({"question_id": 3}, r"annotations\[1\] has no answer"),
])
def test_entries_without_their_keys_are_named(tmp_path, entry, match):
    path = _dump(tmp_path / "c.json", {"annotations": [{"image_id": 1, "caption": "fine"}, entry]})
    with pytest.raises(DataError, match=match):
        load_data(path)


def test_empty_data_set(tmp_path, coco):
    with pytest.raises(DataError, match="no usable examples.*no caption annotations and no questions"):
        load_data(_dump(tmp_path / "empty.json", {"images": [], "annotations": []}))
    root, files = coco
    for png in (root / "pics").iterdir():
        png.unlink()
    with pytest.raises(EdgeRunError, match=r"no usable examples.*missing image files \(4\)"):
        load_data(files)
    with pytest.raises(DataError, match="answer annotations but no questions"):
        load_data(files[2])


def test_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        load_data(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nope.json")
    with pytest.raises(DataError, match="expected an object with any of images, annotations, questions"):
        load_data(_dump(tmp_path / "list.json", [1, 2]))


def test_unreadable_image_is_skipped(coco):
    root, files = coco
    (root / "pics" / "3.png").write_bytes(b"not a png at all")
    data = load_data(files)
    store = ImageStore(data.images, preprocess_config(build_model("tiny-cnn-lstm", vocab_size=10)))
    assert list(store.unreadable) == [3]
    data = data.without_images(store.unreadable)
    assert len(data.captions) == 4 and data.skipped.captions == 1 and "unreadable image" in data.skipped.summary()


def test_split_by_image_is_disjoint_and_seeded(coco):
    data = load_data(coco[1])
    train, val = split_by_image(data, 0.25, seed=3)
    assert set(train.image_indices()).isdisjoint(val.image_indices())
    assert len(val.image_indices()) == 1 and len(train.captions) + len(val.captions) == 5
    assert split_by_image(data, 0.25, seed=3)[1].image_indices() == val.image_indices()


def test_epoch_batches_are_a_function_of_seed_and_epoch():
    sizes = {"caption": 10, "vqa": 7}
    first = epoch_batches(sizes, 3, seed=1, epoch=1)
    again = epoch_batches(sizes, 3, seed=1, epoch=1)
    assert [(k, r.tolist()) for k, r in first] == [(k, r.tolist()) for k, r in again]
    assert [r.tolist() for _, r in first] != [r.tolist() for _, r in epoch_batches(sizes, 3, seed=1, epoch=2)]
    assert sorted(k for k, _ in first) == ["caption"] * 3 + ["vqa"] * 2  # partial batches dropped
    assert len(epoch_batches(sizes, 3, seed=1, epoch=1, limit=2)) == 2
    assert [len(r) for _, r in epoch_batches({"vqa": 2}, 8, seed=0, epoch=1)] == [2]  # a small set is one batch


@pytest.mark.parametrize("name", ["tiny-cnn-lstm", "tiny-vit-all", "tiny-cnn-gru-concat"])
def test_batches_feed_the_model_loss(coco, name):
    torch.set_num_threads(1)
    data = load_data(coco[1])
    tok = build_tokenizer(data.texts())
    classifier = name == "tiny-cnn-gru-concat"
    answers = answer_set(data) if classifier else None
    if classifier:
        data.questions.append(data.questions[0].__class__(0, "is it blue?", "no", ("no",), 99))
        answers = answer_set(data)
    model = build_model(name, vocab_size=tok.vocab_size, answers=answers)
    store = ImageStore(data.images, preprocess_config(model))
    batcher = Batcher(data, store, tok, text_limits(model), getattr(model, "vqa_mode", None), answers)
    for kind in trained_kinds(model.tasks, data):
        loss = model.loss(batcher(kind, [0, 1]))
        assert torch.isfinite(loss)
    assert trained_kinds(model.tasks, data) == (("caption",) if name == "tiny-cnn-lstm" else ("caption", "vqa"))


def test_a_model_that_cannot_learn_from_the_data(coco):
    data = replace(load_data(coco[1]), captions=[])  # questions and answers only
    with pytest.raises(DataError, match=r"heads \(caption\) learn from captions.*0 captions and 4 questions"):
        trained_kinds(config_tasks(model_config("tiny-cnn-lstm")), data)
