"""The torch side of `edge-run bench --compare torch`: transformers `generate()` on the same weights.

Run only inside the benchmark's own torch process (`python -m edgerun.runtime.bench_worker torch`);
it lives under export/ because the runtime never imports torch.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..runtime.bench import QUESTIONS, TORCH_STAGES, BenchOptions, _cores
from ..runtime.bench_worker import _Inputs, _peak_rss_bytes, _result, _timed_calls


class _TorchJob:
    """transformers generate() on one batch per call; stages timed by hooks on the model's parts."""

    def __init__(self, model, processor, tokenizer, task: str, options: BenchOptions, inputs: _Inputs,
                 parts: dict):
        from ..runtime.image import load_image

        self.model, self.processor, self.tokenizer = model, processor, tokenizer
        self.task, self.options, self.inputs, self.load_image = task, options, inputs, load_image
        self.outputs = {"captions": [None] * len(inputs.pool)}
        self.decoder_calls = 0
        self.calls: dict[str, list[float]] = {stage: [] for stage in parts}
        for stage, attr in parts.items():
            module, began, took = getattr(model, attr), [], self.calls[stage]
            module.register_forward_pre_hook(lambda *_, b=began: b.append(time.perf_counter()))
            module.register_forward_hook(lambda *_, b=began, t=took: t.append(time.perf_counter() - b.pop()))

    def __call__(self, call: int) -> dict[str, float]:
        import torch

        idx = self.inputs.indices(call)
        for times in self.calls.values():
            times.clear()
        start = time.perf_counter()
        images = [self.load_image(self.inputs.pool[k]) for k in idx]
        feeds = {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}
        if self.task == "vqa":
            questions = [QUESTIONS[k % len(QUESTIONS)] for k in idx]
            enc = self.tokenizer(questions, padding=True, return_tensors="pt")
            feeds.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        t_pre = time.perf_counter() - start
        with torch.inference_mode():
            out = self.model.generate(**feeds, **self.options.decoding())
        t_gen = time.perf_counter() - start - t_pre
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        total = time.perf_counter() - start
        dec = self.calls["decoder"]
        stages = {"preprocess": t_pre, **{k: sum(v) for k, v in self.calls.items() if k != "decoder"},
                  "decoder_first": dec[0], "decoder_per_token": statistics.fmean(dec[1:] or [0.0]),
                  "beam_bookkeeping": t_gen - sum(map(sum, self.calls.values())),
                  "postprocess": total - t_pre - t_gen, "end_to_end": total}
        seen = self.outputs["captions"]
        for k, ids, text in zip(idx, out.tolist(), texts):
            seen[k] = seen[k] or {"text": text.strip(), "token_ids": ids}
        self.decoder_calls = len(dec)
        return stages


def torch_worker(spec: dict) -> dict:
    start = time.time()
    import torch
    import transformers

    imported = time.time()
    options = BenchOptions(**spec["options"])
    torch.set_num_threads(options.threads or _cores())
    folder = spec["folder"]
    model = getattr(transformers, spec["architecture"]).from_pretrained(folder, dtype=torch.float32).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    loaded = time.time()
    inputs = _Inputs(spec["images"], options.batch)
    parts = TORCH_STAGES[spec["architecture"]]
    job = _TorchJob(model, processor, tokenizer, spec["task"], options, inputs, parts)
    samples, modules, first = _timed_calls(job, options, {})
    # the whole checkpoint folder (weights, tokenizer, configs), as a bundle counts all its files
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    prov = {"source": f"hf:{folder}", "architecture": spec["architecture"],
            "libraries": {"torch": torch.__version__, "transformers": transformers.__version__}}
    return _result(spec, (start, imported, loaded, first), samples, modules, job, work={}, path=folder,
                   peak_rss_bytes=_peak_rss_bytes(), disk_bytes=sum(p.stat().st_size for p in files),
                   provenance=prov)


