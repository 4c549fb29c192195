"""Shared checks of edge-run's outputs against transformers' generate() (imported by the parity tests)."""
import pytest


def strip_padding(row, prompt_len, stop_ids):
    """generate()'s row without padding: up to and including the first stop token after the prompt,
    else all of it. `stop_ids` is one id or a list."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    row = list(row)
    for i in range(prompt_len, len(row)):
        if row[i] in stops:
            return row[: i + 1]
    return row


def assert_matches_generate(results, out, *, prompt_len, stop_ids, tokenizer, num_beams):
    """`results`: per batch item, its list of Captions/Answers (num_return_sequences each); `out`:
    generate()'s output with return_dict_in_generate and output_scores."""
    for b, item in enumerate(results):
        for r, result in enumerate(item):
            k = b * len(item) + r
            assert result.token_ids == strip_padding(out.sequences[k].tolist(), prompt_len, stop_ids)
            assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
            if num_beams > 1:
                assert result.score == pytest.approx(float(out.sequences_scores[k]), rel=1e-4, abs=1e-4)
