"""VQA accuracy and caption scores (sacrebleu BLEU, pycocoevalcap CIDEr-D)."""
from __future__ import annotations

import importlib.util

import pytest

from edgerun.errors import InputError
from edgerun.train.evaluate import better, pick_metric
from edgerun.train.metrics import caption_scores, has_cider, mean_vqa_accuracy, normalize_answer, vqa_accuracy

HAS_SACREBLEU = importlib.util.find_spec("sacrebleu") is not None



def test_normalize_answer():
    assert normalize_answer("The Circle.") == "circle"
    assert normalize_answer(" Two ") == "2"
    assert normalize_answer("it's red!") == "it's red"


def test_vqa_accuracy_one_reference_is_exact_match():
    assert vqa_accuracy("Red", ["red"]) == 1.0
    assert vqa_accuracy("blue", ["red"]) == 0.0


def test_vqa_accuracy_ten_answers_averages_leave_one_out():
    answers = ["red"] * 3 + ["pink"] * 7
    # 3 subsets without one "red" see 2 matches (2/3); 7 subsets see 3 (1.0)
    assert vqa_accuracy("red", answers) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("pink", answers) == 1.0
    assert vqa_accuracy("red", ["red"] + ["pink"] * 9) == pytest.approx(0.3)


def test_vqa_accuracy_few_answers():
    assert vqa_accuracy("red", ["red", "pink"]) == 0.5
    assert vqa_accuracy("red", ["red", "red", "red", "pink"]) == 1.0
    assert mean_vqa_accuracy(["red", "blue"], [["red"], ["red"]]) == 0.5
    with pytest.raises(InputError, match="one prediction per question"):
        mean_vqa_accuracy(["red"], [["red"], ["blue"]])


@pytest.mark.skipif(not HAS_SACREBLEU, reason="pip install 'edge-run[train]' (sacrebleu)")
def test_caption_scores():
    import sacrebleu

    hyps = ["a large red circle", "a small blue square on white"]
    refs = [["a large red circle"], ["a small blue square on white", "a blue square"]]
    scores = caption_scores(hyps, refs)
    assert scores["bleu"] == pytest.approx(100.0)
    streams = [[refs[0][0], refs[1][0]], [None, refs[1][1]]]
    wrong = caption_scores(["a red box", "a box"], refs)["bleu"]
    assert wrong == pytest.approx(sacrebleu.corpus_bleu(["a red box", "a box"], streams, lowercase=True).score)
    assert ("cider" in scores) == has_cider()
    with pytest.raises(InputError, match="one caption per image"):
        caption_scores(hyps, refs[:1])


@pytest.mark.skipif(not has_cider(), reason="pip install pycocoevalcap")
@pytest.mark.skipif(not HAS_SACREBLEU, reason="pip install 'edge-run[train]' (sacrebleu)")
def test_cider_prefers_the_right_caption():
    refs = [["a large red circle"], ["a small blue square"], ["a green triangle"]]
    good = caption_scores(["a large red circle", "a small blue square", "a green triangle"], refs)["cider"]
    bad = caption_scores(["a green triangle", "a large red circle", "a small blue square"], refs)["cider"]
    assert good > 1.0 > bad


def test_best_metric_choice():
    assert pick_metric("auto", {"loss": 1, "bleu": 2, "vqa_accuracy": 0.5}) == "vqa_accuracy"
    assert pick_metric("auto", {"loss": 1, "bleu": 2}) == "bleu"
    assert pick_metric("auto", {"loss": 1}) == "loss"
    assert better("loss", 0.5, 0.6) and not better("bleu", 0.5, 0.6) and better("bleu", 0.1, None)
