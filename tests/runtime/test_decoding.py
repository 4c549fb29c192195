"""decode() against transformers' generate() on a tiny random BLIP text decoder, token for token."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from parity import strip_padding

from edgerun.errors import EdgeRunError, OptionError
from edgerun.runtime.decoding import (
    DecodingOptions,
    Hypothesis,
    NoRepeatNGram,
    RepetitionPenalty,
    decode,
    top_k,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, BOS, SEP, PAD = 99, 97, 98, 0
OTHER_STOP = 58  # a token the model often emits, a second stop id in some cases
ENCODER_LENGTH, ENCODER_SIZE = 5, 16
N_CASES = 150


@pytest.fixture(scope="module")
def model():
    """A BLIP text decoder with large random weights (peaky logits) and a bias towards [SEP], so that
    sequences finish at many different steps as well as run to the length limit."""
    return _build_model(VOCAB)


@pytest.fixture(scope="module")
def large_model():
    """The same with a vocabulary large enough for top_k's grouped path (beams x vocab >= 256 k)."""
    return _build_model(4099)


def _build_model(vocab: int):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.BlipTextConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        encoder_hidden_size=ENCODER_SIZE, max_position_embeddings=64, bos_token_id=BOS, sep_token_id=SEP,
        eos_token_id=SEP, pad_token_id=PAD, is_decoder=True,
    )
    model = transformers.BlipTextLMHeadModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.7)
            elif "LayerNorm" not in name:
                parameter.normal_(0.0, 0.1)
        predictions = model.cls.predictions
        predictions.bias[SEP] += 10.0
        predictions.decoder.bias = predictions.bias  # tied; keep them one tensor
    return model


class TorchInference:
    """The Inference protocol over the HF model, without a cache: every call runs each row's whole
    history, and rearranging the cache reorders the stored histories."""

    def __init__(self, model, encoder_states: torch.Tensor):
        self.model, self.encoder_states = model, encoder_states
        self.history: torch.Tensor | None = None
        self.calls: list[tuple[int, ...]] = []
        self.rearranged = 0
        self.cleaned = False

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        assert tokens.dtype == np.int64 and tokens.ndim == 2
        self.calls.append(tokens.shape)
        new = torch.from_numpy(tokens.copy())
        self.history = new if self.history is None else torch.cat([self.history, new], dim=1)
        rows = self.history.shape[0]
        encoder = self.encoder_states.repeat_interleave(rows // self.encoder_states.shape[0], dim=0)
        with torch.no_grad():
            out = self.model(input_ids=self.history, encoder_hidden_states=encoder,
                             encoder_attention_mask=torch.ones(encoder.shape[:2], dtype=torch.long),
                             use_cache=False)
        return out.logits[:, -1].float().numpy().copy()

    def rearrange_kv_cache(self, source_indices: np.ndarray) -> None:
        assert not np.array_equal(source_indices, np.arange(len(source_indices))), "identity reorder"
        self.rearranged += 1
        self.history = self.history[torch.from_numpy(source_indices.astype(np.int64))]

    def cleanup_caching(self) -> None:
        self.cleaned = True


def _draw_cases(n: int) -> list[dict]:
    """Reproducible option sets; the first cover every early_stopping x length_penalty pair."""
    rng = np.random.default_rng(1234)
    pairs = list(itertools.product([True, False, "never"], [-1.0, 0.0, 0.5, 1.0, 2.0]))
    cases = []
    for i in range(n):
        num_beams = int(rng.integers(1, 6))
        early_stopping, length_penalty = pairs[i % len(pairs)]
        max_new_tokens = int(rng.choice([1, 2, 5, 12, 20]))
        cases.append({
            "seed": i, "n_batch": int(rng.choice([1, 2])), "prompt_length": int(rng.choice([1, 1, 2, 3])),
            "pad_id": int(rng.choice([PAD, PAD, 5])), "stop_ids": [SEP, OTHER_STOP] if i % 5 == 4 else [SEP],
            "options": DecodingOptions(
                num_beams=num_beams, max_new_tokens=max_new_tokens,
                min_new_tokens=int(rng.choice([0, 3])) if max_new_tokens >= 3 else 0,
                length_penalty=length_penalty, early_stopping=early_stopping,
                no_repeat_ngram_size=int(rng.choice([0, 2, 3])),
                repetition_penalty=float(rng.choice([1.0, 1.3])),
                num_return_sequences=int(rng.integers(1, num_beams + 1)),
            ),
        })
    return cases


CASES = _draw_cases(N_CASES)


def _inputs(case):
    rng = np.random.default_rng(case["seed"])
    n_batch, length = case["n_batch"], case["prompt_length"]
    prompt = np.concatenate([np.full((n_batch, 1), BOS), rng.integers(1, SEP, (n_batch, length - 1))], axis=1)
    prompt = np.where(prompt == case["pad_id"], 1, prompt).astype(np.int64)  # no pad id in prompts
    encoder = rng.standard_normal((n_batch, ENCODER_LENGTH, ENCODER_SIZE)).astype(np.float32)
    return prompt, torch.from_numpy(encoder)


def _generate(model, prompt, encoder, case):
    return model.generate(
        input_ids=torch.from_numpy(prompt), encoder_hidden_states=encoder,
        encoder_attention_mask=torch.ones(encoder.shape[:2], dtype=torch.long),
        eos_token_id=case["stop_ids"], pad_token_id=case["pad_id"], do_sample=False, output_scores=True,
        return_dict_in_generate=True, **dataclasses.asdict(case["options"]),
    )


def _outcomes(case, hf_rows: list[list[int]], rows: list[list[int]]) -> list[tuple[bool, bool]]:
    """For each returned sequence: did it finish before max length, and did generate() pad it?"""
    limit = case["prompt_length"] + case["options"].max_new_tokens
    return [(len(row) < limit, len(row) < len(hf_row)) for hf_row, row in zip(hf_rows, rows)]


def _greedy_scores(out, rows: list[list[int]], prompt_length: int) -> list[float]:
    """Sum of log_softmax(processed logits) at each chosen token, from generate()'s output scores."""
    logprobs = [torch.log_softmax(step.float(), dim=-1) for step in out.scores]
    return [sum(float(logprobs[t][i, token]) for t, token in enumerate(row[prompt_length:]))
            for i, row in enumerate(rows)]


_OUTCOMES: dict[int, list[tuple[bool, bool]]] = {}  # case seed -> _outcomes()


@pytest.mark.parametrize("case", CASES, ids=[f"case{c['seed']}" for c in CASES])
def test_decode_matches_generate(model, case):
    options, prompt_length = case["options"], case["prompt_length"]
    prompt, encoder = _inputs(case)
    inference = TorchInference(model, encoder)
    got = decode(inference, prompt, options, stop_ids=case["stop_ids"], pad_id=case["pad_id"])
    out = _generate(model, prompt, encoder, case)

    hf_rows = out.sequences.tolist()
    rows = [strip_padding(row, prompt_length, case["stop_ids"]) for row in hf_rows]
    n_return = options.num_return_sequences
    expected = [rows[i * n_return:(i + 1) * n_return] for i in range(case["n_batch"])]
    assert [[h.token_ids for h in item] for item in got] == expected
    if options.num_beams > 1:
        want = out.sequences_scores.numpy().reshape(case["n_batch"], n_return)
    else:
        want = np.array(_greedy_scores(out, rows, prompt_length)).reshape(case["n_batch"], 1)
    np.testing.assert_allclose([[h.score for h in item] for item in got], want, rtol=1e-4, atol=1e-6)

    rows_per_call = case["n_batch"] * options.num_beams
    assert len(inference.calls) == len(out.scores), "stopped at another step than generate()"
    assert inference.calls[0] == (rows_per_call, prompt_length)
    assert all(shape == (rows_per_call, 1) for shape in inference.calls[1:])
    assert inference.cleaned
    _OUTCOMES[case["seed"]] = _outcomes(case, hf_rows, rows)


@pytest.mark.parametrize("case", CASES[:8], ids=[f"case{c['seed']}" for c in CASES[:8]])
def test_decode_matches_generate_with_a_large_vocabulary(large_model, case):
    options = dataclasses.replace(case["options"], num_beams=max(2, case["options"].num_beams))
    case = {**case, "options": options}
    prompt, encoder = _inputs(case)
    got = decode(TorchInference(large_model, encoder), prompt, options, stop_ids=case["stop_ids"],
                 pad_id=case["pad_id"])
    out = _generate(large_model, prompt, encoder, case)
    rows = [strip_padding(row, case["prompt_length"], case["stop_ids"]) for row in out.sequences.tolist()]
    assert [h.token_ids for item in got for h in item] == rows
    np.testing.assert_allclose([h.score for item in got for h in item], out.sequences_scores.numpy(), rtol=1e-4)


def test_cases_cover_the_options():
    seen = {field: {getattr(c["options"], field) for c in CASES}
            for field in ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty",
                          "no_repeat_ngram_size", "repetition_penalty")}
    assert seen["num_beams"] == {1, 2, 3, 4, 5}
    assert seen["max_new_tokens"] == {1, 2, 5, 12, 20}
    assert seen["min_new_tokens"] == {0, 3}
    assert seen["length_penalty"] == {-1.0, 0.0, 0.5, 1.0, 2.0}
    assert seen["no_repeat_ngram_size"] == {0, 2, 3}
    assert seen["repetition_penalty"] == {1.0, 1.3}
    beams = [c for c in CASES if c["options"].num_beams > 1]
    assert {(c["options"].early_stopping, c["options"].length_penalty) for c in beams} == set(
        itertools.product([True, False, "never"], [-1.0, 0.0, 0.5, 1.0, 2.0]))
    assert any(c["options"].num_return_sequences > 1 for c in CASES)
    assert {c["n_batch"] for c in CASES} == {1, 2} and {c["prompt_length"] for c in CASES} == {1, 2, 3}


def test_cases_finish_early_and_at_max_length(model):
    """Early finishes, full-length sequences and padded rows are all common, with beams and greedy
    alike, so that the parity cases exercise every way a sequence ends."""
    for case in CASES:
        if case["seed"] not in _OUTCOMES:  # run alone: compute from generate()
            prompt, encoder = _inputs(case)
            hf_rows = _generate(model, prompt, encoder, case).sequences.tolist()
            rows = [strip_padding(row, case["prompt_length"], case["stop_ids"]) for row in hf_rows]
            _OUTCOMES[case["seed"]] = _outcomes(case, hf_rows, rows)
    for greedy in (True, False):
        seen = [o for c in CASES if (c["options"].num_beams == 1) == greedy for o in _OUTCOMES[c["seed"]]]
        early = sum(finished_early for finished_early, _ in seen)
        assert early >= 10, "too few sequences finish early"
        assert len(seen) - early >= 10, "too few sequences run to max length"
        assert sum(padded for _, padded in seen) >= 5, "too few rows padded by generate()"
    multi_stop = [o for c in CASES if len(c["stop_ids"]) > 1 for o in _OUTCOMES[c["seed"]]]
    assert sum(finished_early for finished_early, _ in multi_stop) >= 5


def test_torch_inference_matches_the_cached_model(model):
    """The test's cache-less Inference gives the logits the model gives with its own KV cache."""
    prompt, encoder = _inputs({**CASES[0], "n_batch": 2, "prompt_length": 3})
    inference = TorchInference(model, encoder)
    mask = torch.ones(encoder.shape[:2], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(prompt), encoder_hidden_states=encoder,
                    encoder_attention_mask=mask, use_cache=True)
        np.testing.assert_allclose(inference.logits(prompt), out.logits[:, -1].numpy(), rtol=1e-5, atol=1e-5)
        step = np.array([[5], [7]], dtype=np.int64)
        cached = model(input_ids=torch.from_numpy(step), encoder_hidden_states=encoder,
                       encoder_attention_mask=mask, cache=out.cache, use_cache=True)
        np.testing.assert_allclose(inference.logits(step), cached.logits[:, -1].numpy(), rtol=1e-5, atol=1e-5)


def test_rearranges_only_when_beams_reorder(model):
    case = {**CASES[0], "n_batch": 2, "prompt_length": 2, "options": DecodingOptions(num_beams=4, max_new_tokens=12)}
    prompt, encoder = _inputs(case)
    inference = TorchInference(model, encoder)  # its rearrange_kv_cache refuses identity orders
    decode(inference, prompt, case["options"], stop_ids=[SEP], pad_id=PAD)
    assert inference.rearranged >= 1


def test_cleanup_runs_when_the_model_fails():
    class Failing:
        cleaned = False

        def logits(self, tokens):
            raise RuntimeError("boom")

        def rearrange_kv_cache(self, source_indices):
            pass

        def cleanup_caching(self):
            self.cleaned = True

    inference = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        decode(inference, np.full((1, 1), BOS), DecodingOptions(num_beams=2), stop_ids=[SEP], pad_id=PAD)
    assert inference.cleaned


class RandomInference:
    """Random logits of a real-sized vocabulary, with ties; for the top-k path and bookkeeping time."""

    def __init__(self, vocab: int, seed: int = 0):
        self.rng, self.vocab = np.random.default_rng(seed), vocab

    def logits(self, tokens):
        return np.round(self.rng.standard_normal((tokens.shape[0], self.vocab)) * 4, 1).astype(np.float32)

    def rearrange_kv_cache(self, source_indices):
        pass

    def cleanup_caching(self):
        pass


def test_top_k_breaks_ties_by_index():
    rng = np.random.default_rng(0)
    for n, k in [(30522 * 3, 6), (30522 * 5, 10), (5000, 8), (40, 6)]:
        scores = np.round(rng.standard_normal((3, n)), 1).astype(np.float32)  # many exact ties
        scores[0, ::7] = -np.inf
        scores[1, 5:9] = scores[1].max()  # a tie at the very top
        scores[2, -3:] = scores[2].max() + 1  # the best in the last columns (outside whole groups)
        indices, values = top_k(scores, k)
        want = np.lexsort((np.broadcast_to(np.arange(n), scores.shape), -scores), axis=1)[:, :k]
        np.testing.assert_array_equal(indices, want)
        np.testing.assert_array_equal(values, np.take_along_axis(scores, want, axis=1))


def test_filters_skip_ids_outside_the_vocabulary():
    scores = np.array([[-1.0, 2.0, -3.0, 4.0, -5.0]], dtype=np.float32)
    RepetitionPenalty(2.0).apply(scores, np.array([[7, 1, 2, 1]]))
    np.testing.assert_array_equal(scores, [[-1.0, 1.0, -6.0, 4.0, -5.0]])
    NoRepeatNGram(1).apply(scores, np.array([[9, 3]]))
    np.testing.assert_array_equal(scores, [[-1.0, 1.0, -6.0, -np.inf, -5.0]])


def test_large_vocab_beam_search_runs():
    options = DecodingOptions(num_beams=3, max_new_tokens=8, num_return_sequences=3, no_repeat_ngram_size=2,
                              repetition_penalty=1.2, min_new_tokens=2)
    got = decode(RandomInference(30524), np.array([[30522], [30522]]), options, stop_ids=[102], pad_id=0)
    assert [len(item) for item in got] == [3, 3]
    assert all(isinstance(h, Hypothesis) and h.token_ids[0] == 30522 for item in got for h in item)
    assert all(a.score >= b.score for item in got for a, b in zip(item, item[1:]))


@pytest.mark.parametrize("overrides, message", [
    ({"num_beams": 0}, "num_beams must be >= 1, got 0"),
    ({"num_beams": True}, "num_beams must be an integer"),
    ({"num_beams": 2.0}, "num_beams must be an integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"min_new_tokens": -1}, "min_new_tokens must be between 0 and max_new_tokens"),
    ({"min_new_tokens": 21}, "min_new_tokens must be between 0 and max_new_tokens \\(20\\)"),
    ({"length_penalty": float("nan")}, "length_penalty must be a finite number"),
    ({"length_penalty": float("inf")}, "length_penalty must be a finite number"),
    ({"length_penalty": True}, "length_penalty must be a finite number"),
    ({"early_stopping": "always"}, "early_stopping must be True, False or 'never'"),
    ({"early_stopping": 1}, "early_stopping must be True, False or 'never'"),
    ({"early_stopping": None}, "early_stopping must be True, False or 'never'"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be >= 0"),
    ({"no_repeat_ngram_size": False}, "no_repeat_ngram_size must be an integer"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"repetition_penalty": -1.3}, "repetition_penalty must be > 0"),
    ({"num_return_sequences": 0}, "num_return_sequences must be between 1 and num_beams \\(1\\)"),
    ({"num_beams": 3, "num_return_sequences": 4}, "num_return_sequences must be between 1 and num_beams \\(3\\)"),
])
def test_invalid_options_raise(overrides, message):
    with pytest.raises(OptionError, match=message) as info:
        DecodingOptions(**overrides)
    assert isinstance(info.value, EdgeRunError) and isinstance(info.value, ValueError)


def test_options_override_through_replace():
    options = dataclasses.replace(DecodingOptions(), num_beams=3, early_stopping="never")
    assert (options.num_beams, options.early_stopping) == (3, "never")
    with pytest.raises(OptionError, match="num_beams must be >= 1"):
        dataclasses.replace(options, num_beams=0)
    with pytest.raises(TypeError):
        dataclasses.replace(options, num_beam=2)


def test_bad_prompt_and_stop_ids_raise():
    inference = RandomInference(50)
    with pytest.raises(EdgeRunError, match="prompt_ids must have shape"):
        decode(inference, np.array([1, 2]), DecodingOptions(), stop_ids=[3], pad_id=0)
    with pytest.raises(OptionError, match="stop_ids must be one or more"):
        decode(inference, np.array([[1]]), DecodingOptions(), stop_ids=[], pad_id=0)
    with pytest.raises(OptionError, match="stop_ids must be below the vocabulary size 50"):
        decode(inference, np.array([[1]]), DecodingOptions(num_beams=2), stop_ids=[3, 50], pad_id=0)
