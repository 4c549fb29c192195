"""`edge-run calibrate`: float bundle + images -> INT8 (or FP16) bundle, accepted on held-out data.

    report = calibrate("blip/", "photos/", "blip-int8/", CalibrationOptions(samples=256))

Stages: statistics (run the float bundle on the calibration images, folding each linear layer's
input into streaming histograms), an optional sensitivity pass, the variant files, the held-out
comparison with the float twin, and the bundle itself, written through `BundleWriter`: a failure
or interruption at any stage, `--max-drop` exceeded included, leaves no output bundle.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import itertools
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import Bundle, BundleWriter, open_bundle
from ..errors import BundleError, EdgeRunError, OptionError, require
from ..export import beam_heads, gqa
from ..manifest import Manifest
from . import accuracy, build, taskeval
from .autosearch import FloatSearch
from .blockwise import decoder_scheme
from .collect import QUESTIONS, TEXTS, Collector, auto_batch, file_model
from .decoder import DECODER_SCHEMES
from .nodes import parse_patterns
from .sensitivity import LayerError, module_sensitivity
from .sources import FolderSource, open_source
from .stats import CANDIDATES, METHODS, Range, choose, tensor_range

SENSITIVITY_FEEDS = 2  # recorded module feeds (calibration batches) the sensitivity pass replays
GPTQ_FEEDS = 6  # ... and gptq.py's input moments read (the first batch is one image, the others up to 16)
EVAL_BATCH = 8  # at most; a model whose activations fill a calibration batch with one image gets 1


class AccuracyDropError(EdgeRunError):
    """A quantized bundle lost more than `--max-drop` against its float twin; nothing was written."""


VARIANTS = ("cpu", "tensorrt")  # the INT8 variants calibrate can write (build.py)


@dataclass(frozen=True)
class CalibrationOptions:
    """What `calibrate` does; checked once here. Overrides go through `dataclasses.replace`."""

    method: str = "auto"  # activations: auto (per tensor: least error, stats.choose), minmax, entropy, percentile
    percentile: float = 99.99
    samples: int = 128
    augment: bool = False  # a folder with fewer than `samples` images: top it up with crops and flips
    seed: int = 0
    per_channel: bool = True  # weights: one scale per output channel
    gptq: bool = True  # convolutions' int8 weights rounded against their inputs' error (gptq.py)
    bias_correction: bool = True  # add back the mean output shift rounded conv weights cause (qdq.py)
    int8_head: bool = False  # decoders' onnxruntime variant: the LM head (one tied int8 table) too
    decoder_int8: str = "auto"  # decoders' onnxruntime variant: blockwise (MatMulNBits), dynamic; auto: blockwise
    # where the installed onnxruntime runs it (>= 1.23), else dynamic
    variants: tuple[str, ...] = VARIANTS  # which INT8 variants to write: cpu (onnxruntime), tensorrt
    keep_float: tuple[str, ...] = ()  # node-name globs or op types, optionally MODULE:PATTERN
    max_drop: float | None = None  # fail when a held-out metric drops more than this (0..1)
    gate: tuple[str, ...] = ()  # metric-name globs max_drop judges; (): the --eval task metrics, else all
    auto: bool = False  # keep the most sensitive layers float until within max_drop
    fp16: bool = False  # write FP16 GPU variants instead of INT8
    sensitivity: bool = False
    eval_data: str | None = None  # held-out images; default: source images calibration did not use
    eval_samples: int = 64
    eval_beams: int | None = None  # decoding of the held-out captions/answers; None: the bundle's default
    decoder_samples: int = 32  # images whose decoding steps are calibrated (decoders' TensorRT variant)
    batch_size: int | None = None  # None: as many images as keep a batch's activations near 256 MB
    every: int | None = None  # video/camera: take every N-th frame
    texts: tuple[str, ...] = ()  # for text modules; default: a built-in set
    threads: int | None = None
    overwrite: bool = False
    trt_cache: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise OptionError(f"unknown calibration method {self.method!r}; valid: {', '.join(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(f"percentile must be in (50, 100], got {self.percentile}")
        for name in ("samples", "eval_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise OptionError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("batch_size", "every", "eval_beams", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise OptionError(f"{name} must be a positive integer or None, got {value!r}")
        if self.decoder_int8 not in ("auto", *DECODER_SCHEMES):
            raise OptionError(f"unknown decoder INT8 scheme {self.decoder_int8!r}; valid: auto, "
                              f"{', '.join(DECODER_SCHEMES)}")
        if self.decoder_samples < 0:
            raise OptionError(f"decoder_samples must be >= 0, got {self.decoder_samples}")
        if self.max_drop is not None and not 0.0 <= self.max_drop <= 1.0:
            raise OptionError(f"max_drop is a fraction in [0, 1] (0.02 = 2 %), got {self.max_drop}")
        if self.auto and self.max_drop is None:
            raise OptionError("auto requires max_drop: --auto --max-drop 0.02 keeps layers float until "
                              "every held-out metric is within 2 % of the float twin")
        if self.fp16 and (self.auto or self.sensitivity):
            raise OptionError("fp16 writes FP16 GPU variants; auto and sensitivity apply to INT8 only")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        object.__setattr__(self, "variants", tuple(self.variants))
        if "cpu" not in self.variants or not set(self.variants) <= set(VARIANTS):
            raise OptionError(f"variants must include cpu (the module the tasks run) and be among "
                              f"{', '.join(VARIANTS)}; got {', '.join(self.variants) or 'none'}")
        object.__setattr__(self, "gate", tuple(self.gate))
        object.__setattr__(self, "texts", tuple(self.texts))


@dataclass
class CalibrationReport:
    path: Path
    seconds: float
    quantization: dict  # what the manifest's "quantization" section holds
    accuracy: list[accuracy.AccuracyReport] = field(default_factory=list)
    sensitivity: list[LayerError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _quiet(msg: str) -> None:
    pass


def _refuse_quantized(bundle: Bundle) -> None:
    m = bundle.manifest
    low = sorted(n for n, s in m.modules.items() if s.precision != "fp32")  # fp32 variants: export's @cpu
    if m.quantization is not None or low:
        what = f"modules {low} are not fp32" if low else "its manifest has a quantization section"
        raise BundleError(f"bundle {bundle.path} is already quantized ({what}); calibrate its float twin "
                          "(the bundle edge-run export wrote)")


def calibrate(bundle: str | Path, data: str, output: str | Path, options: CalibrationOptions | None = None,
              progress: Callable[[str], None] = _quiet) -> CalibrationReport:
    """Quantize the float bundle `bundle` with images from `data` into the bundle `output`."""
    options = options or CalibrationOptions()
    start = time.perf_counter()
    require("onnx", "calibrate")
    src = open_bundle(bundle)
    _refuse_quantized(src)
    job = _Job(src, data, options, progress)
    try:
        with BundleWriter(output, overwrite=options.overwrite) as writer:
            job.out_dir = writer.dir
            variants = job.fp16() if options.fp16 else job.int8()
            job.check_drop()
            job.copy_rest(variants)
            manifest = job.manifest(variants)
            path = writer.commit(manifest)
    finally:
        job.close()
    job.stages["total"] = time.perf_counter() - start
    return CalibrationReport(path, job.stages["total"], manifest.quantization, job.reports, job.ranking,
                             job.notes, job.stages)


class _Job:
    """One calibration run's state, stage by stage."""

    def __init__(self, src: Bundle, data: str, options: CalibrationOptions, progress):
        self.src, self.options, self.progress = src, options, progress
        self.source = open_source(data, seed=options.seed, every=options.every, samples=options.samples)
        self.task_data = (taskeval.load(options.eval_data, options.eval_samples)
                          if taskeval.is_data_spec(options.eval_data) else None)
        self.task_reference = taskeval.TaskScores({})
        if self.task_data is not None:  # its images serve the agreement figures too
            self.eval_source = FolderSource(self.task_data.images, options.seed, options.eval_data, "data")
        else:
            self.eval_source = (open_source(options.eval_data, seed=options.seed, every=options.every)
                                if options.eval_data else None)
        self.patterns = parse_patterns(options.keep_float)
        self.plans = build.plan_modules(src, self.patterns)
        self.texts = list(options.texts or TEXTS)
        self.out_dir: Path | None = None
        self.ranges: dict[str, dict[str, Range]] = {}
        self.methods: dict[str, dict[str, str]] = {}  # module -> tensor -> the method its range came from
        self.means: dict[str, dict] = {}  # module -> conv input tensor -> per-channel mean (bias correction)
        self.probes: dict[str, list] = {}
        self.codes: dict[str, dict] = {}  # module -> weight -> int8 codes (gptq.py)
        self.reports: list[accuracy.AccuracyReport] = []
        self.ranking: list[LayerError] = []
        self.auto_float: dict[str, dict[str, str]] = {}
        self.search: FloatSearch | None = None
        self.notes: list[str] = []
        self.stages: dict[str, float] = {}
        self.used = 0
        self.batch = options.batch_size or EVAL_BATCH

    def close(self) -> None:
        for source in (self.source, self.eval_source):
            getattr(source, "close", lambda: None)()

    def _timed(self, stage: str, t0: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - t0

    # -- statistics --------------------------------------------------------------------------------

    def collect(self) -> None:
        t0, o = time.perf_counter(), self.options
        modules = {n: [t.activation for t in p.targets] for n, p in self.plans.items() if p.quantized}
        means = {n: [t.activation for t in p.targets if t.op == "Conv"] for n, p in self.plans.items()
                 if p.quantized and o.bias_correction}
        collector = Collector(self.src.path, modules, decoders=[n for n, p in self.plans.items() if p.decoder],
                              means=means, threads=o.threads,
                              probes=GPTQ_FEEDS if o.gptq and o.per_channel else SENSITIVITY_FEEDS)
        self.progress(f"statistics: {o.method} over up to {o.samples} images from {self.source.report.source}")
        images = iter(self.source.calibration(o.samples, augment=o.augment))
        batch = o.batch_size or 1
        while chunk := [im for _, im in itertools.islice(images, batch)]:
            pixels = collector.model.pixel_values(chunk)
            collector.fold_batch(pixels, self.texts, QUESTIONS, decode=self.used < o.decoder_samples)
            self.used += len(chunk)
            if o.batch_size is None and self.used == len(chunk):
                batch = auto_batch(collector.image_bytes(len(chunk)))
                self.batch = min(batch, EVAL_BATCH)
            self.progress(f"statistics: {self.used}/{o.samples} images")
        if self.used < o.samples:
            self.notes.append(f"asked for {o.samples} samples; {self.source.report.source} has {self.used} "
                              f"readable: calibrated on {self.used}")
        if self.source.report.skipped:
            self.notes.append(f"skipped {len(self.source.report.skipped)} unreadable file(s), e.g. "
                              f"{self.source.report.skipped[0][0]}")
        for note in self.notes:
            self.progress(f"note: {note}")
        for name, stats in collector.stats().items():
            seen = {t: s for t, s in stats.items() if s.hist is not None}
            self.methods[name] = {t: choose(s, o.percentile)[0] if o.method == "auto" else o.method
                                  for t, s in seen.items()}
            self.ranges[name] = {t: tensor_range(s, self.methods[name][t], o.percentile) for t, s in seen.items()}
        self.probes = collector.probes()
        self.means = collector.channel_means()
        collector.close()
        gc.collect()
        self._timed("statistics", t0)
        if o.gptq and o.per_channel:
            self.round_weights()

    def round_weights(self) -> None:
        from .gptq import conv_codes

        t0 = time.perf_counter()
        for name, plan in self.plans.items():
            if plan.quantized and not plan.decoder and self.probes.get(name):
                self.codes[name] = conv_codes(plan.path, plan.quantized, self.probes[name], self.options.threads)
                if self.codes[name]:
                    self.progress(f"{name}: {len(self.codes[name])} convolutions' weights rounded against "
                                  f"their inputs (gptq)")
        self._timed("weight rounding", t0)

    # -- held-out data ------------------------------------------------------------------------------

    def held_out(self) -> list[np.ndarray]:
        t0, o = time.perf_counter(), self.options
        model = file_model(self.src.path, {}, threads=o.threads)
        source = self.eval_source
        items = source.calibration(o.eval_samples) if source is not None else self.source.holdout(o.eval_samples)
        images = [im for _, im in items]
        if not images:
            raise OptionError("no held-out images to compare the quantized bundle with its float twin; give "
                              "--eval DATA")
        self._timed("held-out images", t0)
        return [model.pixel_values(images[i:i + self.batch]) for i in range(0, len(images), self.batch)]

    def _eval_options(self) -> dict:
        return {} if self.options.eval_beams is None else {"num_beams": self.options.eval_beams}

    def evaluate(self, batches, variants: dict[str, list[build.Variant]], tags: Sequence[str | None],
                 reference: accuracy.Outputs) -> list[accuracy.AccuracyReport]:
        """Compare each variant set (tag None: the CPU variants) with the float twin's `reference`."""
        t0, reports = time.perf_counter(), []
        classifier = any(p.role == "answer_classifier" for p in self.plans.values())
        for tag in tags:
            files = {}
            for base, mine in variants.items():
                pick = next((v for v in mine if v.module == (base if tag is None else f"{base}@{tag}")), None)
                if pick is None and tag is not None:
                    pick = next((v for v in mine if v.module == base), None)  # the base serves as fallback
                if pick is not None:
                    files[base] = self.out_dir / pick.file
            name = "cpu" if tag is None else tag
            self.progress(f"held-out: {name} variant on {reference.samples} images")
            model = file_model(self.src.path, files, threads=self.options.threads)
            got = accuracy.run(model, batches, self.texts, QUESTIONS, self._eval_options(), reference)
            reports.append(accuracy.compare(name, got, reference, classifier))
            reports[-1].gate = self.options.gate
            if self.task_data is not None:
                self.progress(f"--eval: {name} variant on {taskeval.describe(self.task_data, model.manifest.tasks)}")
                found = taskeval.scores(model, self.task_data, self._eval_options())
                reports[-1].metrics += taskeval.metrics(found, self.task_reference, self.task_data)
            del model
            gc.collect()
        self._timed("held-out comparison", t0)
        return reports

    def reference(self, batches) -> accuracy.Outputs:
        t0 = time.perf_counter()
        self.progress(f"held-out: float twin on {sum(len(b) for b in batches)} images")
        model = file_model(self.src.path, {}, threads=self.options.threads)
        ref = accuracy.run(model, batches, self.texts, QUESTIONS, self._eval_options())
        if self.task_data is not None:
            self.progress(f"--eval: float twin on {taskeval.describe(self.task_data, model.manifest.tasks)}")
            self.task_reference = taskeval.scores(model, self.task_data, self._eval_options())
            if not self.task_reference.scores:
                raise OptionError(f"--eval {self.options.eval_data} has no examples for this bundle's tasks "
                                  f"({', '.join(model.manifest.tasks)}): caption and retrieval need captions, "
                                  "vqa questions with answers")
        del model
        gc.collect()
        self._timed("held-out comparison", t0)
        return ref

    # -- INT8 ----------------------------------------------------------------------------------------

    def sensitivity(self) -> None:
        t0 = time.perf_counter()
        errors: list[LayerError] = []
        for name, plan in self.plans.items():
            outputs = ["logits"] if plan.decoder else [o.name for o in plan.spec.outputs]
            errors += module_sensitivity(name, plan.path, plan.quantized, self.ranges.get(name, {}),
                                         self.probes.get(name, [])[:SENSITIVITY_FEEDS], outputs,
                                         per_channel=self.options.per_channel,
                                         threads=self.options.threads, progress=self.progress,
                                         means=self.means.get(name), codes=self.codes.get(name))
        self.ranking = sorted(errors, key=lambda e: -e.error)
        self._timed("sensitivity", t0)

    def write_int8(self) -> dict[str, list[build.Variant]]:
        t0, out = time.perf_counter(), {}
        self.plans = build.plan_modules(self.src, self.patterns, self.auto_float)
        for name, plan in self.plans.items():
            if not plan.quantized:
                self.progress(f"{name}: stays float ({len(plan.targets)} linear layers, none to quantize)")
                continue
            written = build.write_int8(plan, self.ranges.get(name), self.out_dir, self.options.per_channel,
                                       self.progress, means=self.means.get(name),
                                       int8_head=self.options.int8_head, codes=self.codes.get(name),
                                       tensorrt="tensorrt" in self.options.variants,
                                       decoder_scheme=decoder_scheme(self.options.decoder_int8))
            if written:
                out[name] = written
            elif (note := f"{name} stays float: no calibration statistics reached it") not in self.notes:
                self.notes.append(note)
        self._timed("write variants", t0)
        return out

    def _check_gate(self) -> None:
        if self.options.gate and self.reports and not self.reports[0].gating:
            names = ", ".join(m.name for m in self.reports[0].metrics)
            raise OptionError(f"--gate {', '.join(self.options.gate)} names no metric of this bundle; its metrics: "
                              f"{names}")
        limit = self.options.max_drop
        for m in self.reports[0].gating if self.reports and limit is not None else []:
            if not m.samples or 1 / m.samples <= limit:
                continue
            note = (f"--max-drop {limit} is finer than one example of {m.task} {m.name} (1/{m.samples} = "
                    f"{1 / m.samples:.3f}): it holds only while no example changes; give --eval more examples")
            if note not in self.notes:
                self.notes.append(note)
                self.progress(f"note: {note}")

    def _float_worst(self, k: int) -> None:
        """Keep exactly the `k` worst layers of the sensitivity ranking float (besides the patterns')."""
        self.auto_float = {}
        for e in self.ranking[:k]:
            self.auto_float.setdefault(e.module, {})[e.node] = f"--auto (sensitivity {e.error:.2e})"

    def _probe(self, batches, reference) -> tuple[dict[str, list[build.Variant]], bool]:
        """Write the variants of the current float set and judge them; (variants, gate holds)."""
        variants = self.write_int8()
        trt = f"@{build.TRT_TAG}"
        tags = [None] + ([build.TRT_TAG] if any(v.module.endswith(trt) for m in variants.values() for v in m) else [])
        self.reports = self.evaluate(batches, variants, tags, reference)
        self._check_gate()
        return variants, all(r.within(self.options.max_drop) for r in self.reports)

    def _worst(self) -> str:
        worst = max((m for r in self.reports for m in r.gating), key=lambda m: m.drop, default=None)
        return "" if worst is None else f"{worst.task} {worst.name} drop {worst.drop:.4f}"

    def _auto(self, batches, reference) -> dict[str, list[build.Variant]]:
        """The smallest float set of worst-ranked layers that meets --max-drop (autosearch.py)."""
        self.search = FloatSearch(len(self.ranking))
        done: dict[int, tuple] = {}
        while (k := self.search.next()) is not None:
            self._float_worst(k)
            variants, ok = self._probe(batches, reference)
            done[k] = (variants, self.reports)
            self.search.record(k, ok, self._worst())
            self.progress(f"auto: {k} layer(s) float: {'meets' if ok else 'exceeds'} --max-drop "
                          f"{self.options.max_drop} ({self._worst() or 'no gated metric'})")
        best = self.search.best
        k = len(self.ranking) if best is None else best
        if k != self.search.probes[-1].float_layers:  # the files on disk are another probe's
            self._float_worst(k)
            self.write_int8()
        variants, self.reports = done[k]
        return variants

    def int8(self) -> dict[str, list[build.Variant]]:
        self.collect()
        batches = self.held_out()
        reference = self.reference(batches)
        if self.options.sensitivity or self.options.auto:
            self.sensitivity()
        if self.options.auto:
            variants = self._auto(batches, reference)
        else:
            variants, _ = self._probe(batches, reference)
        if not variants and self.options.auto:
            raise AccuracyDropError(f"--auto: meeting --max-drop {self.options.max_drop} took every linear layer "
                                    "in float, so there is no INT8 bundle to write; calibrate on more --samples "
                                    "or allow a larger --max-drop. No bundle was written")
        if not variants:
            raise OptionError("no linear layer is left to quantize (--keep-float names them all, or the calibration "
                              "runs reached none); no bundle was written")
        if self.options.trt_cache and "tensorrt" in self.options.variants:
            self._trt_caches(variants)
        return variants

    def _trt_caches(self, variants) -> None:
        from .trtcache import write_cache

        for name in variants:
            if self.ranges.get(name):
                write_cache(self.out_dir / f"{name}.trt-calib.cache", self.ranges[name], self.options.method)

    # -- FP16 ----------------------------------------------------------------------------------------

    def fp16(self) -> dict[str, list[build.Variant]]:
        t0 = time.perf_counter()
        batches = self.held_out()
        reference = self.reference(batches)
        variants = {}
        for name, plan in self.plans.items():
            variants[name] = [build.write_fp16(plan, self.out_dir)]
            self.progress(f"{name}: FP16 variant {name}@{build.FP16_TAG}")
        self._timed("write variants", t0)
        self.reports = self.evaluate(batches, variants, [build.FP16_TAG], reference)
        return variants

    # -- the bundle ------------------------------------------------------------------------------------

    def check_drop(self) -> None:
        limit = self.options.max_drop
        bad = [(r.variant, m) for r in self.reports for m in r.gating if limit is not None and m.drop > limit]
        if bad:
            shown = "; ".join(f"{v} {m.task} {m.name} {m.value:.4f} (drop {m.drop:.4f})" for v, m in bad[:4])
            hint = "" if self.options.auto else "; try --auto, --keep-float PATTERN or more --samples"
            raise AccuracyDropError(f"quantized bundle exceeds --max-drop {limit}: {shown}{hint}. "
                                    "No bundle was written")

    def copy_rest(self, variants) -> None:
        modules = self.src.manifest.modules
        skip = build.replaced_files(modules, variants)
        for rel in self.src.manifest.files:
            if rel not in skip:
                dst = self.out_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.src.file(rel), dst)

    def manifest(self, variants) -> Manifest:
        m = self.src.manifest
        modules = build.module_specs(m.modules, variants)
        # a GroupQueryAttention decoder's beam-heads variants, the rewrite checked on its float twin
        float_graphs = {s.extra["variant_of"]: self.src.file(s.file) for s in m.modules.values()
                        if s.extra.get("variant_of") and not s.extra.get("when")
                        and (s.extra.get("cache") or {}).get("type") == gqa.CACHE_TYPE}
        beams = beam_heads.beam_counts((m.decoding or {}).get("generation", {}).get("num_beams"))
        modules = beam_heads.add_beam_heads(self.out_dir, modules, beams, self.progress, float_graphs)
        provenance = {**m.provenance, "calibrated_from": str(self.src.path),
                      "calibrated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        return dataclasses.replace(m, modules=modules, files={}, provenance=provenance,
                                   quantization=self.summary(variants))

    def summary(self, variants) -> dict:
        o = self.options
        out: dict = {"method": "fp16" if o.fp16 else o.method}
        if not o.fp16:
            out.update(samples=self.used, samples_requested=o.samples, seed=o.seed, per_channel=o.per_channel,
                       bias_correction=o.bias_correction, gptq=o.gptq, int8_head=o.int8_head,
                       decoder_int8=decoder_scheme(o.decoder_int8),
                       variants=list(o.variants),
                       decoder_samples=min(self.used, o.decoder_samples),
                       activations={"cpu": "uint8 asymmetric (decoders: int8 quantized at run time)",
                                    build.TRT_TAG: "int8 symmetric (lopsided inputs, ReLU or GELU outputs, centred)"})
            if o.method == "auto":
                out["auto_method"] = {"candidates": list(CANDIDATES), "criterion": "least int8 quantization MSE"}
            if o.method in ("auto", "percentile"):
                out["percentile"] = o.percentile
        out["source"] = self.source.report.to_dict()
        if self.eval_source is not None:
            out["eval_source"] = self.eval_source.report.to_dict()
        out["modules"] = {}
        for name, mine in variants.items():
            plan = self.plans[name]
            entry = {"variants": {v.module: v.to_dict() for v in mine}, "linear_layers": len(plan.targets)}
            if not o.fp16:
                entry["kept_float"] = dict(sorted(plan.kept.items()))
                corrected = {t.node for t in plan.quantized if t.activation in self.means.get(name, {})}
                if corrected:
                    entry["bias_corrected"] = len(corrected)
                if self.codes.get(name):
                    entry["gptq_rounded"] = len(self.codes[name])
                used = list(self.methods.get(name, {}).values())
                entry["activation_methods"] = {m: used.count(m) for m in sorted(set(used))}
                if o.trt_cache and self.ranges.get(name):
                    entry["trt_calibration_cache"] = f"{name}.trt-calib.cache"
            out["modules"][name] = entry
        out["accuracy"] = {"held_out": self.reports[0].samples if self.reports else 0,
                           "variants": [r.to_dict() for r in self.reports]}
        if self.task_data is not None:
            out["accuracy"]["eval_data"] = taskeval.counts(self.task_data)
        if self.ranking:
            out["sensitivity"] = [e.to_dict() for e in self.ranking[:50]]
        if self.search is not None:
            out["auto"] = {"max_drop": o.max_drop, "gate": list(o.gate), "ranked_layers": self.search.total,
                           "float_layers": sum(map(len, self.auto_float.values())),
                           "kept_float": {k: sorted(v) for k, v in self.auto_float.items()},
                           "probes": [p.to_dict() for p in self.search.probes]}
        if self.notes:
            out["notes"] = list(self.notes)
        return out
