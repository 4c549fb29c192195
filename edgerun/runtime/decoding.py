"""Greedy and beam-search decoding in numpy, token for token what transformers' ``generate()`` gives.

The parts, one role each (in the manner of whisper's decoding.py):

- ``DecodingOptions``: the user's options, validated once;
- ``Inference``: the model side (logits for new tokens, KV-cache reordering), written per backend;
- ``LogitFilter``: ``MinNewTokens``, ``RepetitionPenalty``, ``NoRepeatNGram``, in generate()'s order;
- ``LengthPenalty``: the score of a beam hypothesis;
- ``GreedyDecoder`` and ``BeamSearchDecoder``: reset / update / finalize;
- ``decode()``: wires them and runs the loop.

Beam search follows transformers 5's vectorised ``_beam_search``: log-softmax, then the filters, then
the top ``(1 + n_stop) * num_beams`` continuations over beams x vocab, of which only the first
``num_beams`` may finish; the finished hypotheses are merged by score; ``early_stopping`` True,
False and "never" decide when a batch item is done. Arithmetic is float32 where generate() uses
float32, with the same ``-1e9`` masks, so that scores round alike. Ties are broken by value
descending, then index ascending.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgerun.errors import EdgeRunError, InputError, OptionError

_F32 = np.float32
_MASK = np.float32(-1.0e9)  # generate()'s score for "cannot be chosen"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class DecodingOptions:
    """Generation options, named and defaulted as in transformers' ``GenerationConfig``.

    ``num_beams=1`` is greedy search. Override with ``dataclasses.replace(options, num_beams=3)``.
    """

    num_beams: int = 1
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1

    def __post_init__(self):
        for name in ("num_beams", "max_new_tokens", "min_new_tokens", "no_repeat_ngram_size",
                     "num_return_sequences"):
            if not _is_int(getattr(self, name)):
                raise OptionError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("length_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise OptionError(f"{name} must be a finite number, got {value!r}")
        self._check_ranges()

    def _check_ranges(self):
        if self.num_beams < 1:
            raise OptionError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise OptionError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise OptionError(f"min_new_tokens must be between 0 and max_new_tokens "
                              f"({self.max_new_tokens}), got {self.min_new_tokens}")
        if self.no_repeat_ngram_size < 0:
            raise OptionError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if self.repetition_penalty <= 0:
            raise OptionError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise OptionError(f"num_return_sequences must be between 1 and num_beams ({self.num_beams}), "
                              f"got {self.num_return_sequences}")
        if not (self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never"):
            raise OptionError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


@dataclass(frozen=True)
class Hypothesis:
    """One decoded sequence: the prompt and the generated ids up to and including the stop token."""

    token_ids: list[int]
    score: float


class Inference(Protocol):
    """The model side of decoding; each backend implements it around its decoder session."""

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """tokens : int64, shape = (n_rows, n_new), the tokens the cache has not seen yet (the whole
        prompt on the first call, then one token per row); n_rows = n_batch * n_beams.
        Returns float32, shape = (n_rows, vocab): the logits at the last position of each row.
        The caller may overwrite the returned array; it is valid until the next call (a decoder
        may hand out one buffer of its own, refilled at every step)."""

    def rearrange_kv_cache(self, source_indices: np.ndarray) -> None:
        """Row i of the cache becomes row source_indices[i] of the previous cache (beam reordering)."""

    def cleanup_caching(self) -> None:
        """Release the cache; called once when decoding ends, normally or not."""


# ---------------------------------------------------------------------------------------------- filters

class LogitFilter:
    """Modifies scores in place before a token is chosen, like a transformers LogitsProcessor."""

    def apply(self, scores: np.ndarray, tokens: np.ndarray) -> None:
        """scores : float32, shape = (n_rows, vocab); tokens : int64, shape = (n_rows, length),
        every row's ids so far, prompt included."""
        raise NotImplementedError


class MinNewTokens(LogitFilter):
    """Forbids every stop token until ``min_new_tokens`` tokens have been generated."""

    def __init__(self, prompt_length: int, min_new_tokens: int, stop_ids: np.ndarray):
        self.prompt_length, self.min_new_tokens, self.stop_ids = prompt_length, min_new_tokens, stop_ids

    def apply(self, scores: np.ndarray, tokens: np.ndarray) -> None:
        if tokens.shape[1] - self.prompt_length < self.min_new_tokens:
            scores[:, self.stop_ids] = -np.inf


class RepetitionPenalty(LogitFilter):
    """Scores of ids already in a row (prompt included) are multiplied by ``penalty`` when negative
    and divided by it otherwise, once per id (CTRL's penalty, as transformers applies it)."""

    def __init__(self, penalty: float):
        self.penalty = _F32(penalty)

    def apply(self, scores: np.ndarray, tokens: np.ndarray) -> None:
        inside = tokens < scores.shape[1]  # ids past the output vocab have no score to penalise
        rows = np.broadcast_to(np.arange(len(tokens))[:, None], tokens.shape)[inside]
        ids = tokens[inside]
        values = scores[rows, ids]  # gathered before any write, so repeated ids are penalised once
        scores[rows, ids] = np.where(values < 0, values * self.penalty, values / self.penalty)


class NoRepeatNGram(LogitFilter):
    """Forbids any token that would repeat an n-gram already present in the row (prompt included)."""

    def __init__(self, ngram_size: int):
        self.n = ngram_size

    def apply(self, scores: np.ndarray, tokens: np.ndarray) -> None:
        length = tokens.shape[1]
        if length < self.n:
            return
        windows = np.lib.stride_tricks.sliding_window_view(tokens, self.n, axis=1)
        prefix = tokens[:, length - self.n + 1:]
        rows, starts = np.nonzero((windows[:, :, :-1] == prefix[:, None, :]).all(axis=2))
        banned = windows[rows, starts, -1]
        inside = banned < scores.shape[1]
        scores[rows[inside], banned[inside]] = -np.inf


def build_filters(options: DecodingOptions, prompt_length: int, stop_ids: np.ndarray) -> list[LogitFilter]:
    """The filters the options ask for, in the order transformers' _get_logits_processor applies them."""
    filters: list[LogitFilter] = []
    if options.repetition_penalty != 1.0:
        filters.append(RepetitionPenalty(options.repetition_penalty))
    if options.no_repeat_ngram_size > 0:
        filters.append(NoRepeatNGram(options.no_repeat_ngram_size))
    if options.min_new_tokens > 0 and len(stop_ids):
        filters.append(MinNewTokens(prompt_length, options.min_new_tokens, stop_ids))
    return filters


# ------------------------------------------------------------------------------------------ numerics

def log_softmax(logits: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis into ``out``, computed as (x - max) - log(sum(exp(x - max)))
    like torch on CPU; ``scratch`` has the same shape and receives the exponentials."""
    np.subtract(logits, logits.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=scratch)
    out -= np.log(scratch.sum(axis=1, keepdims=True))
    return out


def top_k(scores: np.ndarray, k: int, group_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` largest entries of each row, ordered by value descending, then
    index ascending. scores : float32, shape = (n_rows, n), n >= k; returns two (n_rows, k) arrays.

    Large rows are not sorted: the k-th largest of the maxima of column groups is a threshold that at
    least k entries reach, and only the entries that reach it (one comparison pass) are ordered.
    """
    n_rows, n = scores.shape
    n_groups = n // group_size
    if n_groups < 4 * k:
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(scores, order, axis=1)
    body = scores[:, : n_groups * group_size].reshape(n_rows, group_size, n_groups)
    maxima = body.max(axis=1)  # group g holds columns g, g + n_groups, g + 2 * n_groups, ...
    threshold = np.partition(maxima, n_groups - k, axis=1)[:, n_groups - k: n_groups - k + 1]
    flat = np.flatnonzero(scores >= threshold)  # row-major: rows ascending (np.nonzero is slower)
    rows, columns = np.divmod(flat, n)
    values = scores.reshape(-1)[flat]
    order = np.lexsort((columns, -values, rows))
    first = np.searchsorted(rows, np.arange(n_rows))
    picked = order[first[:, None] + np.arange(k)]
    return columns[picked], values[picked]


def _stable_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of each (short) row, by value descending then index ascending."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


class LengthPenalty:
    """A beam hypothesis's score: sum of log-probs / generated_length ** length_penalty, in float32.

    The generated length counts the stop token and not the prompt.
    """

    def __init__(self, length_penalty: float):
        self.length_penalty = length_penalty

    def __call__(self, sum_logprobs: np.ndarray, generated_length: int) -> np.ndarray:
        return sum_logprobs / _F32(generated_length ** self.length_penalty)


# ----------------------------------------------------------------------------------------- decoders

class TokenDecoder:
    """Chooses tokens from logits; reset, then update once per model call, then finalize."""

    done: bool = False

    def reset(self, prompt_ids: np.ndarray) -> np.ndarray:
        """Start from prompt_ids (n_batch, prompt_len); return the first tokens to feed the model."""
        raise NotImplementedError

    def update(self, logits: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Take one step; return the cache rows to keep (None: unchanged) and the next tokens (n_rows, 1)."""
        raise NotImplementedError

    def finalize(self) -> list[list[Hypothesis]]:
        """The hypotheses of each batch item, best first."""
        raise NotImplementedError


class GreedyDecoder(TokenDecoder):
    """Greedy search as generate() runs it with num_beams=1: the filters act on the raw logits, the
    arg-max wins (lowest id on ties), and rows that have stopped are fed the pad token.

    A hypothesis's score is the float32 sum, over its generated tokens (the stop token included), of
    log_softmax(filtered logits)[chosen token] at each step.
    """

    def __init__(self, options: DecodingOptions, filters: list[LogitFilter], stop_ids: np.ndarray, pad_id: int):
        self.options, self.filters, self.stop_ids, self.pad_id = options, filters, stop_ids, pad_id

    def reset(self, prompt_ids: np.ndarray) -> np.ndarray:
        n_batch, self.length = prompt_ids.shape
        self.max_length = self.length + self.options.max_new_tokens
        self.tokens = np.empty((n_batch, self.max_length), dtype=np.int64)
        self.tokens[:, : self.length] = prompt_ids
        self.running = np.ones(n_batch, dtype=bool)
        self.lengths = np.full(n_batch, self.max_length)
        self.scores = np.zeros(n_batch, dtype=_F32)
        self.done = False
        return prompt_ids

    def update(self, logits: np.ndarray) -> tuple[None, np.ndarray]:
        for logit_filter in self.filters:
            logit_filter.apply(logits, self.tokens[:, : self.length])
        chosen = logits.argmax(axis=1)
        best = np.take_along_axis(logits, chosen[:, None], axis=1)
        # the chosen token is the maximum, so its log-prob is (x - max) - log(sum(exp(x - max))) = -lse
        logprob = -np.log(np.exp(logits - best).sum(axis=1))
        self.scores += np.where(self.running, logprob, _F32(0))
        chosen = np.where(self.running, chosen, self.pad_id)
        self.tokens[:, self.length] = chosen
        self.length += 1
        stopped = self.running & (chosen[:, None] == self.stop_ids).any(axis=1)
        self.lengths[stopped] = self.length
        self.running &= ~stopped
        self.done = self.length >= self.max_length or not self.running.any()
        return None, chosen[:, None]

    def finalize(self) -> list[list[Hypothesis]]:
        return [[Hypothesis(row[:n].tolist(), float(score))]
                for row, n, score in zip(self.tokens, self.lengths, self.scores)]


class BeamSearchDecoder(TokenDecoder):
    """Beam search over all batch items at once, state shaped (n_batch, num_beams, ...)."""

    def __init__(self, options: DecodingOptions, filters: list[LogitFilter], stop_ids: np.ndarray):
        self.options, self.filters, self.stop_ids = options, filters, stop_ids
        self.n_beams = options.num_beams
        self.n_candidates = max(2, 1 + len(stop_ids)) * options.num_beams
        self.penalty = LengthPenalty(options.length_penalty)

    def reset(self, prompt_ids: np.ndarray) -> np.ndarray:
        self.n_batch, self.prompt_length = prompt_ids.shape
        self.length, n_rows = self.prompt_length, self.n_batch * self.n_beams
        self.max_length = self.prompt_length + self.options.max_new_tokens
        first = np.repeat(prompt_ids, self.n_beams, axis=0)  # batch-major, like repeat_interleave
        # running beams: ids (row-major as the cache), summed log-probs; beam 0 alone starts open
        self.tokens = np.empty((n_rows, self.max_length), dtype=np.int64)
        self.tokens[:, : self.length] = first
        self.running_scores = np.zeros((self.n_batch, self.n_beams), dtype=_F32)
        self.running_scores[:, 1:] = _MASK
        # finished hypotheses, best first: ids, penalised scores, whether the slot holds one, lengths
        self.finished_tokens = np.zeros((self.n_batch, self.n_beams, self.max_length), dtype=np.int64)
        self.finished_scores = np.full((self.n_batch, self.n_beams), _MASK, dtype=_F32)
        self.finished = np.zeros((self.n_batch, self.n_beams), dtype=bool)
        self.any_finished = False  # whether any slot of `finished` is set
        self.finished_lengths = np.zeros((self.n_batch, self.n_beams), dtype=np.int64)
        # per batch item: could a running beam still beat the worst finished one?
        self.improvable = np.ones((self.n_batch, 1), dtype=bool)
        self._items = np.arange(self.n_batch)[:, None]
        self._rows = self._items * self.n_beams
        self._identity = np.arange(self.n_beams)
        self._scratch = None
        self.done = False
        return first

    def update(self, logits: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        n_batch, n_beams = self.n_batch, self.n_beams
        vocab = logits.shape[1]
        if self._scratch is None or self._scratch.shape != logits.shape:
            self._scratch = np.empty_like(logits)
        scores = log_softmax(logits, logits, self._scratch)  # in place: the logits are ours to overwrite
        for logit_filter in self.filters:
            logit_filter.apply(scores, self.tokens[:, : self.length])
        scores += self.running_scores.reshape(-1, 1)
        flat_ids, candidate_scores = top_k(scores.reshape(n_batch, n_beams * vocab), self.n_candidates)
        beams, ids = np.divmod(flat_ids, vocab)
        if self.length + 1 >= self.max_length:
            stops = np.ones(ids.shape, dtype=bool)
        elif self.stop_ids.size == 1:
            stops = ids == self.stop_ids[0]
        else:
            stops = (ids[:, :, None] == self.stop_ids).any(axis=2)
        # finished ones cannot run on; x + 0 * mask is x, so only the stops get the mask added
        open_scores = np.where(stops, candidate_scores + _MASK, candidate_scores)
        keep = _stable_top(open_scores, n_beams)
        items_done = self._items_done()
        self._update_finished(candidate_scores, beams, ids, stops)
        self.running_scores = open_scores[self._items, keep]
        sources = beams[self._items, keep]
        sources[items_done] = self._identity  # nothing about a done item matters any more
        next_ids = ids[self._items, keep].reshape(-1)
        source_rows = None
        if not (sources == self._identity).all():
            source_rows = (self._rows + sources).reshape(-1)
            self.tokens = self.tokens[source_rows]
        self.tokens[:, self.length] = next_ids
        self.length += 1
        self._update_improvable()
        self.done = not self._has_open_items(stops)
        return source_rows, next_ids[:, None]

    def _items_done(self) -> np.ndarray:
        """(n_batch,) bool: items whose finished hypotheses can no longer change."""
        if self.options.early_stopping is True:
            return ~self.improvable[:, 0] | self.finished.all(axis=1)
        return ~self.improvable[:, 0]

    def _update_finished(self, candidate_scores, beams, ids, stops) -> None:
        """Merge the candidates that just finished among the first num_beams into the finished slots,
        keeping the best num_beams (transformers' _update_finished_beams, with its float32 masks)."""
        n_beams = self.n_beams
        if not stops[:, :n_beams].any():
            return  # nothing finished: every candidate would be masked below the slots it could take
        just_finished = stops.copy()
        just_finished[:, n_beams:] = False
        scores = self.penalty(candidate_scores, self.length + 1 - self.prompt_length)
        if self.options.early_stopping is True:
            scores += self.finished.all(axis=1, keepdims=True).astype(_F32) * _MASK
        scores += (~self.improvable).astype(_F32) * _MASK
        scores += (~just_finished).astype(_F32) * _MASK
        merged = np.concatenate([self.finished_scores, scores], axis=1)
        picked = _stable_top(merged, n_beams)
        new = picked >= n_beams
        if not new.any():
            return  # the old slots stay, in the same order
        items, slots = np.nonzero(new)
        candidates = picked[items, slots] - n_beams
        old = (self._items, np.where(new, 0, picked))
        self.finished_tokens = self.finished_tokens[old]
        self.finished_lengths = self.finished_lengths[old]
        self.finished = self.finished[old]
        rows = self._rows[items, 0] + beams[items, candidates]
        self.finished_tokens[items, slots, : self.length] = self.tokens[rows, : self.length]
        self.finished_tokens[items, slots, self.length] = ids[items, candidates]
        self.finished_lengths[items, slots] = self.length + 1
        self.finished[items, slots] = just_finished[items, candidates]
        self.any_finished = bool(self.finished.any())
        self.finished_scores = merged[self._items, picked]

    def _update_improvable(self) -> None:
        """transformers' _check_early_stop_heuristic, at the new length."""
        if self.options.early_stopping == "never" and self.options.length_penalty > 0:
            best_length = self.max_length - self.prompt_length
        else:
            best_length = self.length - self.prompt_length
        best_running = self.penalty(self.running_scores[:, :1], best_length)
        if not self.any_finished:  # every worst finished score is the mask
            self.improvable &= best_running > _MASK
            return
        worst_finished = np.where(self.finished, self.finished_scores.min(axis=1, keepdims=True), _MASK)
        self.improvable &= (best_running > worst_finished).any(axis=1, keepdims=True)

    def _has_open_items(self, stops: np.ndarray) -> bool:
        """transformers' _beam_search_has_unfinished_sequences."""
        all_full = self.options.early_stopping is True and bool(self.finished.all())
        return bool(self.improvable.any()) and not all_full and not bool(stops.all())

    def finalize(self) -> list[list[Hypothesis]]:
        results = []
        for tokens, lengths, scores in zip(self.finished_tokens, self.finished_lengths, self.finished_scores):
            results.append([Hypothesis(tokens[j, : lengths[j]].tolist(), float(scores[j]))
                            for j in range(self.options.num_return_sequences)])
        return results


# ------------------------------------------------------------------------------------------ the loop

def decode(inference: Inference, prompt_ids: np.ndarray, options: DecodingOptions, *,
           stop_ids: Sequence[int], pad_id: int | None) -> list[list[Hypothesis]]:
    """Generate from ``prompt_ids`` (int64, shape = (n_batch, prompt_len)) as transformers' generate()
    does with the same options (do_sample=False), ending sequences on any of ``stop_ids``.

    Returns, per batch item, ``options.num_return_sequences`` hypotheses, best first. Their token_ids
    are generate()'s rows without padding: the prompt, then the generated ids up to and including the
    stop token, or up to max_new_tokens. Beam-search scores are generate()'s ``sequences_scores``;
    greedy scores are defined in ``GreedyDecoder``. ``pad_id`` is what greedy feeds finished rows
    (generate() pads with it, or with the first stop id when it is None).
    """
    prompt_ids, stop = _check_inputs(prompt_ids, stop_ids)
    filters = build_filters(options, prompt_ids.shape[1], stop)  # applied to every step's scores
    if options.num_beams == 1:
        decoder: TokenDecoder = GreedyDecoder(options, filters, stop, stop[0] if pad_id is None else pad_id)
    else:
        decoder = BeamSearchDecoder(options, filters, stop)
    tokens = decoder.reset(prompt_ids)
    n_rows, highest_stop = prompt_ids.shape[0] * options.num_beams, int(stop.max())
    try:
        while True:
            source_rows, tokens = decoder.update(_scores(inference.logits(tokens), n_rows, stop, highest_stop))
            if decoder.done:
                break
            if source_rows is not None:
                inference.rearrange_kv_cache(source_rows)
    finally:
        inference.cleanup_caching()
    return decoder.finalize()


def _scores(logits, n_rows: int, stop_ids: np.ndarray, highest_stop: int) -> np.ndarray:
    """The model's logits as a writable float32 (n_rows, vocab) array (generate() upcasts to float32);
    `highest_stop` is stop_ids.max(), computed once per decode."""
    logits = np.asarray(logits, dtype=_F32)
    if logits.ndim != 2 or logits.shape[0] != n_rows:
        raise EdgeRunError(f"the decoder returned logits of shape {logits.shape}, expected ({n_rows}, vocab)")
    if highest_stop >= logits.shape[1]:
        raise OptionError(f"stop_ids must be below the vocabulary size {logits.shape[1]}, "
                          f"got {stop_ids.tolist()}")
    return logits if logits.flags.writeable else logits.copy()


def _check_inputs(prompt_ids, stop_ids) -> tuple[np.ndarray, np.ndarray]:
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] < 1 or prompt_ids.shape[1] < 1:
        raise InputError(f"prompt_ids must have shape (n_batch, prompt_len) with both >= 1, "
                         f"got {prompt_ids.shape}")
    if not np.issubdtype(prompt_ids.dtype, np.integer):
        raise InputError(f"prompt_ids must be integer ids, got dtype {prompt_ids.dtype}")
    stop = np.asarray(list(stop_ids), dtype=np.int64).reshape(-1)
    if stop.size == 0 or (stop < 0).any():
        raise OptionError(f"stop_ids must be one or more non-negative token ids, got {list(stop_ids)}")
    return prompt_ids.astype(np.int64, copy=False), stop


__all__ = [
    "BeamSearchDecoder", "DecodingOptions", "GreedyDecoder", "Hypothesis", "Inference", "LengthPenalty",
    "LogitFilter", "MinNewTokens", "NoRepeatNGram", "RepetitionPenalty", "build_filters", "decode",
    "log_softmax", "top_k",
]
