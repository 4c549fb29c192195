"""BLIP VQA: export, parity with BlipForQuestionAnswering.generate(), question handling, CLI."""
import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from parity import strip_padding

import edgerun
from edgerun.errors import InputError, OptionError
from edgerun.models.tiny import WORDS

EARLY = (True, False, "never")


def _cases(n=40, seed=11):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        beams = int(rng.integers(1, 5))
        max_new = int(rng.choice([1, 4, 9, 14]))
        cases.append({
            "question": " ".join(rng.choice(WORDS, int(rng.integers(0, 9)))),
            "num_beams": beams, "max_new_tokens": max_new,
            "min_new_tokens": min(max_new, int(rng.choice([0, 0, 3]))),
            "length_penalty": float(rng.choice([-1.0, 0.0, 1.0, 2.0])),
            "early_stopping": EARLY[i % 3],
            "no_repeat_ngram_size": int(rng.choice([0, 0, 2])),
            "repetition_penalty": float(rng.choice([1.0, 1.0, 1.5])),
            "num_return_sequences": int(rng.integers(1, beams + 1)),
            "seed": i,
        })
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def model(vqa_bundle):
    return edgerun.load(vqa_bundle, threads=1)


@pytest.fixture(scope="module")
def hf(vqa_checkpoint):
    from transformers import AutoTokenizer, BlipForQuestionAnswering

    torch.set_num_threads(1)
    return (BlipForQuestionAnswering.from_pretrained(vqa_checkpoint).eval(),
            AutoTokenizer.from_pretrained(vqa_checkpoint))


def _pixels(seed, n=1):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _generate(hf, pixels, question, **kwargs):
    model, tok = hf
    ids = tok([question], return_tensors="pt").input_ids
    with torch.no_grad():
        return model.generate(input_ids=ids, pixel_values=torch.from_numpy(pixels), do_sample=False,
                              output_scores=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[f"vqa{c['seed']}" for c in CASES])
def test_answer_matches_generate(model, hf, case):
    pixels = _pixels(case["seed"])
    options = {k: v for k, v in case.items() if k not in ("question", "seed")}
    out = _generate(hf, pixels, case["question"], **options)
    got = model.answer(pixel_values=pixels, question=case["question"], **options)
    got = got if isinstance(got, list) else [got]
    stop = hf[0].config.text_config.sep_token_id
    for r, answer in enumerate(got):
        assert answer.token_ids == strip_padding(out.sequences[r].tolist(), 1, stop)
        assert answer.text == hf[1].decode(answer.token_ids, skip_special_tokens=True)
        if case["num_beams"] > 1:
            assert answer.score == pytest.approx(float(out.sequences_scores[r]), rel=1e-4, abs=1e-4)


def test_cases_finish_early_and_run_to_max(model):
    stop = model.manifest.decoding["stop_ids"][0]
    ends = [model.answer(pixel_values=_pixels(c["seed"]), question=c["question"], num_beams=c["num_beams"],
                         max_new_tokens=14) for c in CASES[:20]]
    finished = sum(a.token_ids[-1] == stop for a in ends)
    assert 0 < finished < len(ends)
    assert min(len(a.token_ids) for a in ends) < 15 and max(len(a.token_ids) for a in ends) == 15


def test_batch_of_different_lengths_equals_each_alone(model):
    questions = ["what", "how many dogs are sitting on the table near the street", ""]
    pixels = _pixels(5, 3)
    batch = model.answer_batch(pixel_values=pixels, questions=questions, num_beams=3, max_new_tokens=8)
    for i, q in enumerate(questions):
        alone = model.answer(pixel_values=pixels[i:i + 1], question=q, num_beams=3, max_new_tokens=8)
        assert batch[i].token_ids == alone.token_ids
        assert batch[i].score == pytest.approx(alone.score, rel=1e-5, abs=1e-5)


def test_empty_long_and_non_ascii_questions(model, hf):
    pixels = _pixels(3)
    for question in ("", "qu'est-ce que c'est? 猫 ñandú café"):
        out = _generate(hf, pixels, question, num_beams=2, max_new_tokens=6)
        want = strip_padding(out.sequences[0].tolist(), 1, 3)
        assert model.answer(pixel_values=pixels, question=question, num_beams=2, max_new_tokens=6).token_ids == want
    long_question = " ".join(["dog"] * 200)  # 200 tokens > the tiny model's 64 positions
    with pytest.warns(UserWarning, match="question of 202 tokens truncated to the model's 64"):
        a = model.answer(pixel_values=pixels, question=long_question, max_new_tokens=4)
    model_hf, tok = hf
    ids = tok([long_question], return_tensors="pt", truncation=True, max_length=64).input_ids
    with torch.no_grad():
        want = model_hf.generate(input_ids=ids, pixel_values=torch.from_numpy(pixels), max_new_tokens=4)
    assert a.token_ids == strip_padding(want[0].tolist(), 1, 3)


def test_answer_from_an_image_file(model, tmp_path):
    import cv2
    from skimage import data

    path = tmp_path / "rocket.png"
    cv2.imwrite(str(path), cv2.cvtColor(data.rocket(), cv2.COLOR_RGB2BGR))
    by_path = model.answer(path, "what is in the image", num_beams=2, max_new_tokens=5)
    by_array = model.answer(data.rocket(), "what is in the image", num_beams=2, max_new_tokens=5)
    assert by_path == by_array and isinstance(by_path, edgerun.Answer)


def test_bad_vqa_inputs(model, blip_bundle):
    with pytest.raises(InputError, match="a question must be a string, got NoneType"):
        model.answer(pixel_values=_pixels(0), question=None)
    with pytest.raises(InputError, match="one question per image: 2 image"):
        model.answer_batch(pixel_values=_pixels(0, 2), questions=["a"])
    with pytest.raises(OptionError, match="does not serve vqa; it serves: caption"):
        edgerun.load(blip_bundle).answer(pixel_values=_pixels(0), question="what")
    with pytest.raises(OptionError, match="does not serve caption; it serves: vqa"):
        model.caption(pixel_values=_pixels(0))


def test_vqa_graphs(vqa_bundle):
    m = edgerun.load(vqa_bundle).manifest
    assert m.tasks["vqa"].modules == ("vision", "question_encoder", "cross_kv", "decoder")
    dec = onnx.load(str(vqa_bundle / "decoder.onnx"), load_external_data=False)
    assert "cross_attention_mask" in [i.name for i in dec.graph.input]
    assert not {n.op_type for n in dec.graph.node} & {"If", "Loop"}


def test_vqa_cli(vqa_bundle, tmp_path):
    import cv2
    from skimage import data

    path = tmp_path / "coffee.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR))
    out = subprocess.run([sys.executable, "-m", "edgerun.cli", "vqa", str(vqa_bundle), str(path),
                          "what color is the table", "--num-beams", "2", "--max-new-tokens", "5", "--json"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    with warnings.catch_warnings():
        want = edgerun.load(vqa_bundle).answer(path, "what color is the table", num_beams=2, max_new_tokens=5)
    assert rec["token_ids"] == want.token_ids and rec["question"] == "what color is the table"
    assert rec["timings_ms"]["question_encoder"] > 0
