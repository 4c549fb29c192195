"""The measured side of `edge-run bench`, run in a fresh process per side (see bench.py).

`python -m edgerun.runtime.bench_worker edgerun|torch` reads its spec as JSON on stdin and prints
one JSON line. Only the standard library is imported at the top, so the process's import time is
that of numpy, onnxruntime and the runtime (or, for the torch side, of torch and transformers).
"""
from __future__ import annotations

import json
import sys
import time

from ..errors import EdgeRunError
from .bench import DECODE_PARTS, QUESTIONS, TEXTS, BenchOptions


class _Inputs:
    """The inputs of call i: `batch` images taken in turn from a pool (the files, or synthetic ones)."""

    def __init__(self, files: list[str] | None, batch: int):
        import numpy as np

        def synthetic(seed: int):  # 480x640 blocks of noise: content does not change the work
            block = np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8)
            return block.repeat(8, axis=0).repeat(8, axis=1)

        self.pool = list(files) if files else [synthetic(i) for i in range(batch)]
        self.batch = batch

    def indices(self, call: int) -> list[int]:
        return [(call * self.batch + j) % len(self.pool) for j in range(self.batch)]


class _GenerateJob:
    """caption_batch / answer_batch over one batch per call; stages from Model.last_timings."""

    def __init__(self, model, task: str, options: BenchOptions, inputs: _Inputs):
        self.model, self.task, self.options, self.inputs = model, task, options, inputs
        self.outputs = {"captions": [None] * len(inputs.pool)}
        self.decoder_calls = 0

    def __call__(self, call: int) -> dict[str, float]:
        idx = self.inputs.indices(call)
        images = [self.inputs.pool[k] for k in idx]
        start = time.perf_counter()
        if self.task == "caption":
            results = self.model.caption_batch(images, **self.options.decoding())
        else:
            questions = [QUESTIONS[k % len(QUESTIONS)] for k in idx]
            results = self.model.answer_batch(images, questions, **self.options.decoding())
        total = time.perf_counter() - start
        t = self.model.last_timings  # preprocess, each module by role, decode and its parts
        stages = {k: v for k, v in t.items() if k not in ("decode", "decoder", "decoder_calls")}
        stages["postprocess"] = total - sum(v for k, v in t.items() if k not in DECODE_PARTS)
        stages["end_to_end"] = total
        seen = self.outputs["captions"]
        for k, r in zip(idx, results):
            r = r[0] if isinstance(r, list) else r
            seen[k] = seen[k] or {"text": r.text, "token_ids": r.token_ids}
        self.decoder_calls = t.get("decoder_calls", 0)
        return stages


class _RetrievalJob:
    """embed_images, then embed_texts, over one batch each per call; stages from the runners' times."""

    def __init__(self, model, task: str, options: BenchOptions, inputs: _Inputs):
        self.model, self.options, self.inputs = model, options, inputs
        self.outputs = {"image_embeds": [None] * len(inputs.pool), "text_embeds": [None] * len(TEXTS)}
        self.decoder_calls = 0

    def __call__(self, call: int) -> dict[str, float]:
        idx = self.inputs.indices(call)
        start = time.perf_counter()
        images = self.model.embed_images([self.inputs.pool[k] for k in idx])
        t_images, ti = time.perf_counter() - start, dict(self.model.last_timings)
        start = time.perf_counter()
        texts = self.model.embed_texts([TEXTS[k % len(TEXTS)] for k in idx])
        t_texts, tt = time.perf_counter() - start, dict(self.model.last_timings)
        stages = {"preprocess": ti.pop("preprocess", 0.0), **ti}
        stages["postprocess"] = t_images - sum(stages.values())
        stages.update(tokenize=t_texts - sum(tt.values()), **tt)
        stages.update(embed_images=t_images, embed_texts=t_texts, end_to_end=t_images + t_texts)
        seen_images, seen_texts = self.outputs["image_embeds"], self.outputs["text_embeds"]
        for k, image, text in zip(idx, images, texts):
            seen_images[k] = seen_images[k] or image.tolist()
            seen_texts[k % len(TEXTS)] = seen_texts[k % len(TEXTS)] or text.tolist()
        return stages


def _peak_rss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _timed_calls(job, options: BenchOptions, runners: dict) -> tuple[dict, dict, float]:
    """Per timed call: seconds of each stage, and of each module (its runner's time); and the
    wall clock after the first call."""
    samples: dict[str, list[float]] = {}
    modules: dict[str, list[float]] = {name: [] for name in runners}
    first = 0.0
    for call in range(options.warmup + options.runs):
        before = {name: r.total_time for name, r in runners.items()}
        stages = job(call)
        first = first or time.time()
        if call >= options.warmup:
            for k, v in stages.items():
                samples.setdefault(k, []).append(v)
            for name, r in runners.items():
                modules[name].append(r.total_time - before[name])
    return samples, modules, first


def _result(spec, marks, samples, modules, job, **extra) -> dict:
    start, imported, loaded, first = marks
    cold = {"process_start": start - spec["spawned_at"], "imports": imported - start,
            "load": loaded - imported, "first_result": first - loaded}
    return {"samples": samples, "module_samples": modules, "cold_start": cold,
            "decoder_calls": job.decoder_calls, "outputs": job.outputs, **extra}


def edgerun_worker(spec: dict) -> dict:
    start = time.time()
    import numpy  # noqa: F401  (the runtime's imports, timed together)
    import onnxruntime  # noqa: F401

    from .model import load
    from .roofline import captured_feeds, decoder_modules, feeds_wanted, stage_work

    imported = time.time()
    options, task = BenchOptions(**spec["options"]), spec["task"]
    model = load(spec["bundle"], backend=spec["backend"], threads=options.threads)
    decoders = decoder_modules(model, task)
    call = {"batch": options.batch, "beams": options.num_beams}
    model.warm([task], batch=options.batch, num_beams=options.num_beams)  # several at once (as `edge-run caption` does)
    runners = {n: model.runner(n, **call) for n in model.manifest.tasks[task].modules}
    loaded = time.time()
    job = (_RetrievalJob if task == "retrieval" else _GenerateJob)(model, task, options,
                                                                   _Inputs(spec["images"], options.batch))
    encoders = {k: r for k, r in runners.items() if k not in decoders}
    samples, modules, first = _timed_calls(job, options, encoders)
    rss = _peak_rss_bytes()
    with captured_feeds(model, feeds_wanted(model, task, options.new_tokens), **call) as feeds:
        job(0)  # once more, keeping feeds to count the work of each stage
    return _result(spec, (start, imported, loaded, first), samples, modules, job, peak_rss_bytes=rss,
                   work=stage_work(model, feeds, options.batch, options.threads), path=str(model.bundle.path),
                   disk_bytes=model.bundle.size_bytes(), provenance=model.manifest.provenance)


def _worker_main(kind: str) -> int:
    spec = json.loads(sys.stdin.read())
    try:
        if kind == "torch":  # transformers generate(): torch lives under export/, never in the runtime
            from ..export.bench_torch import torch_worker

            result = torch_worker(spec)
        else:
            result = edgerun_worker(spec)
    except EdgeRunError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
