"""Validation of a torch model during training: mean loss per kind and the task metrics.

Captions and generative answers are decoded greedily through the runtime's own decoder
(`edgerun.models.families.reference`), the same search a bundle runs, so a checkpoint's figures
carry over to its bundle.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..models.families.reference import answer_probabilities, generate_answers, generate_captions
from ..runtime.decoding import DecodingOptions
from .batches import Batcher
from .metrics import caption_scores, mean_vqa_accuracy
from .options import METRICS


def new_tokens(limit: int | None, default: int = 8) -> int:
    """max_new_tokens for a text limit (tokens with [BOS] and [EOS], i.e. the decoder's positions + 1):
    the runtime takes prompt + max_new_tokens <= positions, so positions - 1 after the [BOS] prompt."""
    return max(1, (limit or default) - 2)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def mean_losses(model, batcher: Batcher, kinds, sizes: dict[str, int], batch_size: int) -> dict[str, float]:
    """{"loss_caption": ..., "loss_vqa": ...}: each kind's example-weighted mean of model.loss."""
    out = {}
    for kind in kinds:
        total = 0.0
        for rows in _chunks(list(range(sizes[kind])), batch_size):
            total += float(model.loss(batcher(kind, rows))) * len(rows)
        out[f"loss_{kind}"] = total / sizes[kind]
    return out


@torch.no_grad()
def predict_captions(model, batcher: Batcher, images: list[int], batch_size: int, max_new_tokens: int) -> list[str]:
    options = DecodingOptions(max_new_tokens=max_new_tokens)
    out = []
    for chunk in _chunks(images, batch_size):
        pixels = torch.from_numpy(batcher.images.pixels(chunk))
        out += [batcher.tokenizer.decode(h[0].token_ids) for h in generate_captions(model, pixels, options)]
    return out


@torch.no_grad()
def predict_answers(model, batcher: Batcher, rows: list[int], batch_size: int, max_new_tokens: int) -> list[str]:
    out = []
    for chunk in _chunks(rows, batch_size):
        batch = batcher.questions(chunk)
        args = (batch["images"], batch["question_ids"], batch["question_mask"])
        if model.vqa_mode == "classifier":
            out += [model.answers[i] for i in answer_probabilities(model, *args).argmax(axis=1)]
        else:
            hyps = generate_answers(model, *args, DecodingOptions(max_new_tokens=max_new_tokens))
            out += [batcher.tokenizer.decode(h[0].token_ids) for h in hyps]
    return out


def evaluate(model, batcher: Batcher, kinds, batch_size: int, limit: int | None = None) -> dict[str, float]:
    """Validation losses and metrics over (at most `limit` examples per kind of) `batcher`'s data.

    Returns loss_caption / loss_vqa, loss (their sum), and where the model has the head:
    vqa_accuracy (0..1), bleu (0..100), cider.
    """
    was_training = model.training
    model.eval()
    try:
        data = batcher.data
        sizes = {"caption": min(len(data.captions), limit or len(data.captions)),
                 "vqa": min(len(data.questions), limit or len(data.questions))}
        kinds = [k for k in kinds if sizes[k]]
        out = mean_losses(model, batcher, kinds, sizes, batch_size)
        out["loss"] = sum(out.values())
        if "caption" in kinds and "caption" in model.tasks:
            refs = defaultdict(list)
            for example in data.captions[:sizes["caption"]]:
                refs[example.image].append(example.caption)
            images = sorted(refs)
            hyps = predict_captions(model, batcher, images, batch_size, new_tokens(batcher.limits.caption))
            out.update(caption_scores(hyps, [refs[i] for i in images]))
        if "vqa" in kinds:
            rows = list(range(sizes["vqa"]))
            guesses = predict_answers(model, batcher, rows, batch_size, new_tokens(batcher.limits.answer))
            out["vqa_accuracy"] = mean_vqa_accuracy(guesses, [data.questions[i].answers for i in rows])
        return out
    finally:
        model.train(was_training)


def pick_metric(requested: str, scores: dict[str, float]) -> str:
    """The metric best.pt is chosen by: `requested`, or for "auto" vqa_accuracy, else cider, else
    bleu, else loss (the only one where lower is better)."""
    if requested != "auto":
        return requested
    return next(m for m in METRICS if m in scores)


def better(metric: str, score: float, best: float | None) -> bool:
    if best is None:
        return True
    return score < best if metric == "loss" else score > best
