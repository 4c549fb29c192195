"""Tiny generated image-text data: coloured shapes on a plain background, with a caption, questions
and answers for each. Enough for a family to learn something in a few CPU steps (smoke tests,
trainer tests, parity tests that need peaky logits), never a benchmark.

    data = toy_dataset(16, size=40, seed=0)       # a ToyDataset
    tok = build_tokenizer(data.texts())
    batch = data.batch(tok, preprocess_config(model), answers=data.answer_set())
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "bar")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}


@dataclass
class ToyDataset:
    images: list  # HxWx3 uint8 RGB arrays
    captions: list[str]
    questions: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def texts(self) -> list[str]:
        """Every text, to build a tokenizer from."""
        return self.captions + self.questions + self.answers

    def answer_set(self) -> list[str]:
        return sorted(set(self.answers))

    def batch(self, tokenizer, preprocess, answers=None, rows=None) -> dict:
        """The model's `loss` batch as torch tensors: images, caption_ids, question_ids,
        question_mask, answer_ids and (given the answer set) answer_labels."""
        import torch

        from ...runtime.preprocess import preprocess as run_preprocess

        rows = range(len(self)) if rows is None else rows
        pick = [self.images[i] for i in rows]
        caption_ids, _ = tokenizer.batch([self.captions[i] for i in rows])
        question_ids, question_mask = tokenizer.batch([self.questions[i] for i in rows])
        answer_ids, _ = tokenizer.batch([self.answers[i] for i in rows])
        out = {"images": torch.from_numpy(run_preprocess(pick, preprocess)),
               "caption_ids": torch.from_numpy(caption_ids), "question_ids": torch.from_numpy(question_ids),
               "question_mask": torch.from_numpy(question_mask), "answer_ids": torch.from_numpy(answer_ids)}
        if answers is not None:
            out["answer_labels"] = torch.tensor([list(answers).index(self.answers[i]) for i in rows])
        return out


def _draw(rng, size: int, color, shape: str, background) -> np.ndarray:
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    image += rng.integers(0, 10, image.shape, dtype=np.uint8)  # a little noise
    half = int(rng.integers(size // 6, size // 3))
    cy, cx = (int(v) for v in rng.integers(half, size - half, 2))
    yy, xx = np.mgrid[:size, :size]
    if shape == "square":
        inside = (abs(yy - cy) <= half) & (abs(xx - cx) <= half)
    elif shape == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= half ** 2
    else:
        inside = (abs(yy - cy) <= max(1, half // 3)) & (abs(xx - cx) <= half)
    image[inside] = color
    return image


def toy_dataset(n: int, *, size: int = 32, seed: int = 0) -> ToyDataset:
    """`n` images of `size` x `size`, with their captions ("a red square on white"), one question
    each (what colour / what shape / is it COLOUR) and its one-word answer."""
    rng = np.random.default_rng(seed)
    images, captions, questions, answers = [], [], [], []
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    for i in range(n):
        color, shape = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
        background = backgrounds[rng.integers(len(backgrounds))]
        images.append(_draw(rng, size, COLORS[color], shape, BACKGROUNDS[background]))
        captions.append(f"a {color} {shape} on {background}")
        kind = i % 3
        if kind == 0:
            questions.append("what color is the shape?")
            answers.append(color)
        elif kind == 1:
            questions.append("what shape is it?")
            answers.append(shape)
        else:
            asked = colors[rng.integers(len(colors))]
            questions.append(f"is the shape {asked}?")
            answers.append("yes" if asked == color else "no")
    return ToyDataset(images, captions, questions, answers)


def quick_fit(model, batch: dict, *, steps: int = 20, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """A few full-batch Adam steps on `batch` (smoke tests; not a trainer). Returns the losses and
    leaves the model in eval mode."""
    import torch

    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
