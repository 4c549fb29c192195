"""easy-VQA converted to COCO / VQA files: captions derived from the questions, a small slice trained."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from edgerun.train.data import load_data
from edgerun.train.easyvqa import SHAPES, caption, image_facts, size_word

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
CAPTION = re.compile(rf"^a( small| large)?( ({'|'.join(COLORS)}))? ({'|'.join(SHAPES)}|shape)$")


def test_facts_from_questions_that_name_them():
    facts = image_facts([("what color is the triangle?", "red"), ("is there a blue shape?", "no")], COLORS)
    assert (facts.color, facts.shape, facts.conflicts) == ("red", "triangle", 0)
    facts = image_facts([("what is the teal shape?", "circle")], COLORS)
    assert (facts.color, facts.shape) == ("teal", "circle")


def test_facts_from_yes_no_and_negations():
    facts = image_facts([("is there not a gray shape?", "no"), ("does the image not contain a circle?", "no")], COLORS)
    assert (facts.color, facts.shape) == ("gray", "circle")
    facts = image_facts([("is there a circle?", "no"), ("is no rectangle present?", "yes")], COLORS)
    assert (facts.color, facts.shape) == (None, "triangle")  # two shapes ruled out leave the third
    facts = image_facts([("is there a red shape?", "yes"), ("what color is the shape?", "blue")], COLORS)
    assert facts.conflicts == 1


def test_caption_and_size():
    image = np.full((64, 64, 3), 240, np.uint8)
    assert size_word(image) == "small"
    image[8:40, 8:40] = (255, 0, 0)
    assert size_word(image) == "large"
    image[:] = 240
    image[20:38, 20:38] = (255, 0, 0)
    assert size_word(image) == ""
    facts = image_facts([("what color is the circle?", "blue")], COLORS)
    assert caption(facts, "large") == "a large blue circle" and caption(facts, "") == "a blue circle"
    assert caption(image_facts([], COLORS), "small") == "a small shape"


def test_prepare_a_slice(tmp_path):
    pytest.importorskip("easy_vqa", reason="pip install easy-vqa (or pip install 'edge-run[train]')")
    from edgerun.train.easyvqa import prepare_easy_vqa

    paths = prepare_easy_vqa(tmp_path / "evqa", limit=12)
    assert paths.images == {"train": 12, "test": 12}
    for split in (paths.train, paths.test):
        data = load_data(split)
        assert len(data.captions) == 12 and len(data.images) == 12 and not data.skipped.examples
        assert len(data.questions) > 12
        assert all(CAPTION.match(c.caption) for c in data.captions), [c.caption for c in data.captions]
        assert {q.answer for q in data.questions} <= set(COLORS) | set(SHAPES) | {"yes", "no"}
    questions = json.loads(paths.train[1].read_text())
    assert questions["images"][0]["file_name"] == "images/train/0.png"
    assert (paths.folder / "images" / "train" / "0.png").is_file()
    assert prepare_easy_vqa(tmp_path / "evqa", limit=12) == paths  # reused as it is


def test_train_a_few_steps_on_a_slice(tmp_path):
    pytest.importorskip("easy_vqa", reason="pip install easy-vqa (or pip install 'edge-run[train]')")
    pytest.importorskip("sacrebleu", reason="pip install sacrebleu (or pip install 'edge-run[train]')")
    from edgerun.train.easyvqa import prepare_easy_vqa
    from edgerun.train.loop import TrainOptions, train

    paths = prepare_easy_vqa(tmp_path / "evqa", limit=8)
    report = train("tiny-cnn-gru-concat", paths.train, tmp_path / "run", val_data=paths.test,
                   options=TrainOptions(epochs=1, batch_size=8, steps_per_epoch=3, threads=1, val_limit=16))
    assert report.steps == 3 and report.tasks == ("caption", "vqa")
    assert 0.0 <= report.history[0]["vqa_accuracy"] <= 1.0 and "bleu" in report.history[0]
