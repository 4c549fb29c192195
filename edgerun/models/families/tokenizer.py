"""A word-level tokenizer built from training texts, stored as a `tokenizers` tokenizer.json.

The same file is what a bundle ships and what the runtime's `Tokenizer` reads: a WordLevel model
over lowercased, whitespace- and punctuation-split words, with four special tokens at fixed ids,

    [PAD] 0   [UNK] 1   [BOS] 2   [EOS] 3

and a post-processor that writes `[BOS] words [EOS]` when special tokens are added. Captions,
questions, answers and retrieval texts are all tokenised this way for training, so that training
and the runtime agree token for token.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ...errors import InputError, OptionError

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


def _pipeline():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.Lowercase(), pre_tokenizers.Whitespace()


def count_words(texts: Iterable[str]) -> Counter:
    """Word counts as the tokenizer splits words (lowercased; punctuation is a word of its own)."""
    normalizer, pre_tokenizer = _pipeline()
    counts: Counter = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise InputError(f"texts must be strings, got {type(text).__name__}")
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


class WordTokenizer:
    """A `tokenizers.Tokenizer` with the special ids the built-in families use."""

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, tokenizer):
        for token, want in zip(SPECIALS, range(4)):
            if tokenizer.token_to_id(token) != want:
                raise InputError(f"not a built-in family tokenizer: {token} must have id {want}, "
                                 f"has {tokenizer.token_to_id(token)}")
        self._tok = tokenizer

    @classmethod
    def from_vocab(cls, words: Sequence[str]) -> WordTokenizer:
        """A tokenizer whose ids are the specials, then `words` in order."""
        from tokenizers import Tokenizer, models, processors

        vocab = {token: i for i, token in enumerate(SPECIALS)}
        for word in words:
            if word in vocab:
                raise InputError(f"word {word!r} repeats or is a special token")
            vocab[word] = len(vocab)
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.normalizer, tok.pre_tokenizer = _pipeline()
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)])
        tok.add_special_tokens([PAD, BOS, EOS])  # [UNK] stays visible in decoded text
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> WordTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    @classmethod
    def from_file(cls, path: str | Path) -> WordTokenizer:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | Path) -> Path:
        self._tok.save(str(path), pretty=False)
        return Path(path)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch(self, texts: Sequence[str], *, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> ids, mask : int64 (n, longest), `[BOS] words [EOS]` right-padded with [PAD].

        A text longer than `max_length` keeps its first words and its [EOS], as the runtime truncates."""
        if isinstance(texts, str):
            raise InputError("batch() takes a list of texts; wrap a single text in a list")
        rows = [self.encode(t) for t in texts]
        if max_length is not None:
            if max_length < 2:
                raise OptionError(f"max_length must be >= 2 ([BOS] and [EOS]), got {max_length}")
            rows = [r if len(r) <= max_length else r[:max_length - 1] + r[-1:] for r in rows]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), PAD_ID, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask


def build_tokenizer(texts: Iterable[str], *, min_count: int = 1,
                    max_words: int | None = None) -> WordTokenizer:
    """A tokenizer over the words of `texts` seen at least `min_count` times, the most frequent
    `max_words` of them when given (ties broken alphabetically, so the ids are reproducible)."""
    if min_count < 1:
        raise OptionError(f"min_count must be >= 1, got {min_count}")
    counts = count_words(texts)
    words = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                   key=lambda w: (-counts[w], w))
    if max_words is not None:
        words = words[:max_words]
    if not words:
        raise InputError("no words to build a tokenizer from; give some texts")
    return WordTokenizer.from_vocab(words)
