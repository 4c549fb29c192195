"""Captions from the exported bundle against transformers' generate() on the same weights.

Unlike tests/runtime/test_decoding.py (the numpy beam search over a torch model), these cases run
the whole runtime: ONNX vision, cross-K/V and decoder graphs, the in-place KV cache, and the beam
search, through `Model.caption_batch(pixel_values=...)`.
"""
import numpy as np
import pytest
import torch
from parity import assert_matches_generate

import edgerun

BEAMS = (1, 2, 3, 4)
EARLY = (True, False, "never")


def _cases(n=60, seed=7):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        beams = int(BEAMS[i % len(BEAMS)])
        max_new = int(rng.choice([1, 3, 8, 15]))
        cases.append({
            "batch": int(rng.choice([1, 2])),
            "num_beams": beams,
            "max_new_tokens": max_new,
            "min_new_tokens": min(max_new, int(rng.choice([0, 0, 2]))),
            "length_penalty": float(rng.choice([-0.5, 0.0, 1.0, 1.5])),
            "early_stopping": EARLY[int(rng.integers(3))],
            "no_repeat_ngram_size": int(rng.choice([0, 0, 2])),
            "repetition_penalty": float(rng.choice([1.0, 1.0, 1.4])),
            "num_return_sequences": int(rng.integers(1, beams + 1)),
            "prompt": [None, "a picture of"][int(rng.integers(2))],
            "seed": i,
        })
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def model(blip_bundle):
    return edgerun.load(blip_bundle, threads=1)


@pytest.fixture(scope="module")
def hf_tokenizer(blip_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(blip_checkpoint)


def _hf(blip_torch, hf_tokenizer, pixels, case):
    kwargs = {k: case[k] for k in ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty",
                                   "early_stopping", "no_repeat_ngram_size", "repetition_penalty",
                                   "num_return_sequences")}
    ids = None
    if case["prompt"]:
        ids = hf_tokenizer([case["prompt"]] * len(pixels), return_tensors="pt").input_ids
    with torch.no_grad():
        out = blip_torch.generate(pixel_values=torch.from_numpy(pixels), input_ids=ids, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True, **kwargs)
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"case{c['seed']}" for c in CASES])
def test_caption_matches_generate(model, blip_torch, hf_tokenizer, case):
    rng = np.random.default_rng(case["seed"])
    pixels = rng.standard_normal((case["batch"], 3, 32, 32)).astype(np.float32)
    out = _hf(blip_torch, hf_tokenizer, pixels, case)
    options = {k: v for k, v in case.items() if k not in ("batch", "seed", "prompt")}
    got = model.caption_batch(pixel_values=pixels, prompt=case["prompt"], **options)
    stop = blip_torch.config.text_config.sep_token_id
    prompt_len = 1 if not case["prompt"] else len(hf_tokenizer(case["prompt"]).input_ids) - 1
    n_ret = case["num_return_sequences"]
    results = [g if n_ret > 1 else [g] for g in got]
    assert [len(item) for item in results] == [n_ret] * case["batch"]
    assert_matches_generate(results, out, prompt_len=prompt_len, stop_ids=stop, tokenizer=hf_tokenizer,
                            num_beams=case["num_beams"])


def test_cases_cover_early_finish_and_max_length(model):
    """The parity cases are only worth something if beams really finish early, and some run out."""
    rng = np.random.default_rng(0)
    lengths, stopped = [], 0
    for case in CASES[:24]:
        pixels = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        res = model.caption(pixel_values=pixels, num_beams=case["num_beams"], max_new_tokens=15)
        lengths.append(len(res.token_ids) - 1)
        stopped += res.token_ids[-1] == model.manifest.decoding["stop_ids"][0]
    assert 0 < stopped < len(lengths)
    assert min(lengths) < 15 and max(lengths) == 15


def test_greedy_score_is_sum_of_log_probs(model, blip_torch):
    pixels = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    res = model.caption(pixel_values=pixels, num_beams=1, max_new_tokens=6)
    with torch.no_grad():
        embeds = blip_torch.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        logits = blip_torch.text_decoder(input_ids=torch.tensor([res.token_ids]),
                                         encoder_hidden_states=embeds).logits[0]
    logp = torch.log_softmax(logits, -1)
    want = sum(float(logp[i, res.token_ids[i + 1]]) for i in range(len(res.token_ids) - 1))
    assert res.score == pytest.approx(want, rel=1e-4, abs=1e-4)
