"""`calibrate --eval DATA.json`: task metrics against the float twin's, and what --max-drop judges."""
import json

import cv2
import numpy as np
import pytest

import edgerun
from edgerun.calibration import taskeval
from edgerun.calibration.accuracy import AccuracyReport, Metric
from edgerun.calibration.pipeline import CalibrationOptions, calibrate
from edgerun.errors import InputError
from edgerun.train.metrics import mean_vqa_accuracy


def test_recall_both_directions():
    # image 0 owns texts 0 and 1, image 1 text 2, image 2 text 3
    owner = np.array([0, 0, 1, 2])
    sim = np.array([[0.1, 0.9, 0.5, 0.0],    # image 0: own text 1 ranks first
                    [0.8, 0.0, 0.2, 0.7],    # image 1: own text 2 below texts 0 and 3 (rank 2)
                    [0.0, 0.3, 0.1, 0.2]])   # image 2: own text 3 below text 1 (rank 1)
    got = {(name, k): v for name, k, v in taskeval.recall(sim, owner)}
    assert got[("image_to_text_recall", 1)] == pytest.approx(1 / 3)
    assert got[("image_to_text_recall", 5)] == 1.0
    # texts: 0 -> image 0 (0.1) below image 1 (0.8): rank 1; 1 -> rank 0; 2 -> below image 0: rank 1; 3 -> rank 1
    assert got[("text_to_image_recall", 1)] == pytest.approx(1 / 4)
    assert got[("text_to_image_recall", 5)] == 1.0


def test_task_metrics_gate_max_drop():
    agreement = Metric("vqa", "exact_answer_agreement", 0.5)
    task = Metric("vqa", "vqa_accuracy", 0.79, reference=0.80)
    assert task.drop == pytest.approx(0.01) and agreement.drop == 0.5
    assert Metric("vqa", "vqa_accuracy", 0.9, reference=0.8).drop == 0.0  # better than float: no drop
    report = AccuracyReport("cpu", 8, [agreement, task])
    assert report.gating == [task] and report.within(0.02) and not report.within(0.005)
    assert report.worst is task
    assert AccuracyReport("cpu", 8, [agreement]).within(0.4) is False  # no task metric: agreement gates


def test_data_spec_and_empty_data(tmp_path):
    assert taskeval.is_data_spec("a.json,b.JSON") and not taskeval.is_data_spec("photos/")
    (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(InputError):
        taskeval.load(str(tmp_path / "empty.json"), 8)


@pytest.fixture(scope="module")
def vqa_data(vqa_bundle, tmp_path_factory):
    """Images and questions whose answers are the float bundle's own: float accuracy is 1 by design."""
    from skimage import data

    folder = tmp_path_factory.mktemp("vqa-data")
    names = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel")
    for name in names:
        cv2.imwrite(str(folder / f"{name}.jpg"), getattr(data, name)()[..., :3][..., ::-1])
    asked = ["what is it?", "what color is it?"]
    model = edgerun.load(vqa_bundle)
    rows = [(i, q) for i in range(len(names)) for q in asked]
    found = model.answer_batch([str(folder / f"{names[i]}.jpg") for i, _ in rows], [q for _, q in rows],
                               num_beams=1)
    doc = {"images": [{"id": i, "file_name": f"{n}.jpg"} for i, n in enumerate(names)],
           "questions": [{"question_id": k, "image_id": i, "question": q, "answer": a.text}
                         for k, ((i, q), a) in enumerate(zip(rows, found))]}
    (folder / "qa.json").write_text(json.dumps(doc))
    return folder, rows, [a.text for a in found], names


def test_eval_data_scores_vqa_accuracy_against_the_float_twin(vqa_bundle, vqa_data, tmp_path):
    folder, rows, labels, names = vqa_data
    options = CalibrationOptions(samples=4, decoder_samples=2, eval_data=str(folder / "qa.json"), eval_samples=5)
    report = calibrate(vqa_bundle, str(folder), tmp_path / "out", options)
    cpu = next(r for r in report.accuracy if r.variant == "cpu")
    metric = next(m for m in cpu.metrics if m.name == "vqa_accuracy")
    assert metric.reference == 1.0  # the labels are the float answers
    kept = [(i, q) for i, q in rows if i < 5]  # --eval-samples 5: the first five images' questions
    int8 = edgerun.load(tmp_path / "out")
    got = int8.answer_batch([str(folder / f"{names[i]}.jpg") for i, _ in kept], [q for _, q in kept], num_beams=1)
    assert metric.value == pytest.approx(mean_vqa_accuracy([a.text for a in got], [(t,) for t in labels[:len(kept)]]))
    q = json.loads((tmp_path / "out" / "manifest.json").read_text())["quantization"]
    assert q["accuracy"]["eval_data"] == {"images": 5, "captions": 0, "questions": len(kept)}
    entry = next(m for v in q["accuracy"]["variants"] if v["variant"] == "cpu" for m in v["metrics"]
                 if m["metric"] == "vqa_accuracy")
    assert entry["float"] == 1.0 and entry["drop"] == pytest.approx(1.0 - metric.value, abs=1e-6)
    assert metric.samples == entry["samples"] == len(kept)  # the questions the accuracy is a rate over


def test_a_max_drop_finer_than_one_example_is_pointed_out(vqa_bundle, vqa_data, tmp_path):
    from edgerun.calibration.pipeline import AccuracyDropError

    folder, *_ = vqa_data
    said = []
    options = CalibrationOptions(samples=4, decoder_samples=2, eval_data=str(folder / "qa.json"), eval_samples=5,
                                 max_drop=0.05)  # 10 questions: one answer moves the accuracy by 0.1
    try:
        notes = calibrate(vqa_bundle, str(folder), tmp_path / "out", options, progress=said.append).notes
    except AccuracyDropError:
        notes = [s.removeprefix("note: ") for s in said if s.startswith("note: ")]
    assert any("finer than one example of vqa vqa_accuracy (1/10 = 0.100)" in n for n in notes), said
    options = CalibrationOptions(samples=4, decoder_samples=2, eval_data=str(folder / "qa.json"), eval_samples=5,
                                 max_drop=1.0)
    report = calibrate(vqa_bundle, str(folder), tmp_path / "out2", options)
    assert not any("finer than one example" in n for n in report.notes)


def test_rates_are_over_images_captions_or_questions():
    data = taskeval.TaskData(images=[], captions=[(0, "a"), (0, "b"), (2, "c")], questions=[(1, "q", ("x",))],
                             skipped="")
    assert taskeval.rate_over(data, "retrieval", "image_to_text_recall@5") == 2  # images that have captions
    assert taskeval.rate_over(data, "retrieval", "text_to_image_recall@1") == 3
    assert taskeval.rate_over(data, "vqa", "vqa_accuracy") == 1


@pytest.fixture(scope="module")
def caption_data(blip_bundle, tmp_path_factory):
    """Images captioned by the float bundle, those captions their references: float BLEU is 1."""
    from skimage import data

    folder = tmp_path_factory.mktemp("caption-data")
    names = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
    for name in names:
        cv2.imwrite(str(folder / f"{name}.jpg"), getattr(data, name)()[..., :3][..., ::-1])
    paths = [str(folder / f"{n}.jpg") for n in names]
    texts = [c.text for c in edgerun.load(blip_bundle).caption_batch(paths)]
    doc = {"images": [{"id": i, "file_name": f"{n}.jpg"} for i, n in enumerate(names)],
           "annotations": [{"id": i, "image_id": i, "caption": t} for i, t in enumerate(texts)]}
    (folder / "captions.json").write_text(json.dumps(doc))
    return folder, paths, texts


def test_eval_data_scores_captions_against_references_and_the_float_captions(blip_bundle, caption_data, tmp_path):
    from edgerun.train.metrics import caption_scores

    folder, paths, texts = caption_data
    options = CalibrationOptions(samples=4, decoder_samples=2, eval_data=str(folder / "captions.json"))
    report = calibrate(blip_bundle, str(folder), tmp_path / "out", options)
    cpu = {m.name: m for m in next(r for r in report.accuracy if r.variant == "cpu").metrics}
    own = caption_scores(texts, [[t] for t in texts])
    assert cpu["bleu"].reference == pytest.approx(own["bleu"] / 100) == pytest.approx(1.0)
    assert cpu["cider"].reference == pytest.approx(own["cider"])
    int8 = [c.text for c in edgerun.load(tmp_path / "out").caption_batch(paths)]
    mine = caption_scores(int8, [[t] for t in texts])
    assert cpu["bleu"].value == pytest.approx(mine["bleu"] / 100)
    assert cpu["cider"].value == pytest.approx(mine["cider"])
    # the references are the float captions, so the agreements are the same scores over the float's own
    assert cpu["bleu_vs_float"].value == pytest.approx(min(1.0, mine["bleu"] / own["bleu"]))
    assert cpu["cider_vs_float"].value == pytest.approx(min(1.0, mine["cider"] / own["cider"]))
    assert cpu["bleu_vs_float"].reference is None and cpu["bleu_vs_float"].samples == len(paths)
    gating = next(r for r in report.accuracy if r.variant == "cpu").gating
    assert {m.name for m in gating} == {"bleu", "cider"}  # the task scores gate, not the agreements
    q = json.loads((tmp_path / "out" / "manifest.json").read_text())["quantization"]
    assert q["accuracy"]["eval_data"] == {"images": len(paths), "captions": len(paths), "questions": 0}
    entry = next(m for v in q["accuracy"]["variants"] if v["variant"] == "cpu" for m in v["metrics"]
                 if m["metric"] == "cider")
    assert entry["float"] == pytest.approx(own["cider"], abs=1e-6) and entry["task"] == "caption"


def test_caption_references_follow_the_captioned_images():
    data = taskeval.TaskData(images=[], captions=[(2, "c"), (0, "a"), (0, "b")], questions=[], skipped="")
    assert taskeval.captioned(data) == [0, 2]
    assert taskeval.references(data) == [["a", "b"], ["c"]]
    assert taskeval.rate_over(data, "caption", "bleu") is None  # a corpus score, not a rate over examples
    same = taskeval.float_agreement(["a b c d", "e f g h"], ["a b c d", "e f g h"])
    assert [(m.name, m.value) for m in same] == [("bleu_vs_float", pytest.approx(1.0)), ("cider_vs_float", 1.0)]
    other = {m.name: m.value for m in taskeval.float_agreement(["a b x d", "e f g h"], ["a b c d", "e f g h"])}
    assert 0 < other["bleu_vs_float"] < 1 and 0 < other["cider_vs_float"] < 1
