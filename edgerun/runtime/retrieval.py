"""Retrieval from a bundle: image and text embeddings, and image-text matching (ITM) scores.

The bundle's "retrieval" task names its modules, and each module's `role` says what it does:
- `image_encoder` (optional): pixel_values -> image features that both the embedder and ITM read
  (BLIP's `vision`), so an image is encoded once for both;
- `image_embedder`: pixel_values or the encoder's features -> image_embeds (n, d), L2-normalised;
- `text_embedder`: input_ids, attention_mask -> text_embeds (n, d), L2-normalised;
- `itm` (optional): image features and texts -> itm_probs, the probability that text and image match.
Modules are chained by tensor name: a module reads the outputs of the ones before it.

Texts are tokenised with the bundle's tokenizer (special tokens added as the model was trained),
truncated to the manifest's `max_text_length` with a warning, and padded with its `pad_id` to the
longest text of each batch. Only numpy, onnxruntime and tokenizers are used.
"""
from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import BundleError, InputError, OptionError

IMAGE_BATCH = 16  # images decoded and encoded at a time: memory stays flat for long lists of paths
TEXT_BATCH = 64

ROLES = ("image_encoder", "image_embedder", "text_embedder", "itm")


def retrieval_modules(model) -> dict[str, str]:
    """role -> module name for the bundle's retrieval task; OptionError when it serves none."""
    if "retrieval" not in model.manifest.tasks:
        raise OptionError(f"this bundle does not serve retrieval; it serves: {', '.join(model.tasks)}; "
                          "export a retrieval model (CLIP, BLIP image-text retrieval) with --task retrieval")
    roles: dict[str, str] = {}
    for name in model.manifest.tasks["retrieval"].modules:
        role = model.bundle.module(name).extra.get("role")
        if role in ROLES:
            roles[role] = name
    missing = [r for r in ("image_embedder", "text_embedder") if r not in roles]
    if missing:
        raise BundleError(f"bundle {model.bundle.path}: the retrieval task has no module with role "
                          f"{', '.join(missing)}; roles found: {sorted(roles)}")
    return roles


def _run(model, names: Sequence[str], feeds: dict[str, np.ndarray], timings: dict) -> dict[str, np.ndarray]:
    """Run `names` in order, each fed by name from `feeds` and the outputs of the modules before it."""
    values = dict(feeds)
    for name in names:
        runner = model.runner(name)
        values.update(runner.infer({i.name: values[i.name] for i in runner.inputs}))
        timings[name] = timings.get(name, 0.0) + runner.last_time
    return values


# --- images ------------------------------------------------------------------------------------------


def _pixel_input(model, roles: dict[str, str]):
    first = roles.get("image_encoder", roles["image_embedder"])
    return model.bundle.module(first).inputs[0]


def _check_pixels(model, roles: dict[str, str], pixel_values) -> np.ndarray:
    spec = _pixel_input(model, roles)
    arr = np.asarray(pixel_values)
    if arr.ndim != 4 or arr.dtype != np.float32 or list(arr.shape[1:]) != list(spec.shape[1:]):
        raise InputError(f"pixel_values must be float32 of shape (n, {', '.join(map(str, spec.shape[1:]))}), "
                         f"got {arr.dtype} {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise InputError("pixel_values holds no images (shape[0] is 0)")
    return np.ascontiguousarray(arr)


def _image_batches(model, roles, images, pixel_values, timings: dict) -> Iterable[np.ndarray]:
    """Preprocessed pixel batches of at most IMAGE_BATCH images, loaded as they are needed."""
    if (images is None) == (pixel_values is None):
        raise InputError("give exactly one of images or pixel_values")
    if pixel_values is not None:
        pixels = _check_pixels(model, roles, pixel_values)
        for start in range(0, len(pixels), IMAGE_BATCH):
            yield pixels[start:start + IMAGE_BATCH]
        return
    if isinstance(images, (str, Path, bytes, bytearray)) or (isinstance(images, np.ndarray) and images.ndim < 4):
        raise InputError("images must be a list of images (paths, bytes or RGB arrays); wrap a single image "
                         "in a list")
    it = iter(images)
    while chunk := list(itertools.islice(it, IMAGE_BATCH)):
        start = time.perf_counter()
        pixels = model.pixel_values(chunk)
        timings["preprocess"] = timings.get("preprocess", 0.0) + time.perf_counter() - start
        yield pixels


def embed_images(model, images=None, *, pixel_values=None) -> np.ndarray:
    """Images (paths, bytes or RGB arrays) or pixel_values (n, 3, H, W) -> (n, d) float32, L2-normalised."""
    roles = retrieval_modules(model)
    chain = [roles[r] for r in ("image_encoder", "image_embedder") if r in roles]
    timings: dict[str, float] = {}
    out = [_run(model, chain, {_pixel_input(model, roles).name: pixels}, timings)["image_embeds"]
           for pixels in _image_batches(model, roles, images, pixel_values, timings)]
    if not out:
        raise InputError("embed_images needs at least one image, got an empty list")
    model.last_timings = timings
    return np.concatenate(out).astype(np.float32, copy=False)


# --- texts -------------------------------------------------------------------------------------------


def _check_texts(texts, what: str) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise InputError(f"{what} takes a list of strings; wrap a single text in a list")
    texts = list(texts)
    if not texts:
        raise InputError(f"{what} needs at least one text, got an empty list")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputError(f"{what}: every text must be a str; text {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts


def _truncate(tokenizer, text: str, ids: list[int], limit: int) -> list[int]:
    """Cut the words, not the special tokens: [CLS] words [SEP] keeps [SEP], as HF's truncation does."""
    words = tokenizer.encode(text, add_special_tokens=False)
    n_special = len(ids) - len(words)
    for lead in range(max(0, n_special) + 1):
        if ids[lead:lead + len(words)] == words:
            return ids[:lead] + words[:max(0, limit - n_special)] + ids[lead + len(words):]
    return ids[:limit - 1] + ids[-1:]  # an unusual template: keep the last token, which ends the text


def encode_texts(model, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text, special tokens added, at most the model's `max_text_length` long."""
    limit = model.manifest.model.get("max_text_length")
    out, cut = [], []
    for i, text in enumerate(texts):
        ids = model.tokenizer.encode(text)
        if limit and len(ids) > limit:
            cut.append((i, len(ids)))
            ids = _truncate(model.tokenizer, text, ids, limit)
        out.append(ids)
    if cut:
        i, n = cut[0]
        warnings.warn(f"{len(cut)} text(s) longer than the model's {limit} tokens were truncated "
                      f"(text {i} has {n} tokens)", stacklevel=4)
    return out


def _pad_id(model) -> int:
    pad = model.manifest.model.get("pad_id", model.manifest.decoding.get("pad_id"))
    return 0 if pad is None else int(pad)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest row -> input_ids, attention_mask, both int64 (n, longest)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def _text_batches(model, ids: list[list[int]]):
    """(positions, input_ids, attention_mask) for batches of similar lengths, so little is padding."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = _pad_id(model)
    for start in range(0, len(order), TEXT_BATCH):
        picked = order[start:start + TEXT_BATCH]
        yield (picked, *pad_batch([ids[i] for i in picked], pad))


def embed_texts(model, texts: Sequence[str]) -> np.ndarray:
    """Texts -> (n, d) float32, L2-normalised."""
    roles = retrieval_modules(model)
    texts = _check_texts(texts, "embed_texts")
    ids = encode_texts(model, texts)
    out = None
    timings: dict[str, float] = {}
    for picked, input_ids, mask in _text_batches(model, ids):
        got = _run(model, [roles["text_embedder"]], {"input_ids": input_ids, "attention_mask": mask},
                   timings)["text_embeds"]
        if out is None:
            out = np.empty((len(texts), got.shape[1]), np.float32)
        out[picked] = got
    model.last_timings = timings
    return out


# --- image-text matching -------------------------------------------------------------------------------


def itm_scores(model, image=None, texts: Sequence[str] = (), *, pixel_values=None) -> np.ndarray:
    """Probability that each text matches one image (a path, bytes, RGB array, or pixel_values of
    shape (1, 3, H, W)) -> (n_texts,) float32. For re-ranking the best few of an embedding search."""
    roles = retrieval_modules(model)
    if "itm" not in roles:
        raise OptionError(f"this bundle ({model.manifest.model.get('architecture', 'retrieval model')}) has no "
                          "image-text matching head; rank by the cosine of embed_images and embed_texts, or "
                          "export BlipForImageTextRetrieval for itm_scores")
    if (image is None) == (pixel_values is None):
        raise InputError("give exactly one of image or pixel_values")
    texts = _check_texts(texts, "itm_scores")
    if pixel_values is not None:
        pixels = _check_pixels(model, roles, pixel_values)
        if pixels.shape[0] != 1:
            raise InputError(f"itm_scores takes one image; pixel_values holds {pixels.shape[0]}")
    else:
        if isinstance(image, (list, tuple)):
            raise InputError("itm_scores takes one image, not a list")
        pixels = model.pixel_values([image])
    timings: dict[str, float] = {}
    encoder = [roles["image_encoder"]] if "image_encoder" in roles else []
    features = _run(model, encoder, {_pixel_input(model, roles).name: pixels}, timings)
    out = np.empty(len(texts), np.float32)
    for picked, input_ids, mask in _text_batches(model, encode_texts(model, texts)):
        feeds = {**features, "input_ids": input_ids, "attention_mask": mask}
        out[picked] = _run(model, [roles["itm"]], feeds, timings)["itm_probs"]
    model.last_timings = timings
    return out
