"""The easy-VQA set (PyPI `easy-vqa`, MIT) as COCO-style caption and VQA-v2-style question files.

easy-VQA is 5,000 synthetic 64x64 images of one coloured shape each (4,000 train, 1,000 test) with
48,248 questions whose answers are one of 13 words. The package ships it all inside itself, so
nothing is downloaded: `easy_vqa/data/{train,test}/images/N.png`, `.../questions.json` (a list of
[question, answer, image_id]) and `data/answers.txt`.

`prepare_easy_vqa(folder)` copies the images and writes, per split:

    images/{split}/N.png
    {split}_captions.json   COCO style, one caption per image
    {split}_questions.json  VQA v2 questions, with the split's "images" list so the file stands alone
    {split}_answers.json    VQA v2 annotations (multiple_choice_answer and a one-entry answers list)

The set has no captions; each image's is derived: colour and shape from its question-answer pairs
that name them ("what color is the triangle?" -> "red" gives both; "is there not a circle?" -> "no"
says a circle is there; two shapes ruled out leave the third), and a size from the image, the
fraction of pixels unlike the background (under 5 %: "small", 12 % or more: "large", else none):
"a large red triangle". An image whose colour or shape its questions do not settle gets a caption
without it ("a small circle", "a blue shape"); `EasyVqaPaths.partial_captions` counts them.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import require
from .data import DataError
from .state import write_json

SPLITS = ("train", "test")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
NEGATIONS = ("not", "no")
SMALL_BELOW, LARGE_FROM = 0.05, 0.12  # foreground fraction of the image
MARKER = "easy_vqa.json"


@dataclass(frozen=True)
class EasyVqaPaths:
    folder: Path
    train: tuple[Path, Path, Path]  # captions, questions, answers: give all three to --data
    test: tuple[Path, Path, Path]
    images: dict  # split -> number of images
    questions: dict  # split -> number of questions
    partial_captions: dict  # split -> captions missing the colour or the shape


@dataclass
class _Facts:
    color: str | None = None
    shape: str | None = None
    conflicts: int = 0

    def set(self, attr: str, value: str) -> None:
        old = getattr(self, attr)
        if old is not None and old != value:
            self.conflicts += 1
        setattr(self, attr, value)


def image_facts(pairs: Sequence[tuple[str, str]], colors: Sequence[str]) -> _Facts:
    """Colour and shape of one image from its (question, answer) pairs."""
    facts, absent = _Facts(), set()
    for question, answer in pairs:
        words = question.lower().rstrip("?").split()
        named = [w for w in words if w in colors or w in SHAPES]
        if answer in YES_NO:
            present = (answer == "yes") != any(w in NEGATIONS for w in words)
            for word in named:
                if present:
                    facts.set("color" if word in colors else "shape", word)
                else:
                    absent.add(word)
            continue
        facts.set("color" if answer in colors else "shape", answer)
        for word in named:  # "what color is the triangle?", "what is the blue shape?"
            facts.set("color" if word in colors else "shape", word)
    for attr, options in (("shape", SHAPES), ("color", colors)):
        left = [o for o in options if o not in absent]
        if getattr(facts, attr) is None and len(left) == 1:
            setattr(facts, attr, left[0])
    return facts


def size_word(image: np.ndarray) -> str:
    """'small', 'large' or '' from the share of pixels unlike the background (the commonest border colour)."""
    pixels = image.astype(np.int32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    values, counts = np.unique(border, axis=0, return_counts=True)
    share = float((np.abs(pixels - values[counts.argmax()]).sum(-1) > 40).mean())
    return "small" if share < SMALL_BELOW else "large" if share >= LARGE_FROM else ""


def caption(facts: _Facts, size: str) -> str:
    words = ["a", size, facts.color or "", facts.shape or "shape"]
    return " ".join(w for w in words if w)


def _load_split(easy_vqa, split: str, limit: int | None):
    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    images = getattr(easy_vqa, f"get_{split}_image_paths")()
    keep = sorted(images)[:limit] if limit else sorted(images)
    kept = set(keep)
    rows = [(q, a, i) for q, a, i in zip(texts, answers, image_ids) if i in kept]
    return {i: Path(images[i]) for i in keep}, rows


def _write_split(folder: Path, split: str, images: dict, rows: list, colors: Sequence[str]) -> tuple[int, int]:
    from ..runtime.image import load_image

    target = folder / "images" / split
    target.mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list] = {i: [] for i in images}
    for question, answer, image_id in rows:
        by_image[image_id].append((question, answer))
    listed, captions, partial = [], [], 0
    for image_id, source in images.items():
        name = f"images/{split}/{image_id}.png"
        shutil.copyfile(source, folder / name)
        listed.append({"id": image_id, "file_name": name})
        facts = image_facts(by_image[image_id], colors)
        partial += facts.color is None or facts.shape is None or facts.conflicts > 0
        captions.append({"id": image_id, "image_id": image_id,
                         "caption": caption(facts, size_word(load_image(source)))})
    questions = [{"question_id": n, "image_id": i, "question": q} for n, (q, _, i) in enumerate(rows)]
    answers = [{"question_id": n, "multiple_choice_answer": a, "answers": [{"answer": a, "answer_id": 1}]}
               for n, (_, a, _) in enumerate(rows)]
    info = {"description": f"easy-VQA {split} (PyPI easy-vqa), converted by edge-run"}
    write_json(folder / f"{split}_captions.json", {"info": info, "images": listed, "annotations": captions})
    write_json(folder / f"{split}_questions.json", {"info": info, "data_subtype": split, "images": listed,
                                                    "questions": questions})
    write_json(folder / f"{split}_answers.json", {"info": info, "annotations": answers})
    return len(rows), partial


def _paths(folder: Path, record: dict) -> EasyVqaPaths:
    files = {s: tuple(folder / f"{s}_{kind}.json" for kind in ("captions", "questions", "answers")) for s in SPLITS}
    return EasyVqaPaths(folder, files["train"], files["test"], record["images"], record["questions"],
                        record["partial_captions"])


def prepare_easy_vqa(folder: str | Path, *, limit: int | None = None) -> EasyVqaPaths:
    """Convert the installed easy-vqa package into `folder` (see the module docstring); `limit`
    keeps the first `limit` images of each split (by id) and their questions. A folder prepared
    before with the same limit is reused as it is."""
    easy_vqa = require("easy_vqa", "train")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text(encoding="utf-8"))
        if record.get("limit") == limit:
            return _paths(folder, record)
    vocabulary = easy_vqa.get_answers()
    colors = [a for a in vocabulary if a not in SHAPES and a not in YES_NO]
    record = {"source": "easy-vqa", "limit": limit, "colors": colors, "images": {}, "questions": {},
              "partial_captions": {}}
    for split in SPLITS:
        images, rows = _load_split(easy_vqa, split, limit)
        unknown = sorted({a for _, a, _ in rows} - set(vocabulary))
        if unknown:
            raise DataError(f"easy-vqa answers {unknown} are not in its answers.txt; this converter knows easy-vqa 1.0")
        n_questions, partial = _write_split(folder, split, images, rows, colors)
        record["images"][split], record["questions"][split] = len(images), n_questions
        record["partial_captions"][split] = partial
    write_json(marker, record)
    return _paths(folder, record)
