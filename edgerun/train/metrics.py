"""Task metrics on plain strings, so torch models and bundles are scored alike (no torch here).

- VQA accuracy, as the VQA benchmark defines it: an answer is right in proportion to how many
  annotators gave it, min(1, matches / 3), averaged over the ten leave-one-out subsets of ten
  answers. With fewer than ten answers (easy-VQA has one) it is min(1, matches / min(3, n)), so a
  single reference answer means exact match. Answers are compared after a light normalisation
  (lowercase, punctuation and articles removed, number words "zero".."ten" as digits), a subset of
  the official script's.
- Caption BLEU-4: sacrebleu's corpus BLEU (13a tokenisation, lowercased), 0..100.
- Caption CIDEr-D: pycocoevalcap's `Cider`, when that package is installed
  (`pip install pycocoevalcap`; the scorer is pure Python). The official coco-caption pipeline
  tokenises with the Stanford PTB tokenizer, which needs Java; here both sides are tokenised as the
  built-in families' tokenizer splits words instead, so the figures are close to, not identical
  with, published CIDEr. Without the package, `caption_scores` reports BLEU alone.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import InputError, require

NUMBERS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                            "nine", "ten"))}
ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s']")


def normalize_answer(text: str) -> str:
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(NUMBERS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(predicted: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one predicted answer against the annotators' `answers`."""
    if not answers:
        raise InputError("vqa_accuracy needs at least one reference answer")
    guess = normalize_answer(predicted)
    matches = [normalize_answer(a) == guess for a in answers]
    if len(matches) >= 10:
        return sum(min(1.0, (sum(matches) - hit) / 3) for hit in matches) / len(matches)
    return min(1.0, sum(matches) / min(3, len(matches)))


def mean_vqa_accuracy(predicted: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy over questions, 0..1."""
    if len(predicted) != len(answers) or not predicted:
        raise InputError(f"need one prediction per question: {len(predicted)} predictions, {len(answers)} questions")
    return sum(vqa_accuracy(p, a) for p, a in zip(predicted, answers)) / len(predicted)


def _words(text: str) -> str:
    from tokenizers import normalizers, pre_tokenizers

    split = pre_tokenizers.Whitespace().pre_tokenize_str(normalizers.Lowercase().normalize_str(text))
    return " ".join(w for w, _ in split)


def has_cider() -> bool:
    try:
        from pycocoevalcap.cider.cider import Cider  # noqa: F401
    except ImportError:
        return False
    return True


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"bleu": corpus BLEU-4 0..100, "cider": CIDEr-D (when pycocoevalcap is installed)}.

    hypotheses : one caption per image; references : per image, one or more reference captions.
    """
    if len(hypotheses) != len(references) or not hypotheses:
        raise InputError(f"need one caption per image: {len(hypotheses)} captions, {len(references)} images")
    if any(not refs for refs in references):
        raise InputError("every image needs at least one reference caption")
    sacrebleu = require("sacrebleu", "train")
    most = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    out = {"bleu": float(sacrebleu.corpus_bleu(list(hypotheses), streams, lowercase=True).score)}
    if has_cider():
        from pycocoevalcap.cider.cider import Cider

        gts = {i: [_words(r) for r in refs] for i, refs in enumerate(references)}
        res = {i: [_words(h)] for i, h in enumerate(hypotheses)}
        out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out
