"""Task metrics on plain strings, so torch models and bundles are scored alike (no torch here).

- VQA accuracy, as the VQA benchmark defines it: an answer is right in proportion to how many
  annotators gave it, min(1, matches / 3), averaged over the ten leave-one-out subsets of ten
  answers. With fewer than ten answers (easy-VQA has one) it is min(1, matches / min(3, n)), so a
  single reference answer means exact match. Answers are compared after a light normalisation
  (lowercase, punctuation and articles removed, number words "zero".."ten" as digits), a subset of
  the official script's.
- Caption BLEU-4: sacrebleu's corpus BLEU (13a tokenisation, lowercased), 0..100.
- Caption CIDEr-D (Vedantam et al., 2015, as the COCO caption evaluation computes it): per image,
  the TF-IDF vectors of the caption's 1- to 4-grams against each reference's, the document frequency
  counted over the images' reference sets, the caption's weights clipped at the reference's, a
  Gaussian length penalty (sigma 6, lengths counted in bigrams), the four orders averaged, the
  references averaged, times 10; the corpus score is the mean over images. Computed here, no
  package needed; it agrees with pycocoevalcap 1.2's `Cider` to rounding (a test pins its figures).
  The official pipeline tokenises with the Stanford PTB tokenizer, which needs Java; here both
  sides are tokenised as the built-in families' tokenizer splits words instead, so the figures are
  close to, not identical with, published CIDEr. A single image scores 0: with one document every
  n-gram's inverse document frequency is log(1) = 0.
"""
from __future__ import annotations

import math
import re
from collections import Counter
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


CIDER_ORDERS = 4  # n-grams of 1..4 words
CIDER_SIGMA = 6.0  # the length penalty's width, in bigrams


def _ngrams(words: Sequence[str]) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, CIDER_ORDERS + 1) for i in range(len(words) - n + 1))


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """CIDEr-D of whitespace-tokenised `hypotheses` (one per image) against `references` (one or
    more per image): (the corpus score, the score of each image)."""
    if len(hypotheses) != len(references) or not hypotheses or any(not rs for rs in references):
        raise InputError(f"CIDEr needs one caption and at least one reference per image: {len(hypotheses)} "
                         f"captions, {len(references)} images")
    refs = [[_ngrams(r.split()) for r in rs] for rs in references]
    frequency: Counter = Counter()  # in how many images' reference sets each n-gram occurs
    for rs in refs:
        frequency.update(set().union(*rs))
    log_images = math.log(len(refs))

    def weights(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(CIDER_ORDERS)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, norms, bigrams

    scores = []
    for hyp, rs in zip(hypotheses, refs):
        h, h_norms, h_len = weights(_ngrams(hyp.split()))
        total = 0.0
        for r in rs:
            v, r_norms, r_len = weights(r)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * CIDER_SIGMA ** 2))
            for n in range(CIDER_ORDERS):
                if h_norms[n] and r_norms[n]:
                    dot = sum(min(w, v[n].get(g, 0.0)) * v[n].get(g, 0.0) for g, w in h[n].items())
                    total += penalty * dot / (h_norms[n] * r_norms[n])
        scores.append(10.0 * total / CIDER_ORDERS / len(rs))
    return sum(scores) / len(scores), scores


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"bleu": corpus BLEU-4 0..100, "cider": CIDEr-D}.

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
    out["cider"] = cider_d([_words(h) for h in hypotheses], [[_words(r) for r in refs] for refs in references])[0]
    return out
