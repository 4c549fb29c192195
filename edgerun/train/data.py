"""Image-text training data: COCO-style captions, VQA-v2-style questions and answers.

`load_data(paths)` reads one or more JSON files. Each is an object with any of these lists, so the
public formats load as they are, and so does one file that merges them:

    "images":      [{"id": 1, "file_name": "images/1.png"}, ...]     relative to that JSON's folder
    "annotations": captions (COCO)   [{"image_id": 1, "caption": "a red circle"}, ...]
                   answers (VQA v2)  [{"question_id": 7, "multiple_choice_answer": "red",
                                       "answers": [{"answer": "red"}, ...]}, ...]
    "questions":   (VQA v2)          [{"question_id": 7, "image_id": 1, "question": "what color?"}, ...]

An annotation with "caption" is a caption, one with "question_id" an answer. A question may also
carry its answer itself ("multiple_choice_answer", "answers" or a single "answer"). "answers" is a
list of {"answer": text} objects (VQA v2) or of strings; the training target is
"multiple_choice_answer", else "answer", else the most frequent of "answers"; all of them count
for VQA accuracy. A questions file with no "images" list but VQA v2's "data_subtype" (e.g.
"val2014") finds image N at `val2014/COCO_val2014_{N:012d}.jpg` beside it, where COCO unpacks.

Bad data: malformed JSON raises `DataError` with file:line:column; an entry without its required
keys, or with the wrong types, raises `DataError` naming the file, list and index. An example whose
image file is missing, whose image id has no "images" entry, or whose question has no answer is
skipped and counted in `Skipped`; so is one whose image cannot be decoded (`ImageStore`). A set with
nothing left raises `DataError`.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

import numpy as np

from ..errors import InputError

LISTS = ("images", "annotations", "questions")
ImageId = Union[int, str]


class DataError(InputError):
    """Training data that cannot be used: malformed JSON, missing keys, or nothing to train on."""


@dataclass(frozen=True)
class CaptionExample:
    image: int  # index into ImageTextData.images
    caption: str


@dataclass(frozen=True)
class QuestionExample:
    image: int
    question: str
    answer: str  # the training target
    answers: tuple[str, ...]  # every given answer, for VQA accuracy
    question_id: ImageId


@dataclass
class Skipped:
    """What was left out, and why."""

    missing_images: set = field(default_factory=set)  # image files that do not exist
    unknown_image_ids: set = field(default_factory=set)  # ids with no "images" entry
    unreadable_images: dict = field(default_factory=dict)  # path -> why it could not be decoded
    captions: int = 0  # caption annotations skipped
    questions: int = 0  # questions skipped
    unanswered: int = 0  # of those, questions without an answer

    @property
    def examples(self) -> int:
        return self.captions + self.questions

    def summary(self) -> str:
        """One line, 'skipped 1 caption(s) and 1 question(s): missing image files (1): a.png', or ''."""
        if not self.examples:
            return ""
        reasons = [_some(self.missing_images, "missing image files"),
                   _some(self.unknown_image_ids, "image ids without an 'images' entry"),
                   _some(self.unreadable_images, "unreadable images"),
                   f"questions without an answer ({self.unanswered})" if self.unanswered else ""]
        return (f"skipped {self.captions} caption(s) and {self.questions} question(s): "
                + "; ".join(r for r in reasons if r))


def _some(items: Iterable, noun: str, show: int = 3) -> str:
    items = sorted(map(str, items))
    if not items:
        return ""
    more = f", ... {len(items) - show} more" if len(items) > show else ""
    return f"{noun} ({len(items)}): {', '.join(items[:show])}{more}"


@dataclass
class ImageTextData:
    images: list[Path]  # every image an example refers to, by index
    captions: list[CaptionExample]
    questions: list[QuestionExample]
    skipped: Skipped
    sources: tuple[Path, ...]

    def texts(self, kinds: Iterable[str] = ("caption", "vqa")) -> list[str]:
        """The captions ("caption") and the questions and answers ("vqa"): what a tokenizer is built from."""
        out = [c.caption for c in self.captions] if "caption" in kinds else []
        if "vqa" in kinds:
            out += [q.question for q in self.questions] + [q.answer for q in self.questions]
        return out

    def image_indices(self) -> list[int]:
        """The images that some example uses, sorted."""
        return sorted({c.image for c in self.captions} | {q.image for q in self.questions})

    def subset(self, images: Iterable[int]) -> ImageTextData:
        """The examples of `images` (indices stay valid: the image list is shared)."""
        keep = set(images)
        return replace(self, captions=[c for c in self.captions if c.image in keep],
                       questions=[q for q in self.questions if q.image in keep])

    def without_images(self, unreadable: dict[int, str]) -> ImageTextData:
        """Drop the examples of the images `unreadable` (index -> reason), counting them as skipped."""
        if not unreadable:
            return self
        out = self.subset(set(range(len(self.images))) - set(unreadable))
        skipped = replace(self.skipped, unreadable_images={**self.skipped.unreadable_images,
                                                           **{str(self.images[i]): r for i, r in unreadable.items()}},
                          captions=self.skipped.captions + len(self.captions) - len(out.captions),
                          questions=self.skipped.questions + len(self.questions) - len(out.questions))
        out = replace(out, skipped=skipped)
        check_not_empty(out)
        return out


def split_by_image(data: ImageTextData, fraction: float, seed: int) -> tuple[ImageTextData, ImageTextData]:
    """(train, validation): a seeded `fraction` of the images, with all their examples, held out."""
    images = data.image_indices()
    if len(images) < 2:
        raise DataError(f"{len(images)} image(s) cannot be split into training and validation; "
                        "give more data or a separate validation set (--val-data)")
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = min(len(images) - 1, max(1, math.ceil(fraction * len(images))))
    val = {images[i] for i in order[:n_val]}
    return data.subset(set(images) - val), data.subset(val)


# -- reading ---------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """The top-level object of a data file; DataError (with line and column) when it is not one."""
    if path.is_dir():
        found = ", ".join(sorted(p.name for p in path.glob("*.json"))) or "none"
        raise DataError(f"{path} is a folder; give its JSON files one by one (found: {found})")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from None
    if not isinstance(data, dict) or not set(LISTS) & set(data):
        got = f"keys {sorted(data)}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise DataError(f"{path}: expected an object with any of {', '.join(LISTS)} "
                        f"(COCO captions or VQA v2 questions/answers); got {got}")
    return data


def _entries(data: dict, key: str, path: Path) -> list[dict]:
    items = data.get(key, [])
    if not isinstance(items, list):
        raise DataError(f"{path}: {key!r} must be a list, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: {key}[{i}] must be an object, got {type(item).__name__}")
    return items


def _get(entry: dict, key: str, types: tuple, where: str, kind: str):
    if key not in entry:
        raise DataError(f"{where} has no {key!r}; {kind} entries need {KEYS[kind]}")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, types) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: {key!r} must be a non-empty {' or '.join(t.__name__ for t in types)}, "
                        f"got {value!r}")
    return value


KEYS = {"image": "id and file_name", "caption": "image_id and caption", "question": "question_id, image_id "
        "and question", "answer": "question_id and multiple_choice_answer, answer or answers"}
ID = (int, str)


@dataclass
class _Raw:
    images: dict = field(default_factory=dict)  # image id -> path
    captions: list = field(default_factory=list)  # (image id, caption)
    questions: list = field(default_factory=list)  # (question id, image id, question, fallback path, answer)
    answers: dict = field(default_factory=dict)  # question id -> (answer, answers)


def _answer_of(entry: dict, where: str) -> tuple[str, tuple[str, ...]] | None:
    """(target, all answers) from "multiple_choice_answer" / "answer" / "answers", or None."""
    listed = entry.get("answers", [])
    if not isinstance(listed, list):
        raise DataError(f"{where}: 'answers' must be a list, got {type(listed).__name__}")
    answers = []
    for i, a in enumerate(listed):
        text = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(text, str):
            raise DataError(f"{where}: answers[{i}] must be a string or an object with an 'answer' string")
        answers.append(text.strip())
    main = entry.get("multiple_choice_answer", entry.get("answer"))
    if main is not None and (not isinstance(main, str) or not main.strip()):
        raise DataError(f"{where}: the answer must be a non-empty string, got {main!r}")
    if main is None and not answers:
        return None
    main = main.strip() if main is not None else Counter(answers).most_common(1)[0][0]
    return main, tuple(answers) or (main,)


def _read_into(raw: _Raw, path: Path) -> None:
    data, folder = read_json(path), path.parent
    for i, entry in enumerate(_entries(data, "images", path)):
        where = f"{path}: images[{i}]"
        image_id = _get(entry, "id", ID, where, "image")
        file = (folder / _get(entry, "file_name", (str,), where, "image")).resolve()
        if raw.images.setdefault(image_id, file) != file:
            raise DataError(f"{where}: image id {image_id!r} is already {raw.images[image_id]}, not {file}")
    for i, entry in enumerate(_entries(data, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        if "caption" in entry:
            raw.captions.append((_get(entry, "image_id", ID, where, "caption"),
                                 _get(entry, "caption", (str,), where, "caption").strip()))
        elif "question_id" in entry:
            answer = _answer_of(entry, where)
            if answer is None:
                raise DataError(f"{where} has no answer; VQA annotations need {KEYS['answer']}")
            raw.answers[_get(entry, "question_id", ID, where, "answer")] = answer
        else:
            raise DataError(f"{where} is neither a caption ({KEYS['caption']}) nor an answer ({KEYS['answer']})")
    subtype = data.get("data_subtype") if not data.get("images") else None
    for i, entry in enumerate(_entries(data, "questions", path)):
        where = f"{path}: questions[{i}]"
        image_id = _get(entry, "image_id", ID, where, "question")
        fallback = (folder / subtype / f"COCO_{subtype}_{image_id:012d}.jpg").resolve() \
            if isinstance(subtype, str) and isinstance(image_id, int) else None
        raw.questions.append((_get(entry, "question_id", ID, where, "question"), image_id,
                              _get(entry, "question", (str,), where, "question").strip(), fallback,
                              _answer_of(entry, where)))


def load_data(paths: str | Path | Sequence[str | Path]) -> ImageTextData:
    """Read and join the data files `paths` (see the module docstring for what they may hold)."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise DataError("no data files given; give COCO-style caption and/or VQA-style question JSON files")
    raw = _Raw()
    for path in paths:
        _read_into(raw, path)
    return _join(raw, tuple(paths))


def _join(raw: _Raw, sources: tuple[Path, ...]) -> ImageTextData:
    skipped, images, index = Skipped(), [], {}

    def image_index(image_id, fallback=None) -> int | None:
        path = raw.images.get(image_id, fallback)
        if path is None:
            skipped.unknown_image_ids.add(image_id)
            return None
        if path not in index:
            index[path] = len(images) if path.is_file() else None
            if index[path] is None:
                skipped.missing_images.add(path)
            else:
                images.append(path)
        return index[path]

    captions = []
    for image_id, text in raw.captions:
        image = image_index(image_id)
        if image is None:
            skipped.captions += 1
        else:
            captions.append(CaptionExample(image, text))
    questions = []
    for question_id, image_id, text, fallback, inline in raw.questions:
        answer = raw.answers.get(question_id, inline)
        image = image_index(image_id, fallback)
        if answer is None or image is None:
            skipped.questions += 1
            skipped.unanswered += answer is None
        else:
            questions.append(QuestionExample(image, text, answer[0], answer[1], question_id))
    data = ImageTextData(images, captions, questions, skipped, sources)
    check_not_empty(data, n_answers=len(raw.answers))
    return data


def check_not_empty(data: ImageTextData, n_answers: int = 0) -> None:
    if data.captions or data.questions:
        return
    files = ", ".join(map(str, data.sources))
    why = data.skipped.summary() or "the files hold no caption annotations and no questions"
    hint = f" ({n_answers} answer annotations but no questions: give the questions file too)" \
        if n_answers and not data.skipped.questions else ""
    raise DataError(f"no usable examples in {files}: {why}{hint}")


# -- images ----------------------------------------------------------------------------------------


class ImageStore:
    """Every image of a data set decoded once and resized to the model's size, kept as uint8.

    Decoding and resizing go through the runtime's own `load_image` and `resize_and_crop`, and
    `pixels()` through its `preprocess`, so training sees the very pixels a bundle will see.
    Memory: height x width x 3 bytes per image (12 KB at 64 px, 150 KB at 224 px).
    """

    def __init__(self, paths: Sequence[Path], preprocess, progress: Callable[[int, int], None] | None = None):
        from ..runtime.image import load_image
        from ..runtime.preprocess import resize_and_crop

        crops, self.unreadable = [], {}
        for i, path in enumerate(paths):
            try:
                crops.append(resize_and_crop(load_image(path), preprocess))
            except InputError as exc:
                self.unreadable[i] = str(exc)
                crops.append(None)
            if progress is not None:
                progress(i + 1, len(paths))
        shape = next((c.shape for c in crops if c is not None), None)
        self.array = np.zeros((len(crops), *(shape or (1, 1, 3))), np.uint8)
        for i, crop in enumerate(crops):
            if crop is not None:
                self.array[i] = crop
        height, width = self.array.shape[1:3]
        self._exact = replace(preprocess, size=(height, width), resize_mode="exact", crop_size=None)

    def pixels(self, indices: Sequence[int]) -> np.ndarray:
        """float32 (len(indices), 3, H, W) (or NHWC, as the preprocessing says): the model's input."""
        from ..runtime.preprocess import preprocess

        return preprocess([self.array[i] for i in indices], self._exact)
