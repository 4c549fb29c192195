"""`edgerun.load(BUNDLE)`: the model object users call, built from the manifest alone.

Each task runs the modules its manifest entry lists, in order, each fed by tensor name from the
outputs of the ones before it; modules are told apart by `extra["role"]` (image_encoder, cross_kv,
question_encoder, decoder, answer_classifier, ...), not by name, so one bundle may hold several
heads. The image encoder's outputs are an `ImageState` (edgerun.runtime.state): `encode()` makes
one that caption, answer and embed_images take as `state=`. Decoders run through
`kvcache.make_inference`, by their cache type (transformer K/V, or a recurrent state).
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import open_bundle
from ..errors import InputError, OptionError
from .decoding import DecodingOptions, decode
from .image import load_image
from .kvcache import CROSS_INPUTS, make_inference
from .onnxrt import OnnxRuntimeRunner
from .preprocess import PreprocessConfig, preprocess
from .state import ImageState, check_state, encode_pixels, encoder_module, run_modules, task_chain
from .tokenizer import Tokenizer
from .variants import check_requirements, select_decoder, select_module


@dataclass(frozen=True)
class Caption:
    text: str
    token_ids: list[int]  # as generate() returns the sequence, prompt included, padding removed
    score: float  # generate()'s sequence score (length penalty applied); greedy: sum of log-probs


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]
    score: float


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(DecodingOptions))


class Model:
    """A loaded bundle. Sessions are created on first use, one per module, and reused."""

    def __init__(self, path: str | Path, *, backend: str = "cpu", threads: int | None = None,
                 verify: str = "cached"):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise OptionError(f"threads must be a positive integer or None (all cores), got {threads!r}")
        self.bundle = open_bundle(path, verify=verify)
        self.manifest = self.bundle.manifest
        self.backend = backend
        self.threads = threads
        self.preprocess_config = PreprocessConfig.from_dict(self.manifest.preprocess)
        self.tokenizer = Tokenizer(self.bundle.file(self.manifest.tokenizer["file"]))
        self._runners: dict[str, OnnxRuntimeRunner] = {}
        self.last_timings: dict[str, float] = {}
        if backend not in ("cpu", "cuda", "ort-trt", "tensorrt"):
            raise OptionError(f"unknown backend {backend!r}; valid: cpu, cuda, ort-trt, tensorrt")
        if backend == "tensorrt":
            from .trtapi import import_tensorrt

            import_tensorrt()  # fails now, naming the extra, rather than at the first call
        elif backend != "cpu":
            from .iobinding import check_backend

            check_backend(backend)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.manifest.tasks)

    @property
    def identity(self) -> dict:
        """What makes two bundles the same model: the source checkpoint's weights. A quantized or
        FP16 twin of a bundle keeps its provenance, so it has the same identity."""
        p = self.manifest.provenance
        return {k: p.get(k) for k in ("source", "revision", "architecture", "weights_sha256")}

    # -- retrieval (edgerun.runtime.retrieval) -------------------------------------------------

    def embed_images(self, images: Sequence | None = None, *, pixel_values=None,
                     state: ImageState | None = None) -> np.ndarray:
        """Images (paths, bytes or RGB arrays), `pixel_values` (n, 3, H, W) or an encoded `state`
        -> (n, d) float32, L2-normalised."""
        from .retrieval import embed_images, retrieval_modules

        if state is None:
            return embed_images(self, _no_state(images), pixel_values=pixel_values)
        if images is not None or pixel_values is not None:
            raise InputError("give exactly one of images or pixel_values (or state= from encode())")
        roles = retrieval_modules(self)
        state, timings = check_state(self, state, "retrieval"), {}
        values = run_modules(self, [roles["image_embedder"]], dict(state.values), timings)
        self.last_timings = timings
        return values["image_embeds"].astype(np.float32, copy=False)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (n, d) float32, L2-normalised."""
        from .retrieval import embed_texts

        return embed_texts(self, texts)

    def itm_scores(self, image=None, texts: Sequence[str] = (), *, pixel_values=None) -> np.ndarray:
        """Image-text matching probabilities (n_texts,) for one image, where the bundle has an ITM head."""
        from .retrieval import itm_scores

        return itm_scores(self, image, texts, pixel_values=pixel_values)

    def warm(self, tasks: Sequence[str] | None = None, *, batch: int = 1, **options) -> None:
        """Create the sessions of `tasks` (default: every task) now rather than on first use, several
        at once: loading weights and prepacking them is mostly single-threaded work. A decoder's
        session is the one `batch` images decode with under the decoding `options` (the bundle's
        defaults overridden, as caption() takes them): its variant for that call where it has one."""
        from concurrent.futures import ThreadPoolExecutor

        from .onnxrt import default_threads

        names = list(dict.fromkeys(m for t in (tasks or self.tasks) for m in self.manifest.tasks[self._require(t)].modules))
        beams = self._options(1, None, options).num_beams
        keys = {n: (self.decoder_variant(n, batch, beams) if "cache" in self.bundle.module(n).extra else n)
                for n in names}
        todo = [n for n in names if keys[n] not in self._runners]
        if len(todo) <= 1:
            for name in todo:
                self._runners[keys[name]] = self._new_runner(name, keys[name])
            return
        todo.sort(key=self.bundle.module_bytes, reverse=True)  # the longest loads start first
        with ThreadPoolExecutor(min(len(todo), default_threads())) as pool:
            made = dict(zip([keys[n] for n in todo], pool.map(lambda n: self._new_runner(n, keys[n]), todo)))
        self._runners.update(made)

    def runner(self, module: str, *, batch: int | None = None, beams: int | None = None) -> OnnxRuntimeRunner:
        """The session of `module`, in the variant made for this backend (e.g. `vision@tensorrt`);
        for a decoder given `batch` and `beams`, in the variant made for exactly that call where
        the bundle has one (`variants.select_decoder`). A module's variants are separate sessions."""
        key = self.decoder_variant(module, batch, beams) if batch is not None else module
        if key not in self._runners:
            self._runners[key] = self._new_runner(module, key)
        return self._runners[key]

    def decoder_variant(self, module: str, batch: int, beams: int) -> str:
        """The module name (`module` or a variant made for the call) that decodes `batch` images x
        `beams` beams on this backend."""
        if self.backend == "tensorrt":
            return module
        name, spec = select_decoder(self.manifest, module, self.backend, batch, beams)
        return name if spec.extra.get("when") else module

    def _new_runner(self, module: str, variant: str | None = None):
        """backend tensorrt: the module's engine (edgerun.runtime.trt); cuda and ort-trt: IO binding
        on the device (edgerun.runtime.iobinding); cpu: a plain session. `variant`: a variant of
        `module` made for some calls only (`decoder_variant`)."""
        if self.backend == "tensorrt":
            from .trt import engine_runner

            return engine_runner(self.bundle, module)
        if variant is not None and variant != module:
            name, spec = variant, self.manifest.modules[variant]
        else:
            name, spec = select_module(self.manifest, module, self.backend)
        check_requirements(name, spec)
        if self.backend == "cpu":
            return OnnxRuntimeRunner(self.bundle.file(spec.file), backend="cpu", threads=self.threads)
        from .iobinding import IOBindingRunner, ort_trt_options

        options = {"TensorrtExecutionProvider": ort_trt_options(self.bundle, name, spec)} \
            if self.backend == "ort-trt" else None
        return IOBindingRunner(self.bundle.file(spec.file), backend=self.backend, threads=self.threads,
                               provider_options=options)

    # -- options -------------------------------------------------------------------------------

    def decoding_options(self, prompt_len: int, **overrides) -> DecodingOptions:
        """Bundle defaults (HF generation config) overridden by keyword options; misspelt ones raise."""
        return self._options(prompt_len, self.manifest.model.get("max_positions"), overrides)

    def _decoder_limit(self, decoder: str) -> int | None:
        cache = self.bundle.module(decoder).extra.get("cache", {})
        return cache.get("max_positions") or self.manifest.model.get("max_positions")

    def _options(self, prompt_len: int, limit: int | None, overrides: dict) -> DecodingOptions:
        """Options for a decoder of `limit` positions. Without max_new_tokens from the user or the
        bundle, the default (20) shrinks to what the decoder holds."""
        unknown = sorted(set(overrides) - set(_OPTION_NAMES))
        if unknown:
            raise OptionError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(_OPTION_NAMES)}")
        gen = dict(self.manifest.decoding.get("generation", {}))
        base = {k: gen[k] for k in _OPTION_NAMES if k in gen}
        if "max_new_tokens" not in base and "max_length" in gen:
            base["max_new_tokens"] = max(1, gen["max_length"] - prompt_len)
        if "min_new_tokens" not in base and gen.get("min_length"):
            base["min_new_tokens"] = max(0, gen["min_length"] - prompt_len)
        base.update({k: v for k, v in overrides.items() if v is not None})
        if "max_new_tokens" not in base and limit:
            base["max_new_tokens"] = max(1, min(DecodingOptions.max_new_tokens, limit - prompt_len))
        if "min_new_tokens" in base and "max_new_tokens" in base and "min_new_tokens" not in overrides:
            base["min_new_tokens"] = min(base["min_new_tokens"], base["max_new_tokens"])
        options = DecodingOptions(**base)
        if limit and prompt_len + options.max_new_tokens > limit:
            raise OptionError(f"prompt ({prompt_len} tokens) + max_new_tokens ({options.max_new_tokens}) "
                              f"exceeds the model's {limit} positions")
        return options

    # -- images --------------------------------------------------------------------------------

    def pixel_values(self, images: Sequence) -> np.ndarray:
        """Images (paths, bytes or arrays, RGB) -> preprocessed (n, 3, H, W) float32."""
        return preprocess([load_image(im) for im in images], self.preprocess_config)

    def _check_pixels(self, pixel_values, task: str) -> np.ndarray:
        """pixel_values as the task's first module (the image encoder) takes them."""
        arr = np.asarray(pixel_values)
        want = self.bundle.module(self.manifest.tasks[self._require(task)].modules[0]).inputs[0].shape
        if arr.ndim != 4 or arr.dtype != np.float32 or list(arr.shape[1:]) != list(want[1:]):
            raise InputError(f"pixel_values must be float32 of shape (n, {', '.join(map(str, want[1:]))}), "
                             f"got {arr.dtype} {list(arr.shape)}")
        return np.ascontiguousarray(arr)

    def _require(self, task: str) -> str:
        if task not in self.manifest.tasks:
            raise OptionError(f"this bundle does not serve {task}; it serves: {', '.join(self.tasks)}")
        return task

    # -- encode once (edgerun.runtime.state) -----------------------------------------------------

    def encode(self, images=None, *, pixel_values=None, task: str | None = None) -> ImageState:
        """Run the image encoder once on an image (path, bytes, HxWx3 RGB array), a list of them, or
        `pixel_values` (n, 3, H, W). Pass the result as `state=` to caption, caption_batch, answer,
        answer_batch and embed_images, which then skip preprocessing and the encoder and give what
        they give for the images. Another model refuses the state. `task` picks the encoder where
        the bundle's tasks use different ones."""
        if task is not None:
            self._require(task)
        if isinstance(images, (str, Path, bytes, bytearray, np.ndarray)) and np.ndim(images) < 4:
            images = [images]  # one image
        timings: dict[str, float] = {}
        state = self._state(task or self._tasks_with(encoder_module(self, task))[0], images, pixel_values,
                            None, timings)
        self.last_timings = timings
        return state

    def _tasks_with(self, encoder: str | None) -> list[str]:
        return [t for t in self.tasks if encoder_module(self, t) == encoder]

    def _state(self, task: str, images, pixel_values, state, timings: dict,
               noun: str = "images") -> ImageState:
        """The task's image state: `state` checked, or the images / pixel_values encoded."""
        self._require(task)
        if sum(x is not None for x in (images, pixel_values, state)) != 1:
            raise InputError(f"give exactly one of {noun} or pixel_values (or state= from encode())")
        if state is not None:
            return check_state(self, state, task)
        if pixel_values is not None:
            pixels = self._check_pixels(pixel_values, task)
        else:
            if isinstance(images, (str, Path, bytes, np.ndarray)) or len(images) == 0:
                raise InputError("give a non-empty list of images")
            start = time.perf_counter()
            pixels = self.pixel_values(_no_state(images))
            timings["preprocess"] = time.perf_counter() - start
        return encode_pixels(self, pixels, encoder_module(self, task), timings)

    # -- captioning ----------------------------------------------------------------------------

    def caption(self, image=None, *, pixel_values=None, state: ImageState | None = None,
                prompt: str | None = None, **options):
        """Caption one image (path, bytes, HxWx3 RGB array), one preprocessed `pixel_values`
        (1, 3, H, W) or one encoded `state`. Returns a Caption, or a list of them when
        num_return_sequences > 1."""
        if sum(x is not None for x in (image, pixel_values, state)) != 1:
            raise InputError("give exactly one of image or pixel_values (or state= from encode())")
        images = None if image is None else [image]
        return self._caption(images, pixel_values, state, prompt, options, one="caption")[0]

    def caption_batch(self, images: Sequence | None = None, *, pixel_values=None,
                      state: ImageState | None = None, prompt: str | None = None, **options) -> list:
        """One entry per image (or per row of `pixel_values`, (n, 3, H, W), or per image of `state`):
        a Caption, or a list of them when num_return_sequences > 1."""
        if images is not None and (isinstance(images, (str, Path, bytes, np.ndarray)) or len(images) == 0):
            raise InputError("caption_batch() takes a non-empty list of images")
        return self._caption(images, pixel_values, state, prompt, options)

    def _caption(self, images, pixel_values, state, prompt, options: dict, one: str | None = None) -> list:
        self._require("caption")
        _, middle, decoder = task_chain(self, "caption")
        prompt_ids = self._prompt_ids(prompt)
        opts = self._options(len(prompt_ids), self._decoder_limit(decoder), options)
        timings: dict = {"preprocess": 0.0}
        state = self._state("caption", images, pixel_values, state, timings)
        _check_one(state, one)
        values, spare = self._padded(decoder, middle, dict(state.values), state.count, opts.num_beams,
                                     len(prompt_ids))
        values = run_modules(self, middle, values, timings)
        hyps = self._decode(decoder, values, np.array([prompt_ids] * state.count), opts, timings, spare)
        self.last_timings = timings
        return [self._results(h, opts, Caption) for h in hyps]

    def _prompt_ids(self, prompt: str | None) -> list[int]:
        ids = list(self.manifest.decoding["decoder_start_ids"])
        if prompt:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
            add = self.manifest.decoding.get("prompt_add_special_tokens", False)
            ids += self.tokenizer.encode(prompt, add_special_tokens=add)
        return ids

    def _padded(self, decoder: str, middle: Sequence[str], values: dict, batch: int, beams: int,
                new: int) -> tuple[dict, int]:
        """(values, spare): where the decoder session for this call reads its cross K/V with spare
        slots after the keys (edgerun.export.beam_heads) and the modules before it make them row by
        row (the variant's `pad`: their input) and take any number of rows, that input with `new`
        zero rows appended, so that the K/V come out with their spare slots; else `values` as
        given and 0 (the decoder's inference then copies the K/V into buffers with the slots)."""
        names = {i.name for i in self.runner(decoder, batch=batch, beams=beams).inputs}
        pad = self.bundle.module(self.decoder_variant(decoder, batch, beams)).extra.get("pad")
        rows = values.get(pad)
        if CROSS_INPUTS[0] not in names or rows is None or rows.ndim != 3:
            return values, 0
        readers = [i for m in middle for i in self.runner(m).inputs if i.name == pad]
        if not readers or any(isinstance(i.shape[1], int) for i in readers):
            return values, 0
        values[pad] = np.concatenate([rows, np.zeros((rows.shape[0], new, rows.shape[2]), rows.dtype)], axis=1)
        return values, new

    def _decode(self, decoder_name: str, values: dict, prompt_ids: np.ndarray, opts: DecodingOptions,
                timings: dict, spare: int = 0):
        """Beam search with the decoder module `decoder_name`, fed from `values` (what the modules
        before it produced: cross K/V, masks, an initial recurrent state). `spare`: slots after the
        keys of the cross K/V in `values` (`_padded`)."""
        batch = prompt_ids.shape[0]
        decoder = self.runner(decoder_name, batch=batch, beams=opts.num_beams)
        cache = self.bundle.module(decoder_name).extra["cache"]
        inference = _TimedInference(make_inference(decoder, values, batch, opts.num_beams,
                                                   prompt_ids.shape[1] + opts.max_new_tokens, cache, spare))
        start = time.perf_counter()
        d = self.manifest.decoding
        hyps = decode(inference, prompt_ids, opts, stop_ids=d["stop_ids"], pad_id=d.get("pad_id"))
        steps = inference.step_times
        timings["decode"] = time.perf_counter() - start
        timings["decoder"] = sum(steps)  # time inside the decoder graph
        timings["decoder_calls"] = len(steps)
        timings["decoder_first"] = steps[0]
        timings["decoder_per_token"] = sum(steps[1:]) / (len(steps) - 1) if len(steps) > 1 else 0.0
        timings["kv_cache"] = inference.spent - timings["decoder"]  # feeding the cache, storing, reordering
        timings["beam_bookkeeping"] = timings["decode"] - inference.spent  # choosing the tokens
        return hyps

    # -- visual question answering -------------------------------------------------------------

    def answer(self, image=None, question: str | None = None, *, pixel_values=None,
               state: ImageState | None = None, **options):
        """Answer `question` about one image (path, bytes, HxWx3 RGB array), one `pixel_values`
        (1, 3, H, W) or one encoded `state`. Returns an Answer, or a list of them when
        num_return_sequences > 1. A classifier bundle's Answer.score is the answer's probability."""
        if sum(x is not None for x in (image, pixel_values, state)) != 1:
            raise InputError("give exactly one of image or pixel_values (or state= from encode())")
        if pixel_values is not None and np.asarray(pixel_values).shape[:1] != (1,):
            raise InputError("answer() takes a batch of 1; use answer_batch() for more")
        images = None if image is None else [image]
        return self._answer(images, [question], pixel_values, state, options, one="answer")[0]

    def answer_batch(self, images: Sequence | None = None, questions: Sequence[str] = (), *, pixel_values=None,
                     state: ImageState | None = None, **options) -> list:
        """One answer per (image, question) pair; questions of different lengths are padded and the
        padding is masked everywhere, so each answer is the one its question gets alone."""
        if images is not None and (isinstance(images, (str, Path, bytes, np.ndarray)) or len(images) == 0):
            raise InputError("answer_batch() takes a non-empty list of images")
        return self._answer(images, questions, pixel_values, state, options)

    def _answer(self, images, questions, pixel_values, state, options: dict, one: str | None = None) -> list:
        self._require("vqa")
        _, middle, last = task_chain(self, "vqa")
        classifier = self.bundle.module(last).extra.get("role") == "answer_classifier"
        opts = None if classifier else self._options(1, self._decoder_limit(last), options)
        timings: dict = {"preprocess": 0.0}
        state = self._state("vqa", images, pixel_values, state, timings)
        _check_one(state, one)
        if isinstance(questions, str) or len(questions) != state.count:
            raise InputError(f"give one question per image: {state.count} image(s), "
                             f"{1 if isinstance(questions, str) else len(questions)} question(s)")
        ids, mask = self._question_ids(questions)
        values = {**state.values, "input_ids": ids, "attention_mask": mask}
        values = run_modules(self, middle, values, timings)
        if classifier:
            from .answers import classify

            return classify(self, last, values, options, timings)
        values.setdefault("cross_attention_mask", mask)  # BLIP: the question's own padding mask
        prompt = np.array([self.manifest.decoding["decoder_start_ids"]] * state.count, dtype=np.int64)
        hyps = self._decode(last, values, prompt, opts, timings)
        self.last_timings = timings
        return [self._results(h, opts, Answer) for h in hyps]

    def _question_ids(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids with the tokenizer's special tokens, truncated at the model's positions (with a
        warning), right-padded to the longest; returns ids and attention mask, both (n, T) int64."""
        model = self.manifest.model
        limit = model.get("max_text_length") or model.get("max_positions") or 512
        rows = []
        for q in questions:
            if not isinstance(q, str):
                raise InputError(f"a question must be a string, got {type(q).__name__}")
            ids = self.tokenizer.encode(q, add_special_tokens=True)
            if len(ids) > limit:
                warnings.warn(f"question of {len(ids)} tokens truncated to the model's {limit}", stacklevel=3)
                ids = ids[:limit - 1] + ids[-1:]  # keep the closing special token ([SEP])
            rows.append(ids)
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.manifest.decoding.get("pad_id") or 0, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask

    def _results(self, hyps, opts: DecodingOptions, cls):
        out = [cls(self.tokenizer.decode(h.token_ids), list(h.token_ids), float(h.score)) for h in hyps]
        return out if opts.num_return_sequences > 1 else out[0]


def _no_state(images):
    """Images as given, after refusing an ImageState where images belong."""
    if isinstance(images, ImageState) or (isinstance(images, (list, tuple)) and
                                          any(isinstance(i, ImageState) for i in images)):
        raise InputError("an ImageState goes in as state=, e.g. model.caption(state=model.encode(image))")
    return images


def _check_one(state: ImageState, method: str | None) -> None:
    if method is not None and state.count != 1:
        raise InputError(f"{method}() takes a batch of 1; got {state.count} images: "
                         f"use {method}_batch() for more")


def load(bundle: str | Path, backend: str = "cpu", threads: int | None = None, *, verify: str = "cached") -> Model:
    """Open a bundle for inference. `threads=None` uses every core this process may run on."""
    return Model(bundle, backend=backend, threads=threads, verify=verify)


class _TimedInference:
    """An `Inference` that adds up the time spent in it, graph calls and cache upkeep together, so
    that what decoding spends choosing tokens (beam bookkeeping) is told apart from what the cache
    costs around the graph (the KV cache's stores, row map and reorders)."""

    def __init__(self, inner):
        self.inner, self.spent = inner, 0.0

    @property
    def step_times(self) -> list[float]:
        return self.inner.step_times

    def logits(self, tokens):
        start = time.perf_counter()
        try:
            return self.inner.logits(tokens)
        finally:
            self.spent += time.perf_counter() - start

    def rearrange_kv_cache(self, source_indices) -> None:
        start = time.perf_counter()
        try:
            self.inner.rearrange_kv_cache(source_indices)
        finally:
            self.spent += time.perf_counter() - start

    def cleanup_caching(self) -> None:
        self.inner.cleanup_caching()
