"""VQA accuracy and caption scores (sacrebleu BLEU, our CIDEr-D)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgerun.errors import InputError
from edgerun.train.evaluate import better, pick_metric
from edgerun.train.metrics import caption_scores, cider_d, mean_vqa_accuracy, normalize_answer, vqa_accuracy

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
    assert scores["cider"] > caption_scores(["a red box", "a box"], refs)["cider"]
    with pytest.raises(InputError, match="one caption per image"):
        caption_scores(hyps, refs[:1])


@pytest.mark.skipif(not HAS_SACREBLEU, reason="pip install 'edge-run[train]' (sacrebleu)")
def test_cider_prefers_the_right_caption():
    refs = [["a large red circle"], ["a small blue square"], ["a green triangle"]]
    good = caption_scores(["a large red circle", "a small blue square", "a green triangle"], refs)["cider"]
    bad = caption_scores(["a green triangle", "a large red circle", "a small blue square"], refs)["cider"]
    assert good > 1.0 > bad


def test_cider_d_matches_the_coco_evaluation():
    # pycocoevalcap 1.2's Cider().compute_score on this corpus (computed once, 2026-11-28):
    # 2.568960961467099, per image [2.31837557, 2.37580099, 3.01270632]
    refs = [["a man riding a horse on a beach", "a person on a horse by the sea"],
            ["two cats sleeping on a red sofa"],
            ["a plate of food with broccoli", "a dish with vegetables and rice", "broccoli and rice on a plate"]]
    hyps = ["a man rides a horse on the beach", "a cat sleeping on a sofa", "a plate with broccoli and rice"]
    corpus, per_image = cider_d(hyps, refs)
    assert corpus == pytest.approx(2.568960961467099, rel=1e-12)
    assert per_image == pytest.approx([2.31837557, 2.37580099, 3.01270632], abs=1e-8)


def test_cider_d_definition_by_hand():
    # Two images, one reference each, nothing shared: every n-gram has document frequency 1, so
    # each weight is tf * log(2) and a caption equal to its reference has cosine 1 in every order
    # it has: "a b c d" has all four orders -> 10; "x y" only unigrams and bigrams -> 10 * 2 / 4.
    corpus, per_image = cider_d(["a b c d", "x y"], [["a b c d"], ["x y"]])
    assert per_image == pytest.approx([10.0, 5.0]) and corpus == pytest.approx(7.5)
    # a word the references never use costs through the norm only; one shorter by two bigrams pays
    # the length penalty exp(-4 / 72) on top
    _, (dropped, _) = cider_d(["a b", "x y"], [["a b c d"], ["x y"]])
    # unigrams: 2 of 4 shared -> cosine 2 / (sqrt(2) * 2); bigrams: 1 of 3 -> 1 / sqrt(3); no 3- or 4-grams
    assert dropped == pytest.approx(10 * (2 / (2 * 2 ** 0.5) + 1 / 3 ** 0.5) / 4 * np.exp(-4 / 72))
    # an n-gram in every image's references weighs log(2) - log(2) = 0: it cannot raise a score
    _, (shared, _) = cider_d(["the", "x y"], [["the a b"], ["the x y"]])
    assert shared == 0.0
    assert cider_d(["a b c d"], [["a b c d"]])[0] == 0.0  # one image: idf is log(1) = 0
    with pytest.raises(InputError, match="at least one reference"):
        cider_d(["a"], [[]])


def test_best_metric_choice():
    assert pick_metric("auto", {"loss": 1, "bleu": 2, "vqa_accuracy": 0.5}) == "vqa_accuracy"
    assert pick_metric("auto", {"loss": 1, "bleu": 2}) == "bleu"
    assert pick_metric("auto", {"loss": 1}) == "loss"
    assert better("loss", 0.5, 0.6) and not better("bleu", 0.5, 0.6) and better("bleu", 0.1, None)
