"""`edge-run train` on tiny generated COCO-style and VQA-style folders: checkpoints, resume, seeds."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import pytest
import torch
from click.testing import CliRunner

from edgerun.cli_train import train as train_command
from edgerun.errors import EdgeRunError, OptionError
from edgerun.models.families import load_checkpoint
from edgerun.models.families.toydata import toy_dataset
from edgerun.train import state as state_module
from edgerun.train.loop import TrainOptions, run_options, train
from edgerun.train.state import atomic_write, load_state

pytest.importorskip("sacrebleu", reason="caption validation needs sacrebleu: pip install 'edge-run[train]'")
QUICK = ["--batch-size", "4", "--warmup-steps", "2", "--threads", "1", "--quiet"]


def _write_toy(folder, n: int, seed: int) -> dict:
    """n 32x32 shape images, COCO captions, VQA questions and answers: {"captions", "questions", "answers"}."""
    toy = toy_dataset(n, size=32, seed=seed)
    (folder / "images").mkdir(parents=True)
    images = []
    for i, image in enumerate(toy.images):
        cv2.imwrite(str(folder / "images" / f"{i}.png"), image[:, :, ::-1])
        images.append({"id": i, "file_name": f"images/{i}.png"})
    files = {"captions": {"images": images, "annotations": [{"id": i, "image_id": i, "caption": c}
                                                             for i, c in enumerate(toy.captions)]},
             "questions": {"images": images, "questions": [{"question_id": 100 + i, "image_id": i, "question": q}
                                                           for i, q in enumerate(toy.questions)]},
             "answers": {"annotations": [{"question_id": 100 + i, "multiple_choice_answer": a, "answers": [a] * 10}
                                         for i, a in enumerate(toy.answers)]}}
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    return {name: str(folder / f"{name}.json") for name in files}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return _write_toy(tmp_path_factory.mktemp("coco"), 12, seed=0)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return _write_toy(tmp_path_factory.mktemp("vqa"), 12, seed=1)


def _cli(*args):
    result = CliRunner().invoke(train_command, [str(a) for a in args], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def _history(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["history"]


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_captioner_on_coco_folder(coco, tmp_path):
    run = tmp_path / "run"
    result = _cli("tiny-cnn-lstm", "--data", coco["captions"], "-o", run, "--epochs", 2, *QUICK)
    assert "trained caption for 2 epochs" in result.output and "export it: edge-run export ckpt:" in result.output
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "metrics.json", "state.pt"]
    history = _history(run)
    assert [h["epoch"] for h in history] == [1, 2] and all("bleu" in h and "loss_caption" in h for h in history)
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt.model.tasks == ("caption",) and ckpt.metadata["epoch"] in (1, 2)
    assert json.loads((run / "metrics.json").read_text())["metric"] in ("bleu", "cider")


def test_train_vqa_on_vqa_folder(vqa, tmp_path):
    run = tmp_path / "run"
    _cli("tiny-cnn-mean-concat", "--data", vqa["questions"], "--data", vqa["answers"], "-o", run, "--epochs", 1,
         *QUICK)
    (record,) = _history(run)
    assert 0.0 <= record["vqa_accuracy"] <= 1.0 and "loss_vqa" in record and "bleu" not in record
    assert load_checkpoint(run / "best.pt").metadata["metrics"]["vqa_accuracy"] == record["vqa_accuracy"]


def test_classifier_vqa_with_separate_validation_data(coco, vqa, tmp_path):
    report = train("tiny-cnn-gru-concat", list(coco.values()), tmp_path / "run", val_data=list(vqa.values()),
                   options=TrainOptions(epochs=1, batch_size=4, threads=1, metric="loss"))
    assert report.tasks == ("caption", "vqa") and report.metric == "loss"
    ckpt = load_checkpoint(report.best)
    assert ckpt.model.vqa_mode == "classifier" and set(ckpt.answers) <= set(toy_dataset(12, seed=0).answers)
    assert 0.0 <= report.history[0]["vqa_accuracy"] <= 1.0


def test_resume_equals_an_uninterrupted_run(coco, tmp_path):
    data = ["--data", coco["captions"], "--data", coco["questions"], "--data", coco["answers"]]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _cli("tiny-vit-all", *data, "-o", whole, "--epochs", 3, "--seed", 5, *QUICK)
    _cli("tiny-vit-all", *data, "-o", parts, "--epochs", 1, "--seed", 5, *QUICK)
    assert _history(parts) == _history(whole)[:1]  # same seed: the same loss curve
    _cli("tiny-vit-all", *data, "-o", parts, "--epochs", 3, "--resume", "--quiet")
    assert _history(parts) == _history(whole)
    assert _same_weights(_weights(parts / "last.pt"), _weights(whole / "last.pt"))
    a, b = load_state(parts), load_state(whole)
    assert a["step"] == b["step"] and torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(),
                                                 b["optimizer"]["state"][0].values()))
    other = tmp_path / "other"
    _cli("tiny-vit-all", *data, "-o", other, "--epochs", 1, "--seed", 6, *QUICK)
    assert _history(other)[0]["train_loss"] != _history(whole)[0]["train_loss"]


def test_resume_refuses_what_it_cannot_continue(coco, vqa, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(EdgeRunError, match="holds no training state"):
        _cli("tiny-cnn-lstm", "--data", coco["captions"], "-o", run, "--resume")
    _cli("tiny-cnn-lstm", "--data", coco["captions"], "-o", run, "--epochs", 1, *QUICK)
    assert run_options(run).batch_size == 4
    with pytest.raises(OptionError, match="already holds a run; continue it with --resume"):
        _cli("tiny-cnn-lstm", "--data", coco["captions"], "-o", run, *QUICK)
    with pytest.raises(OptionError, match=r"differ from the run's: lr \(run: 0.001\)"):
        _cli("tiny-cnn-lstm", "--data", coco["captions"], "-o", run, "--resume", "--lr", "0.01")
    with pytest.raises(OptionError, match="differs from 'tiny-cnn-lstm-input'"):
        _cli("tiny-cnn-lstm-input", "--data", coco["captions"], "-o", run, "--resume")
    with pytest.raises(EdgeRunError, match="the data differs from the run's"):
        _cli("tiny-cnn-lstm", "--data", vqa["captions"], "-o", run, "--resume", "--epochs", 2)
    with pytest.raises(OptionError, match="has done 1 epochs already"):
        _cli("tiny-cnn-lstm", "--data", coco["captions"], "-o", run, "--resume")


def test_atomic_write_keeps_the_old_file_on_a_crash(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda fh: fh.write(b"good"))

    def crash(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_crash_while_checkpointing_leaves_a_resumable_run(coco, tmp_path, monkeypatch):
    data = [coco["captions"]]
    options = TrainOptions(epochs=2, batch_size=4, warmup_steps=2, threads=1)
    whole = train("tiny-cnn-lstm", data, tmp_path / "whole", options=options)
    real, calls = state_module.atomic_write, []

    def half_then_power_cut(fh):
        fh.write(b"half a state")
        raise OSError("power cut")

    def crash_on_second_state(path, write):
        calls.append(path.name)
        return real(path, half_then_power_cut if calls.count("state.pt") == 2 else write)

    run = tmp_path / "crashed"
    monkeypatch.setattr(state_module, "atomic_write", crash_on_second_state)
    with pytest.raises(OSError, match="power cut"):
        train("tiny-cnn-lstm", data, run, options=options)
    monkeypatch.undo()
    assert load_state(run)["epoch"] == 1 and not [p for p in run.iterdir() if ".tmp" in p.name]
    resumed = train("tiny-cnn-lstm", data, run, resume=True)
    assert resumed.history == whole.history
    assert _same_weights(_weights(run / "best.pt"), _weights(whole.best))


def test_bad_data_through_the_command(coco, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"annotations": [')
    with pytest.raises(EdgeRunError, match=r"broken\.json:1:18: malformed JSON"):
        _cli("tiny-cnn-lstm", "--data", broken, "-o", tmp_path / "run", *QUICK)
    listing = json.loads(Path(coco["captions"]).read_text())
    listing["images"].append({"id": 99, "file_name": "images/gone.png"})
    listing["annotations"].append({"image_id": 99, "caption": "a lost image"})
    (tmp_path / "images").symlink_to(Path(coco["captions"]).parent / "images")
    path = tmp_path / "with_missing.json"
    path.write_text(json.dumps(listing))
    result = _cli("tiny-cnn-lstm", "--data", path, "-o", tmp_path / "run", "--epochs", 1, *QUICK)
    assert "training data: skipped 1 caption(s) and 0 question(s): missing image files (1)" in result.output
    assert "gone.png" in result.output
    with pytest.raises(OptionError, match="model nope not found; available models"):
        _cli("nope", "--data", path, "-o", tmp_path / "run2", *QUICK)


def test_progress_is_a_plain_line_without_tqdm(monkeypatch, capsys):
    from edgerun.train.loop import _Bar

    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if not installed
    bar = _Bar(4, "epoch 1/2", enabled=True)
    for loss in (4.0, 3.0, 2.0, 1.0):
        bar.update(loss)
    bar.close()
    assert "epoch 1/2: 4/4 steps, loss 1.0000" in capsys.readouterr().err
