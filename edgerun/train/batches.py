"""From examples to the families' `loss(batch)` dicts, in a seeded order that a resumed run repeats.

An epoch is a list of batches, each of one kind: "caption" batches (images, caption_ids) feed the
caption and retrieval heads, "vqa" batches (images, question_ids, question_mask and answer_ids or
answer_labels) the VQA head. The order is a function of (seed, epoch) alone, so epoch 5 of a run
resumed after epoch 4 is the same as epoch 5 of a run that never stopped.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .data import DataError, ImageStore, ImageTextData

KINDS = ("caption", "vqa")


@dataclass(frozen=True)
class TextLimits:
    """The most tokens, [BOS] and [EOS] included, that the model takes for each text (None: no limit)."""

    caption: int | None
    question: int | None
    answer: int | None


def text_limits(model) -> TextLimits:
    config = model.config
    if model.family == "lstm":
        return TextLimits(config["decoder"]["max_positions"] + 1, None, None)
    heads, text = config["heads"], config.get("text_encoder") or {}
    question = text.get("max_length")
    caption = heads["caption"]["max_positions"] + 1 if "caption" in heads else None
    if "retrieval" in heads and question is not None:  # captions also run through the text encoder
        caption = question if caption is None else min(caption, question)
    vqa = heads.get("vqa") or {}
    answer = vqa["max_positions"] + 1 if vqa.get("type") == "generative" else None
    return TextLimits(caption, question, answer)


def answer_set(data: ImageTextData, max_answers: int | None = None) -> tuple[str, ...]:
    """The training answers, most frequent first (ties alphabetical), at most `max_answers` of them."""
    counts = Counter(q.answer for q in data.questions)
    answers = sorted(counts, key=lambda a: (-counts[a], a))
    return tuple(answers[:max_answers] if max_answers else answers)


def config_tasks(config: dict) -> tuple[str, ...]:
    """The heads a model config builds: caption for the lstm family, the "heads" of a transformer."""
    return ("caption",) if config.get("family") == "lstm" else tuple(config.get("heads") or ())


def trained_kinds(tasks: Sequence[str], data: ImageTextData) -> tuple[str, ...]:
    """The batch kinds that heads `tasks` learn from in `data`; DataError when there are none."""
    kinds = tuple(k for k, heads, examples in (("caption", {"caption", "retrieval"}, data.captions),
                                              ("vqa", {"vqa"}, data.questions)) if set(tasks) & heads and examples)
    if not kinds:
        tasks = set(tasks)
        raise DataError(f"the model's heads ({', '.join(sorted(tasks))}) learn from "
                        f"{'captions' if tasks & {'caption', 'retrieval'} else 'questions with answers'}, "
                        f"and the data has {len(data.captions)} captions and {len(data.questions)} questions")
    return kinds


def epoch_batches(sizes: dict[str, int], batch_size: int, seed: int, epoch: int,
                  limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """One epoch: (kind, example indices) batches in a seeded order, `limit` of them at most.

    sizes : examples per kind (only kinds that are trained). A kind with more examples than
    batch_size drops its last partial batch (a new one each epoch, as the order changes).
    """
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for kind in KINDS:
        n = sizes.get(kind, 0)
        if n == 0:
            continue
        order = rng.permutation(n)
        stop = n if n <= batch_size else n - n % batch_size
        batches += [(kind, order[i:i + batch_size]) for i in range(0, stop, batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches[:limit] if limit else batches


class Batcher:
    """Builds the model's batches (torch tensors) from example indices of one data set."""

    def __init__(self, data: ImageTextData, images: ImageStore, tokenizer, limits: TextLimits,
                 vqa_mode: str | None = None, answers: Sequence[str] | None = None):
        self.data, self.images, self.tokenizer, self.limits = data, images, tokenizer, limits
        self.vqa_mode = vqa_mode
        self.labels = {a: i for i, a in enumerate(answers)} if answers else {}

    def __call__(self, kind: str, rows: Sequence[int]) -> dict:
        return self.captions(rows) if kind == "caption" else self.questions(rows)

    def _ids(self, texts: list[str], limit: int | None):
        import torch

        ids, mask = self.tokenizer.batch(texts, max_length=limit)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def _pixels(self, images: list[int]):
        import torch

        return torch.from_numpy(self.images.pixels(images))

    def captions(self, rows: Sequence[int]) -> dict:
        """images (B, 3, S, S), caption_ids and caption_mask (B, T)."""
        examples = [self.data.captions[i] for i in rows]
        ids, mask = self._ids([e.caption for e in examples], self.limits.caption)
        return {"images": self._pixels([e.image for e in examples]), "caption_ids": ids, "caption_mask": mask}

    def questions(self, rows: Sequence[int]) -> dict:
        """images, question_ids and question_mask (B, Q), and answer_ids (B, A) for a generative head
        or answer_labels (B,) for a classifier (-100, ignored, for an answer outside the answer set)."""
        import torch

        examples = [self.data.questions[i] for i in rows]
        ids, mask = self._ids([e.question for e in examples], self.limits.question)
        batch = {"images": self._pixels([e.image for e in examples]), "question_ids": ids, "question_mask": mask}
        if self.vqa_mode == "classifier":
            batch["answer_labels"] = torch.tensor([self.labels.get(e.answer, -100) for e in examples])
        else:
            batch["answer_ids"] = self._ids([e.answer for e in examples], self.limits.answer)[0]
        return batch
