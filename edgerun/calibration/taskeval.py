"""Task metrics against labelled held-out data (`edge-run calibrate --eval DATA.json`).

DATA is one or more data files of the built-in families (COCO-style captions, VQA-v2-style
questions and answers; `edgerun.train.data`), comma-separated. Each metric is scored for the float
twin and for each quantized variant on the same examples, and the variant's drop is the float
score minus its own (`Metric.reference`):
- retrieval (captions): recall@1 and @5, image->text (an image's best-ranked own caption among all
  captions) and text->image (a caption's image among all images);
- vqa (questions with answers): VQA accuracy (edgerun.train.metrics) of greedy answers;
- caption (captions): corpus BLEU-4 (sacrebleu, as a fraction, 0..1) and CIDEr-D
  (edgerun.train.metrics) of each captioned image's caption against its references, decoded as the
  held-out comparison decodes (`--eval-beams`, else the bundle's beams). Beside them, as agreements
  with the float twin (1: the same captions), the same two scores with the float twin's captions as
  the references, each divided by what the float captions score against themselves
  (`bleu_vs_float`, `cider_vs_float`).
With task metrics present, `--max-drop` and `--auto` judge them, not the agreement figures.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .accuracy import Metric

BATCH = 16
RECALL_AT = (1, 5)


def is_data_spec(spec: str | None) -> bool:
    """Whether `--eval` names data files (.json) rather than images."""
    return spec is not None and all(p.strip().lower().endswith(".json") for p in str(spec).split(",") if p.strip())


@dataclass
class TaskData:
    """The labelled examples of the first `images` images that have any (see `load`)."""

    images: list[Path]  # the images scored, in order
    captions: list[tuple[int, str]]  # (index into images, caption)
    questions: list[tuple[int, str, tuple[str, ...]]]  # (index into images, question, answers)
    skipped: str  # what the loader skipped, for the notes


def load(spec: str, images: int) -> TaskData:
    """The data files of `spec`, limited to the first `images` images with examples."""
    from ..train.data import load_data

    data = load_data([p.strip() for p in spec.split(",") if p.strip()])
    keep = data.image_indices()[:images]
    index = {old: new for new, old in enumerate(keep)}
    captions = [(index[c.image], c.caption) for c in data.captions if c.image in index]
    questions = [(index[q.image], q.question, q.answers) for q in data.questions if q.image in index]
    if not captions and not questions:
        raise InputError(f"--eval {spec}: no captions or answered questions with a readable image")
    return TaskData([data.images[i] for i in keep], captions, questions,
                    data.skipped.summary() if data.skipped.examples else "")


@dataclass
class TaskScores:
    """What one model scored on the --eval data, and its captions (for the agreement figures)."""

    scores: dict[tuple[str, str], float]
    captions: list[str] | None = None  # one per captioned image, in the order of `captioned`


def scores(model, data: TaskData, options: Mapping | None = None) -> TaskScores:
    """`model`'s (a loaded bundle) scores on `data`, for the tasks both have; captions are decoded
    with `options` (num_beams)."""
    out: dict[tuple[str, str], float] = {}
    tasks = model.manifest.tasks
    captions = None
    if "retrieval" in tasks and data.captions:
        out.update(retrieval_scores(model, data))
    if "vqa" in tasks and data.questions:
        out[("vqa", "vqa_accuracy")] = vqa_score(model, data)
    if "caption" in tasks and data.captions:
        from ..train.metrics import caption_scores

        captions = caption_texts(model, data, options or {})
        found = caption_scores(captions, references(data))
        out[("caption", "bleu")] = found["bleu"] / 100
        out[("caption", "cider")] = found["cider"]
    return TaskScores(out, captions)


def captioned(data: TaskData) -> list[int]:
    """The images (indices into data.images) that have reference captions, in order."""
    return sorted({i for i, _ in data.captions})


def references(data: TaskData) -> list[list[str]]:
    """Per captioned image, its reference captions."""
    row = {image: k for k, image in enumerate(captioned(data))}
    out: list[list[str]] = [[] for _ in row]
    for image, text in data.captions:
        out[row[image]].append(text)
    return out


def caption_texts(model, data: TaskData, options: Mapping) -> list[str]:
    paths = [str(data.images[i]) for i in captioned(data)]
    return [c.text for i in range(0, len(paths), BATCH) for c in model.caption_batch(paths[i:i + BATCH], **options)]


def float_agreement(got: list[str], reference: list[str]) -> list[Metric]:
    """BLEU and CIDEr-D of `got` with the float twin's captions `reference` as the references, each
    over what the float captions score against themselves (1: the same captions). A score the float
    captions cannot earn (no 4-grams for BLEU, a single image for CIDEr) gives no metric."""
    from ..train.metrics import caption_scores

    as_refs = [[c] for c in reference]
    own, mine = caption_scores(reference, as_refs), caption_scores(got, as_refs)
    return [Metric("caption", f"{name}_vs_float", min(1.0, mine[name] / own[name]), samples=len(got))
            for name in ("bleu", "cider") if own[name] > 0]


def retrieval_scores(model, data: TaskData) -> dict[tuple[str, str], float]:
    used = captioned(data)
    row = {image: k for k, image in enumerate(used)}
    paths = [str(data.images[i]) for i in used]
    images = np.concatenate([model.embed_images(paths[i:i + BATCH]) for i in range(0, len(paths), BATCH)])
    texts = [t for _, t in data.captions]
    embeds = np.concatenate([model.embed_texts(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)])
    owner = np.array([row[i] for i, _ in data.captions])
    return {("retrieval", f"{name}@{k}"): value for name, k, value in recall(images @ embeds.T, owner)}


def recall(sim: np.ndarray, owner: np.ndarray) -> list[tuple[str, int, float]]:
    """sim (n_images, n_texts), owner (n_texts,): the image each text describes -> recall@k
    image->text (an image's best own text) and text->image (a text's image); ties count against."""
    own = owner[None, :] == np.arange(sim.shape[0])[:, None]
    best_own = np.where(own, sim, -np.inf).max(axis=1)
    i2t = (np.where(own, -np.inf, sim) >= best_own[:, None]).sum(axis=1)
    t2i = (sim >= sim[owner, np.arange(sim.shape[1])][None, :]).sum(axis=0) - 1
    return [(name, k, float(np.mean(ranks < k))) for k in RECALL_AT
            for name, ranks in (("image_to_text_recall", i2t), ("text_to_image_recall", t2i))]


def vqa_score(model, data: TaskData) -> float:
    from ..train.metrics import mean_vqa_accuracy

    got = []
    for i in range(0, len(data.questions), BATCH):
        chunk = data.questions[i:i + BATCH]
        found = model.answer_batch([str(data.images[q[0]]) for q in chunk], [q[1] for q in chunk], num_beams=1)
        got += [a.text for a in found]
    return mean_vqa_accuracy(got, [q[2] for q in data.questions])


def metrics(got: TaskScores, reference: TaskScores, data: TaskData | None = None) -> list[Metric]:
    """A variant's task scores as metrics whose drop is measured from the float twin's, each with
    the number of examples it is a rate over when `data` is given; for captions, the agreement
    with the float twin's captions too."""
    out = [Metric(task, name, got.scores[(task, name)], reference=reference.scores[(task, name)],
                  samples=None if data is None else rate_over(data, task, name))
           for task, name in reference.scores if (task, name) in got.scores]
    if got.captions is not None and reference.captions is not None:
        out += float_agreement(got.captions, reference.captions)
    return out


def rate_over(data: TaskData, task: str, name: str) -> int | None:
    """How many examples the score `name` of `task` averages: one of them moves it by 1/that."""
    if task == "retrieval":
        return len({i for i, _ in data.captions}) if name.startswith("image_to_text") else len(data.captions)
    if task == "vqa":
        return len(data.questions)
    return None


def counts(data: TaskData) -> dict[str, int]:
    return {"images": len(data.images), "captions": len(data.captions), "questions": len(data.questions)}


def describe(data: TaskData, tasks: Sequence[str]) -> str:
    parts = [f"{len(data.images)} images"]
    if "retrieval" in tasks or "caption" in tasks:
        parts.append(f"{len(data.captions)} captions")
    if "vqa" in tasks:
        parts.append(f"{len(data.questions)} questions")
    return ", ".join(parts)
