"""Accept a quantized bundle on task metrics against its float twin, on held-out images.

The float bundle runs once over the held-out batches (`reference`); each quantized variant then
runs over the same batches (`compare`), so only one model's sessions are open at a time. Every
metric is an agreement in [0, 1] with the float twin (1: identical), and its `drop` is 1 - value:
- caption: exact-caption agreement (identical token ids); along the float caption (teacher-forced,
  on the first LOGIT_IMAGES images) the cosine of the logits and how often both pick the same next
  token;
- vqa: exact-answer agreement (generative) or top-1 agreement (answer classifier);
- retrieval: image and text embedding cosine, top-1 text agreement per image (zero-shot
  classification), the overlap of the top-k neighbours (image to image, text to image), and
  1 - the mean difference of the ITM probabilities where there is an ITM head.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .collect import run_tasks

LOGIT_IMAGES = 16
TOP_K = 5


@dataclass(frozen=True)
class Metric:
    """An agreement with the float twin (drop: 1 - value), or a task score (recall, accuracy;
    `reference`: the float twin's score, drop: reference - value)."""

    task: str
    name: str
    value: float
    reference: float | None = None
    samples: int | None = None  # a task score: the examples it is a rate over (one of them moves it 1/samples)

    @property
    def drop(self) -> float:
        return max(0.0, (1.0 if self.reference is None else self.reference) - self.value)

    def to_dict(self) -> dict:
        out = {"task": self.task, "metric": self.name, "value": round(self.value, 6), "drop": round(self.drop, 6)}
        if self.reference is not None:
            out["float"] = round(self.reference, 6)
        if self.samples is not None:
            out["samples"] = self.samples
        return out


@dataclass
class AccuracyReport:
    """How a variant's outputs compare with the float twin's on `samples` held-out images."""

    variant: str
    samples: int
    metrics: list[Metric] = field(default_factory=list)
    gate: tuple[str, ...] = ()  # metric-name globs that --max-drop judges (`--gate`); () : see gating

    @property
    def gating(self) -> list[Metric]:
        """The metrics `--max-drop` judges: those `gate` names, else the task scores where there
        are any, else all."""
        if self.gate:
            return [m for m in self.metrics if any(fnmatch.fnmatchcase(m.name, g) for g in self.gate)]
        return [m for m in self.metrics if m.reference is not None] or self.metrics

    @property
    def worst(self) -> Metric | None:
        return max(self.gating, key=lambda m: m.drop, default=None)

    def within(self, max_drop: float | None) -> bool:
        return max_drop is None or all(m.drop <= max_drop for m in self.gating)

    def to_dict(self) -> dict:
        return {"variant": self.variant, "samples": self.samples, "metrics": [m.to_dict() for m in self.metrics]}


@dataclass
class Outputs:
    """What one model gave on the held-out batches, gathered over all batches."""

    tasks: dict[str, list] = field(default_factory=dict)  # caption/vqa: token-id lists; retrieval: arrays
    logits: list[np.ndarray] = field(default_factory=list)  # per image: (steps, vocab)
    samples: int = 0


def run(model, batches: Sequence[np.ndarray], texts: Sequence[str], questions: Sequence[str],
        options: Mapping, reference: Outputs | None = None) -> Outputs:
    """Run every task on `batches`; caption logits follow `reference`'s captions (or this model's)."""
    out = Outputs()
    for i, pixels in enumerate(batches):
        got = run_tasks(model, pixels, texts, questions, options, embed_texts=(i == 0))
        for task, value in got.items():
            out.tasks.setdefault(task, []).append(value)
        first = len(out.logits)
        if "caption" in got and first < LOGIT_IMAGES:
            source = reference.tasks["caption"] if reference is not None else out.tasks["caption"]
            captions = [ids for batch in source for ids in batch][out.samples:]
            some = pixels[:LOGIT_IMAGES - first]
            out.logits += caption_logits(model, some, captions[:len(some)])
        out.samples += len(pixels)
    return out


def caption_logits(model, pixels: np.ndarray, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Logits (steps, vocab) the caption decoder gives at each position of `sequences` (teacher
    forcing): the rows predict sequence[P:], P being the prompt's length."""
    from ..runtime.kvcache import make_inference

    modules = model.manifest.tasks["caption"].modules
    values = {model.runner(modules[0]).inputs[0].name: pixels}
    for name in modules[:-1]:
        runner = model.runner(name)
        values.update(runner.infer({i.name: values[i.name] for i in runner.inputs}))
    prompt = len(model.manifest.decoding["decoder_start_ids"])
    longest = max(len(s) for s in sequences)
    tokens = np.array([list(s) + [s[-1]] * (longest - len(s)) for s in sequences], dtype=np.int64)
    cache = model.bundle.module(modules[-1]).extra.get("cache", {})
    inference = make_inference(model.runner(modules[-1]), values, len(sequences), 1, longest, cache)
    steps = [inference.logits(tokens[:, :prompt]).copy()]  # a decoder may refill one buffer each step
    for j in range(prompt, longest - 1):
        steps.append(inference.logits(tokens[:, j:j + 1]).copy())
    logits = np.stack(steps, axis=1)
    return [logits[i, :max(1, len(s) - prompt)].copy() for i, s in enumerate(sequences)]


def compare(variant: str, got: Outputs, ref: Outputs, classifier: bool = False) -> AccuracyReport:
    """The metrics of `got` (a quantized variant) against `ref` (the float twin)."""
    report = AccuracyReport(variant, ref.samples)
    for task, batches in ref.tasks.items():
        mine = got.tasks[task]
        if task in ("caption", "vqa"):
            a = [x for b in batches for x in b]
            b = [x for b in mine for x in b]
            name = ("top1_agreement" if classifier else "exact_answer_agreement") if task == "vqa" \
                else "exact_caption_agreement"
            report.metrics.append(Metric(task, name, float(np.mean([x == y for x, y in zip(a, b)]))))
        elif task == "retrieval":
            report.metrics += _retrieval(batches, mine)
    if ref.logits and got.logits:
        cos = [_cosine(x.ravel(), y.ravel()) for x, y in zip(ref.logits, got.logits)]
        same = np.concatenate([x.argmax(-1) == y.argmax(-1) for x, y in zip(ref.logits, got.logits)])
        report.metrics.append(Metric("caption", "logits_cosine", float(np.mean(cos))))
        report.metrics.append(Metric("caption", "next_token_agreement", float(same.mean())))
    return report


def _retrieval(ref: list, got: list) -> list[Metric]:
    images_a = np.concatenate([b[0] for b in ref])
    images_b = np.concatenate([b[0] for b in got])
    texts_a, texts_b = ref[0][1], got[0][1]
    def rows(a: np.ndarray, b: np.ndarray) -> float:
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
        return float(np.mean(np.sum(a * b, axis=1) / norms))

    out = [Metric("retrieval", "image_embedding_cosine", rows(images_a, images_b)),
           Metric("retrieval", "text_embedding_cosine", rows(texts_a, texts_b)),
           Metric("retrieval", "text_top1_agreement",
                  float(np.mean(np.argmax(images_a @ texts_a.T, 1) == np.argmax(images_b @ texts_b.T, 1))))]
    if ref[0][2] is not None and got[0][2] is not None:
        out.append(Metric("retrieval", "itm_probability_agreement",
                          1.0 - float(np.mean(np.abs(ref[0][2] - got[0][2])))))
    n = len(images_a)
    if n > 1:
        k = min(TOP_K, n - 1)
        sim_a, sim_b = images_a @ images_a.T, images_b @ images_b.T
        np.fill_diagonal(sim_a, -np.inf)
        np.fill_diagonal(sim_b, -np.inf)
        out.append(Metric("retrieval", f"image_neighbour_overlap@{k}", _overlap(sim_a, sim_b, k)))
    k = min(TOP_K, n)
    out.append(Metric("retrieval", f"text_to_image_overlap@{k}", _overlap(texts_a @ images_a.T, texts_b @ images_b.T, k)))
    return out


def _overlap(scores_a: np.ndarray, scores_b: np.ndarray, k: int) -> float:
    top_a = np.argsort(-scores_a, axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-scores_b, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b)]))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def table(reports: Sequence[AccuracyReport]) -> str:
    """The reports side by side: one row per metric, one column per variant."""
    if not reports:
        return ""
    keys = [(m.task, m.name) for m in reports[0].metrics]
    floats = {(m.task, m.name): m.reference for m in reports[0].metrics}
    head = f"{'task':<10} {'metric':<28}" + "".join(f" {r.variant:>14}" for r in reports)
    if any(v is not None for v in floats.values()):
        head += f" {'float':>14}"
    lines = [head, "-" * len(head)]
    for task, name in keys:
        cells = []
        for r in reports:
            m = next((m for m in r.metrics if (m.task, m.name) == (task, name)), None)
            cells.append(f" {m.value:>14.4f}" if m else f" {'-':>14}")
        if floats[(task, name)] is not None:
            cells.append(f" {floats[(task, name)]:>14.4f}")
        elif any(v is not None for v in floats.values()):
            cells.append(f" {'':>14}")
        lines.append(f"{task:<10} {name:<28}" + "".join(cells))
    return "\n".join(lines)
