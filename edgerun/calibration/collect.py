"""Collect activation statistics by running the float bundle on the calibration images.

Every module is opened as an augmented copy of its graph that also outputs the activations its
linear layers read. The bundle then runs as it does at run time (`edgerun.load` with each
module's runner replaced), so every module after the first sees exactly the inputs the runtime
gives it: cross-attention K/V from the image features, the decoder's steps with their cache, the
question encoder's and text embedder's token ids. Each runner folds one batch at a time into
streaming histograms (edgerun.calibration.stats) and keeps nothing else, but for a few feeds per
module (`probes`) that the sensitivity pass replays.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..runtime.model import Model
from ..runtime.onnxrt import OnnxRuntimeRunner, session_options
from .stats import TensorStats

# Texts for the modules that read text (text embedders, question encoders) when no --texts are given.
TEXTS = (
    "a photo of a dog", "a man riding a bike down the street", "two cats sleeping on a couch",
    "a plate of food on a wooden table", "a city street at night with cars", "a red car parked near a tree",
    "a woman standing next to a window", "a group of people on the beach", "a bowl of fruit",
    "an airplane flying in a blue sky", "a small boat on the water", "a child playing in the grass",
    "a close up of a flower", "a train at the station", "a laptop on a desk", "a building with many windows",
)
QUESTIONS = (
    "what is in the picture?", "what color is it?", "how many people are there?", "is it indoors?",
    "what is the man doing?", "where is this?", "what animal is this?", "is there a car?",
)
DECODE_TOKENS = 20  # new tokens per calibration caption/answer whose decoder steps are collected
ACTIVATION_BUDGET = 256 << 20  # bytes of collected activations per batch when the batch size is automatic


def augment(src: Path, tensors: Sequence[str]) -> bytes:
    """The ONNX model `src`, made to also output `tensors`, serialised without its weights: its
    external data stays where it is and is read from `src`'s folder (see `session`)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    have = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def session(model: bytes, data_dir: Path, threads: int | None, *, lean: bool = True):
    """An onnxruntime CPU session of a serialised model whose external data lies in `data_dir`.
    `lean`: no memory arena and no prepacked weight copies (large outputs, sessions used briefly)."""
    import onnxruntime as ort

    so = session_options(threads)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
    if lean:
        so.enable_cpu_mem_arena = False
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


class StatsRunner:
    """A module's augmented graph behind the runner interface: `infer` returns the module's own
    outputs and, while `enabled`, folds the extra outputs into `stats` (tensor -> TensorStats)."""

    def __init__(self, path: Path, outputs: Sequence[str], tensors: Sequence[str], threads: int | None,
                 probes: int = 2, means: Sequence[str] = ()):
        self.path = path
        self.session = session(augment(path, tensors), path.parent, threads)
        self.inputs = [OnnxRuntimeRunner._spec(i) for i in self.session.get_inputs()]
        by_name = {o.name: OnnxRuntimeRunner._spec(o) for o in self.session.get_outputs()}
        self.outputs = [by_name[n] for n in outputs]
        self._own = list(outputs)
        self._extra = [t for t in dict.fromkeys(tensors) if t not in self._own]
        self._watched = list(dict.fromkeys(tensors))
        self.stats = {t: TensorStats() for t in self._watched}
        self._sums: dict[str, np.ndarray] = {}  # tensor of `means` (N, C, ...) -> per-channel sum, float64
        self._counts = dict.fromkeys(means, 0)
        self.enabled = True
        self.folded_batches = 0
        self.last_bytes = 0  # bytes of activations the last folded call returned
        self.probes: list[dict[str, np.ndarray]] = []
        self._probe_limit = probes
        self.last_time = self.total_time = 0.0
        self.calls = 0

    def check(self, feeds: dict) -> None:
        OnnxRuntimeRunner.check(self, feeds)

    def infer(self, feeds: dict, *, check: bool = True) -> dict:
        if check:
            self.check(feeds)
        start = time.perf_counter()
        names = self._own + self._extra if self.enabled else self._own
        values = dict(zip(names, self.session.run(names, feeds)))
        self.last_time = time.perf_counter() - start
        self.total_time += self.last_time
        self.calls += 1
        if self.enabled:
            if len(self.probes) < self._probe_limit:
                self.probes.append({k: np.array(v) for k, v in feeds.items()})
            self.last_bytes = sum(values[name].nbytes for name in self._watched)
            for name in self._watched:
                self.stats[name].fold(values[name])
            for name in self._counts:
                self._fold_mean(name, values[name])
            self.folded_batches += 1
            for name in self._extra:
                del values[name]
        return values


    def _fold_mean(self, name: str, value: np.ndarray) -> None:
        if value.ndim < 2:
            return
        axes = (0, *range(2, value.ndim))
        total = value.sum(axis=axes, dtype=np.float64)
        self._sums[name] = self._sums.get(name, 0.0) + total
        self._counts[name] += value.size // value.shape[1]

    def channel_means(self) -> dict[str, np.ndarray]:
        """{tensor: per-channel mean (C,)} of the `means` tensors seen (channels on axis 1)."""
        return {name: total / self._counts[name] for name, total in self._sums.items()}


class RunnerModel(Model):
    """A loaded bundle whose module runners come from `make_runner(model, module)` (None: the
    module's own file, as the runtime opens it)."""

    def __init__(self, path, make_runner: Callable, *, threads: int | None = None):
        super().__init__(path, threads=threads)
        self._make_runner = make_runner
        self._own_runners: dict[str, object] = {}

    def runner(self, module: str, *, batch: int | None = None, beams: int | None = None):
        """The module's runner; `batch` and `beams` pick nothing here: the files given serve every call."""
        if module not in self._own_runners:
            made = self._make_runner(self, module)
            if made is None:
                made = OnnxRuntimeRunner(self.bundle.file(self.bundle.module(module).file), threads=self.threads)
            self._own_runners[module] = made
        return self._own_runners[module]


def file_model(bundle: Path, files: Mapping[str, Path], threads: int | None = None) -> RunnerModel:
    """The bundle with some modules' ONNX files replaced (module -> path), e.g. quantized ones."""
    def make(model, module):
        return OnnxRuntimeRunner(files[module], threads=threads) if module in files else None
    return RunnerModel(bundle, make, threads=threads)


def run_tasks(model: Model, pixels: np.ndarray, texts: Sequence[str], questions: Sequence[str],
              options: Mapping, *, embed_texts: bool = True,
              on_task: Callable[[str], None] = lambda task: None) -> dict[str, object]:
    """Run every task of the bundle on a batch of `pixels` (n, 3, H, W) as the runtime would, with
    decoding `options`, and return what each gives: captions and answers as token-id lists,
    retrieval as (image embeddings, text embeddings, ITM probabilities of the first image and the
    texts); the last two only with `embed_texts` (None otherwise, or where there is no ITM head).
    `on_task(task)` is called first."""
    out: dict[str, object] = {}
    n = len(pixels)
    for task in model.manifest.tasks:
        on_task(task)
        if task == "caption":
            out[task] = [c.token_ids for c in model.caption_batch(pixel_values=pixels, **options)]
        elif task == "vqa":
            asked = list(itertools.islice(itertools.cycle(questions), n))
            out[task] = [a.token_ids for a in model.answer_batch(pixel_values=pixels, questions=asked, **options)]
        elif task == "retrieval":
            itm = embed_texts and any(model.bundle.module(m).extra.get("role") == "itm"
                                      for m in model.manifest.tasks[task].modules)
            out[task] = (model.embed_images(pixel_values=pixels),
                         model.embed_texts(list(texts)) if embed_texts else None,
                         model.itm_scores(pixel_values=pixels[:1], texts=list(texts)) if itm else None)
    return out


def decode_tokens(model: Model, wanted: int = DECODE_TOKENS) -> int:
    """`wanted` new tokens, or fewer where a decoder of the bundle holds fewer positions (a
    built-in family's caption decoder may hold 16)."""
    prompt = len((model.manifest.decoding or {}).get("decoder_start_ids") or ()) or 1
    limits = [model._decoder_limit(name) for name, spec in model.manifest.modules.items()
              if "cache" in spec.extra or spec.extra.get("role") == "decoder"]
    return max(1, min([wanted, *(limit - prompt for limit in limits if limit)]))


def greedy(tokens: int) -> dict:
    """Decoding options for calibration runs: greedy, at most `tokens` new tokens."""
    return {"num_beams": 1, "max_new_tokens": tokens, "min_new_tokens": 0, "num_return_sequences": 1}


class Collector:
    """The float bundle with a StatsRunner per calibrated module.

    modules : {module: activation tensors to collect}; decoders : the modules whose steps are
    collected for the first `decoder_samples` images only (each image costs up to DECODE_TOKENS
    decoder steps)."""

    def __init__(self, bundle: Path, modules: Mapping[str, Sequence[str]], *,
                 decoders: Iterable[str] = (), threads: int | None = None, probes: int = 2,
                 means: Mapping[str, Sequence[str]] = {}):
        self.decoders = set(decoders)
        self.runners: dict[str, StatsRunner] = {}
        self.batches = 0

        def make(model, module):
            if module not in modules:
                return None
            spec = model.bundle.module(module)
            runner = StatsRunner(model.bundle.file(spec.file), [o.name for o in spec.outputs], modules[module],
                                 threads, probes, means.get(module, ()))
            self.runners[module] = runner
            return runner

        self.model = RunnerModel(bundle, make, threads=threads)

    def fold_batch(self, pixels: np.ndarray, texts: Sequence[str], questions: Sequence[str],
                   decode: bool) -> None:
        """Run the bundle's tasks on one batch; a module shared by several tasks is folded once.
        Decoders are folded only when `decode`; the texts are embedded then and on the first batch."""
        seen: set[str] = set()

        def enable(task: str) -> None:
            names = self.model.manifest.tasks[task].modules
            for name in names:
                self.model.runner(name)
            for name, runner in self.runners.items():
                runner.enabled = name in names and name not in seen and (decode or name not in self.decoders)
            seen.update(names)

        run_tasks(self.model, pixels, texts, questions, greedy(decode_tokens(self.model) if decode else 1),
                  embed_texts=decode or self.batches == 0, on_task=enable)
        self.batches += 1

    def image_bytes(self, images: int) -> int:
        """Bytes of activations per image that the encoders (not decoders) returned last batch."""
        total = sum(r.last_bytes for n, r in self.runners.items() if n not in self.decoders)
        return total // max(1, images)

    def stats(self) -> dict[str, dict[str, TensorStats]]:
        return {name: r.stats for name, r in self.runners.items()}

    def channel_means(self) -> dict[str, dict[str, np.ndarray]]:
        return {name: r.channel_means() for name, r in self.runners.items()}

    def probes(self) -> dict[str, list[dict[str, np.ndarray]]]:
        return {name: r.probes for name, r in self.runners.items()}

    def close(self) -> None:
        self.runners.clear()
        self.model = None


def auto_batch(bytes_per_image: int, budget: int = ACTIVATION_BUDGET, most: int = 16) -> int:
    """Images per calibration batch so that the collected activations stay within `budget` bytes."""
    return int(max(1, min(most, budget // max(1, bytes_per_image))))
