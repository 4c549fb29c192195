"""`edge-run bench`: per-stage latency, throughput, cold start, memory and roofline of a bundle.

Each measured side runs in a fresh process of its own, one after another (`python -m
edgerun.runtime.bench_worker edgerun|torch`, its spec as JSON on stdin, one JSON line back): cold start
needs a fresh process, and torch and onnxruntime in one process distort each other 2-4x
(FACTS.md). This module imports only the standard library at its top, so the child's import
time is that of numpy, onnxruntime and the runtime (or of torch and transformers).

Runs do the same work: decode length is fixed (min_new_tokens = max_new_tokens = new_tokens) and
every process takes the same images in the same order. Caption/VQA stages come from
`Model.last_timings`; postprocess is the rest of the call (detokenising, results). A retrieval run
embeds `batch` images and `batch` texts; its stages are its modules (runner times), preprocessing,
tokenising and the rest. The first call is the cold start's first result; the first `warmup`
calls are not timed. Roofline work per stage is counted after the timed runs and peak RSS.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgeRunError, InputError, MissingDependencyError, OptionError, require

TASKS = ("caption", "vqa", "retrieval")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# parts of last_timings["decode"], so not added to the rest of the call
DECODE_PARTS = ("decoder", "decoder_calls", "decoder_first", "decoder_per_token", "kv_cache", "beam_bookkeeping")
TOTALS = ("embed_images", "embed_texts")  # retrieval sub-totals, sampled beside its stages
QUESTIONS = ("what is in the picture?", "how many people are there?", "what colour is the sky?")
TEXTS = ("a photo of a dog", "a red car parked on a street", "two people walking on a beach at sunset")
NOISE_FLOOR_S = 50e-6  # a stage p50 that changed by less than this never counts as a regression
FORMAT = "edgerun-bench"
# torch side: the submodules whose calls are timed as stages, by architecture
TORCH_STAGES = {
    "BlipForConditionalGeneration": {"vision": "vision_model", "decoder": "text_decoder"},
    "BlipForQuestionAnswering": {"vision": "vision_model", "question_encoder": "text_encoder",
                                 "decoder": "text_decoder"},
    "VisionEncoderDecoderModel": {"vision": "encoder", "decoder": "decoder"},
}


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OptionError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class BenchOptions:
    task: str | None = None  # None: the bundle's first task
    backend: str = "cpu"  # one backend, or "all" that are installed
    images: Path | None = None  # a folder of real inputs; synthetic images otherwise
    runs: int = 10
    warmup: int = 2
    batch: int = 1
    threads: int | None = None  # None: every core
    num_beams: int = 3
    new_tokens: int = 20  # generated per sequence, exactly (min = max)
    compare: str | None = None  # "torch", or a second bundle
    baseline: Path | None = None  # an earlier run's JSON
    tolerance: float = 0.10  # how much slower than the baseline a stage's p50 may be (0.1: 10%)
    json_path: Path | None = None
    plot_path: Path | None = None
    remeasure_peaks: bool = False

    def __post_init__(self):
        from .onnxrt import BACKENDS

        for name, low in (("runs", 1), ("warmup", 0), ("batch", 1), ("num_beams", 1), ("new_tokens", 1)):
            _check_int(name, getattr(self, name), low)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        if self.task is not None and self.task not in TASKS:
            raise OptionError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        if self.backend not in (*BACKENDS, "all"):
            raise OptionError(f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}, "
                              "all (every one installed)")
        tol = self.tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            raise OptionError(f"tolerance is a fraction >= 0 (0.1 allows 10% slower), got {tol!r}")
        for name in ("images", "baseline", "json_path", "plot_path"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.images is not None and not self.images.is_dir():
            raise InputError(f"images {self.images} is not a folder; give a folder of images or leave it out "
                             "for synthetic ones")
        if self.baseline is not None and not self.baseline.is_file():
            raise InputError(f"baseline {self.baseline} does not exist; give the JSON of an earlier run")
        if self.plot_path is not None and self.plot_path.suffix.lower() != ".png":
            raise OptionError(f"the plot is written as PNG; give a .png path, got {self.plot_path}")
        if self.compare not in (None, "torch") and not Path(self.compare).is_dir():
            raise OptionError(f"compare takes 'torch' or a second bundle directory; {self.compare!r} is "
                              "neither")

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    def decoding(self) -> dict:
        n = self.new_tokens
        return {"num_beams": self.num_beams, "max_new_tokens": n, "min_new_tokens": n}


# --- results -----------------------------------------------------------------------------------------


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, as numpy's default."""
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Stats:
    """Seconds over the timed runs."""

    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        ordered = sorted(values)
        return cls(*(_percentile(ordered, q) for q in (50, 90, 99)), statistics.fmean(ordered))

    def to_dict(self) -> dict:
        return {f"{k}_ms": v * 1000 for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class ColdStart:
    process_start: float  # spawn -> the child's first line of Python
    imports: float  # numpy, onnxruntime, edge-run's runtime (torch and transformers on the torch side)
    load: float  # bundle opened and verified (cached), one session per module of the task
    first_result: float  # the first call, first-run allocations included

    @property
    def total(self) -> float:
        return self.process_start + self.imports + self.load + self.first_result

    def to_dict(self) -> dict:
        return {**{f"{k}_s": v for k, v in dataclasses.asdict(self).items()}, "total_s": self.total}


@dataclass
class RunResult:
    """One measured process: a bundle on a backend, or the torch side."""

    label: str
    role: str  # "main", "compare" or "torch"
    backend: str  # a runtime backend, or "torch"
    path: str  # the bundle, or the torch side's checkpoint folder
    samples: dict[str, list[float]]  # seconds per timed run: each stage, the TOTALS, "end_to_end"
    module_samples: dict[str, list[float]]  # seconds per timed run in each module but decoders (runners)
    throughput: dict[str, float]
    cold_start: ColdStart
    peak_rss_bytes: int
    disk_bytes: int
    provenance: dict
    decoder_calls: int
    work: dict[str, dict]  # stage -> {"flops": n} or {"bytes": n}, per call (roofline.py)
    outputs: dict  # {"captions": [{text, token_ids}]} or {"image_embeds"/"text_embeds": [[...]]}, per input
    roofline: dict = field(default_factory=dict)  # stage -> roofline.StageRoofline, set by run_bench

    @property
    def stages(self) -> dict[str, Stats]:
        return {k: Stats.of(v) for k, v in self.samples.items() if k != "end_to_end" and k not in TOTALS}

    @property
    def end_to_end(self) -> Stats:
        return Stats.of(self.samples["end_to_end"])

    def to_dict(self) -> dict:
        out = {k: v if k == "captions" else {"inputs": sum(map(bool, v))} for k, v in self.outputs.items()}
        e2e = {**self.end_to_end.to_dict(), "samples_ms": [v * 1000 for v in self.samples["end_to_end"]]}
        return {"label": self.label, "role": self.role, "backend": self.backend, "path": self.path,
                "stages": {k: s.to_dict() for k, s in self.stages.items()},
                "modules": {k: Stats.of(v).to_dict() for k, v in self.module_samples.items()},
                "totals": {k: Stats.of(self.samples[k]).to_dict() for k in TOTALS if k in self.samples},
                "end_to_end": e2e, "throughput": self.throughput, "cold_start": self.cold_start.to_dict(),
                "peak_rss_bytes": self.peak_rss_bytes, "disk_bytes": self.disk_bytes,
                "provenance": self.provenance, "decoder_calls": self.decoder_calls, "work": self.work,
                "roofline": {k: r.to_dict() for k, r in self.roofline.items()}, "outputs": out}


@dataclass(frozen=True)
class Comparison:
    reference: str  # label of the run the ratios divide by
    other: str
    ratios: dict[str, float]  # other / reference: p50 of shared stages, end_to_end; peak_rss, disk...
    agreement: dict  # captions: inputs, identical, fraction; embeddings: inputs, cosine_min, cosine_mean

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StageChange:
    backend: str
    stage: str
    baseline: float  # p50 seconds
    now: float
    tolerance: float

    @property
    def ratio(self) -> float | None:
        return self.now / self.baseline if self.baseline > 0 else None

    @property
    def regressed(self) -> bool:
        slower = self.now - self.baseline
        return self.now > self.baseline * (1 + self.tolerance) and slower > NOISE_FLOOR_S

    def to_dict(self) -> dict:
        return {"backend": self.backend, "stage": self.stage, "baseline_p50_ms": self.baseline * 1000,
                "p50_ms": self.now * 1000, "ratio": self.ratio, "regressed": self.regressed}


@dataclass(frozen=True)
class BaselineCheck:
    path: str
    tolerance: float
    changes: tuple[StageChange, ...]
    notes: tuple[str, ...]  # options that differ from the baseline's: not a like-for-like comparison

    @property
    def regressed(self) -> list[StageChange]:
        return [c for c in self.changes if c.regressed]

    def to_dict(self) -> dict:
        return {"path": self.path, "tolerance": self.tolerance, "notes": list(self.notes),
                "changes": [c.to_dict() for c in self.changes],
                "regressed": [f"{c.backend}:{c.stage}" for c in self.regressed]}


@dataclass
class BenchReport:
    bundle: str
    task: str
    options: BenchOptions
    machine: dict
    peaks: dict  # backend -> roofline.Peaks
    runs: list[RunResult]
    comparisons: list[Comparison]
    baseline: BaselineCheck | None
    created_at: str

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "created_at": self.created_at, "bundle": self.bundle,
                "task": self.task, "options": self.options.to_dict(), "machine": self.machine,
                "peaks": {k: p.to_dict() for k, p in self.peaks.items()},
                "runs": [r.to_dict() for r in self.runs],
                "comparisons": [c.to_dict() for c in self.comparisons],
                "baseline": self.baseline.to_dict() if self.baseline else None}


def write_json(report: BenchReport, path: str | Path) -> Path:
    """Write the report as JSON: to a temporary file beside `path`, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=1, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- comparisons -----------------------------------------------------------------------------------------


def agreement(a: dict, b: dict) -> dict:
    """How far two runs' outputs on the same inputs agree."""
    if "captions" in a and "captions" in b:
        pairs = [(x, y) for x, y in zip(a["captions"], b["captions"]) if x and y]
        same = sum(x["token_ids"] == y["token_ids"] for x, y in pairs)
        return {"inputs": len(pairs), "identical": same, "fraction": same / len(pairs) if pairs else None}
    import numpy as np

    out = {}
    for key in ("image_embeds", "text_embeds"):
        rows = [(x, y) for x, y in zip(a.get(key, []), b.get(key, [])) if x and y]
        if rows:
            x, y = (np.asarray(v, np.float64) for v in zip(*rows))
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            out[key] = {"inputs": len(rows), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
    return out


def compare_runs(reference: RunResult, other: RunResult) -> Comparison:
    ref, oth = reference.stages, other.stages
    ratios = {k: oth[k].p50 / ref[k].p50 for k in ref if k in oth and ref[k].p50 > 0}
    ratios["end_to_end"] = other.end_to_end.p50 / reference.end_to_end.p50
    for key, a, b in (("peak_rss", reference.peak_rss_bytes, other.peak_rss_bytes),
                      ("disk", reference.disk_bytes, other.disk_bytes),
                      ("cold_start", reference.cold_start.total, other.cold_start.total)):
        if a:
            ratios[key] = b / a
    return Comparison(reference.label, other.label, ratios, agreement(reference.outputs, other.outputs))


def load_baseline(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"baseline {path} cannot be read as JSON ({exc}); give the --json file of a bench "
                         "run") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("runs"), list):
        raise InputError(f"baseline {path} is not the JSON of an edge-run bench run (format {FORMAT!r})")
    return data


def check_baseline(saved: dict, runs: list[RunResult], options: BenchOptions, path: str) -> BaselineCheck:
    """Each stage's p50 of the main runs against the baseline's run on the same backend."""
    before = {r.get("backend"): r for r in saved["runs"] if r.get("role") == "main"}
    changes = []
    for run in (r for r in runs if r.role == "main" and r.backend in before):
        old = before[run.backend]
        now = {**{k: s.p50 for k, s in run.stages.items()}, "end_to_end": run.end_to_end.p50}
        was = {**{k: v["p50_ms"] / 1000 for k, v in old.get("stages", {}).items()},
               "end_to_end": old["end_to_end"]["p50_ms"] / 1000}
        changes += [StageChange(run.backend, k, was[k], now[k], options.tolerance) for k in now if k in was]
    saved_options = saved.get("options", {})
    notes = tuple(f"{k}: baseline {saved_options[k]!r}, now {v!r}" for k, v in options.to_dict().items()
                  if k in ("task", "images", "batch", "threads", "num_beams", "new_tokens")
                  and k in saved_options and saved_options[k] != v)
    return BaselineCheck(path, options.tolerance, tuple(changes), notes)


# --- the parent: checks, then one process per measured side -------------------------------------------------


def _task(manifest, requested: str | None) -> str:
    served = [t for t in TASKS if t in manifest.tasks]
    if requested is None:
        if not served:
            raise OptionError(f"this bundle serves none of {', '.join(TASKS)}; it serves: "
                              f"{', '.join(manifest.tasks)}")
        return served[0]
    if requested not in manifest.tasks:
        raise OptionError(f"this bundle does not serve {requested}; it serves: {', '.join(manifest.tasks)}")
    return requested


def installed_backends() -> list[str]:
    import onnxruntime as ort

    from .onnxrt import BACKENDS
    from .roofline import PROVIDERS

    return [b for b in BACKENDS if PROVIDERS[b] in ort.get_available_providers()]


def _backends(choice: str) -> list[str]:
    installed = installed_backends()
    if choice == "all":
        return installed
    if choice not in installed:
        raise OptionError(f"backend {choice!r} is not installed here; installed: {', '.join(installed)} "
                          "(GPU backends: pip install 'edge-run[gpu]')")
    return [choice]


def _torch_source(manifest, task: str) -> dict:
    """What the torch side loads: the bundle's Hugging Face source folder and architecture."""
    prov = manifest.provenance or {}
    source, folder = prov.get("source"), prov.get("folder")
    if not (isinstance(source, str) and source.startswith("hf:") and folder):
        raise OptionError(f"--compare torch needs a bundle exported from a Hugging Face checkpoint "
                          f"(provenance source 'hf:...' with its folder); this bundle's source is "
                          f"{source or 'not recorded'!r}. Compare two bundles with --compare BUNDLE2")
    arch = prov.get("architecture") or manifest.model.get("architecture")
    if task not in ("caption", "vqa") or arch not in TORCH_STAGES:
        raise OptionError(f"--compare torch times generate() for {', '.join(TORCH_STAGES)}; this is {arch} "
                          f"({task}): compare two bundles with --compare BUNDLE2")
    if not Path(folder).is_dir():
        raise InputError(f"--compare torch loads the bundle's source checkpoint {folder}, which does not "
                         "exist here")
    import importlib.util

    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"--compare torch needs {module}; install it with: pip install "
                                         "'edge-run[export]'")
    return {"folder": str(folder), "architecture": arch}


def _image_files(options: BenchOptions) -> list[str] | None:
    if options.images is None:
        return None
    files = sorted(p for p in options.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"images {options.images} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [str(p) for p in files[:(options.warmup + options.runs) * options.batch]]


def _spawn(kind: str, spec: dict) -> dict:
    """Run one side in a fresh interpreter; its result is the last line it prints."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    text = json.dumps({**spec, "spawned_at": time.time()})
    proc = subprocess.run([sys.executable, "-m", "edgerun.runtime.bench_worker", kind], input=text, text=True,
                          capture_output=True, env=env, check=False)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if proc.returncode == 2 and isinstance(result, dict) and "error" in result:
        raise EdgeRunError(result["error"])
    if proc.returncode != 0 or not isinstance(result, dict):
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise EdgeRunError(f"the {kind} benchmark process failed (exit {proc.returncode}): {tail[0]}")
    return result


def _throughput(task: str, options: BenchOptions, samples: dict) -> dict:
    p50 = {k: Stats.of(v).p50 for k, v in samples.items() if k in (*TOTALS, "end_to_end")}
    if task == "retrieval":
        return {"images_per_s": options.batch / p50["embed_images"],
                "texts_per_s": options.batch / p50["embed_texts"]}
    return {"images_per_s": options.batch / p50["end_to_end"],
            "tokens_per_s": options.batch * options.new_tokens / p50["end_to_end"]}


def _measure(kind: str, spec: dict, options: BenchOptions, label: str, role: str) -> RunResult:
    data = _spawn(kind, spec)
    return RunResult(
        label=label, role=role, backend=spec.get("backend", "torch"), path=data["path"],
        samples=data["samples"], module_samples=data["module_samples"],
        throughput=_throughput(spec["task"], options, data["samples"]),
        cold_start=ColdStart(**data["cold_start"]), peak_rss_bytes=data["peak_rss_bytes"],
        disk_bytes=data["disk_bytes"], provenance=data["provenance"], decoder_calls=data["decoder_calls"],
        work=data["work"], outputs=data["outputs"])


def run_bench(bundle: str | Path, options: BenchOptions | None = None, progress=None) -> BenchReport:
    """Check everything, measure the machine's peaks (cached), then each side in its own process.
    `progress(message)` hears what is being timed."""
    import importlib.util

    from ..bundle import open_bundle
    from . import roofline

    options, progress = options or BenchOptions(), progress or (lambda message: None)
    main = open_bundle(bundle)  # verified here, so the measured process's load finds the check cached
    task = _task(main.manifest, options.task)
    backends = _backends(options.backend)
    saved = load_baseline(options.baseline) if options.baseline else None
    if saved and not {r.get("backend") for r in saved["runs"] if r.get("role") == "main"} & {*backends}:
        raise OptionError(f"baseline {options.baseline} has no run on {', '.join(backends)}")
    torch_source = _torch_source(main.manifest, task) if options.compare == "torch" else None
    other = open_bundle(options.compare) if options.compare not in (None, "torch") else None
    if other is not None:
        _task(other.manifest, task)
    if options.plot_path and importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError("--plot needs matplotlib; install it with: pip install 'edge-run[plot]'")
    spec = {"task": task, "options": options.to_dict(), "images": _image_files(options)}
    machine = roofline.machine_description()
    threads = options.threads or _cores()
    progress("measuring the machine's peaks" + ("" if options.remeasure_peaks else " (once; cached)"))
    peaks = {b: roofline.peaks(b, threads, remeasure=options.remeasure_peaks) for b in backends}
    runs = []
    from .tegra import TegraSampler
    jetson = TegraSampler.start()  # tegrastats during the runs; None off a Jetson
    for backend in backends:
        progress(f"timing {main.path.name} on {backend}")
        runs.append(_measure("edgerun", {**spec, "bundle": str(main.path), "backend": backend}, options,
                             f"{main.path.name} [{backend}]", "main"))
    machine["jetson"] = jetson.stop() if jetson is not None else None  # power mode, RAM, GPU load, rails
    if other is not None:
        progress(f"timing {other.path.name} on {backends[0]}")
        name = other.path.name if other.path.name != main.path.name else f"{other.path.name} (2)"
        runs.append(_measure("edgerun", {**spec, "bundle": str(other.path), "backend": backends[0]}, options,
                             f"{name} [{backends[0]}]", "compare"))
    if torch_source is not None:
        progress("timing transformers generate() (torch eager)")
        runs.append(_measure("torch", {**spec, **torch_source}, options, "torch generate()", "torch"))
    for run in (r for r in runs if r.backend in peaks):
        times = {**run.samples, **run.module_samples}  # encoders by module, decoder steps by stage
        found = {k: roofline.stage_roofline(w, Stats.of(times[k]).p50, peaks[run.backend])
                 for k, w in run.work.items() if times.get(k)}
        run.roofline = {k: r for k, r in found.items() if r is not None}
    comparisons = [compare_runs(runs[0], r) for r in runs if r.role != "main"]
    check = check_baseline(saved, runs, options, str(options.baseline)) if saved is not None else None
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return BenchReport(str(main.path), task, options, machine, peaks, runs, comparisons, check, now)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# --- the plot ----------------------------------------------------------------------------------------------


def plot(report: BenchReport, path: str | Path) -> Path:
    """A PNG: end-to-end latency distribution per run, and each run's p50 stage breakdown."""
    require("matplotlib", "plot")
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(12, 2.5 + 0.6 * len(report.runs)), layout="constrained")
    FigureCanvasAgg(fig)
    dist, parts = fig.subplots(1, 2)
    every = [v * 1000 for run in report.runs for v in run.samples["end_to_end"]]
    bins = np.geomspace(min(every) * 0.95, max(every) * 1.05, 40)  # log: runs may differ 100x
    for run in report.runs:
        dist.hist([v * 1000 for v in run.samples["end_to_end"]], bins=bins, alpha=0.6, label=run.label)
    dist.set(title="end-to-end latency", xlabel="ms (log scale)", ylabel="runs", xscale="log")
    dist.xaxis.set_major_formatter(ScalarFormatter())
    dist.xaxis.set_minor_formatter(ScalarFormatter())
    dist.legend(fontsize="small")
    colors, seen = {}, set()
    for y, run in enumerate(report.runs):
        left = 0.0
        for stage, stats in run.stages.items():
            ms = stats.p50 * 1000 * (max(run.decoder_calls - 1, 0) if stage == "decoder_per_token" else 1)
            name = "decoder steps" if stage == "decoder_per_token" else stage
            color = colors.setdefault(name, f"C{len(colors) % 10}")
            parts.barh(y, ms, left=left, color=color, label=None if name in seen else name)
            seen.add(name)
            left += ms
    parts.set_yticks(range(len(report.runs)), [r.label for r in report.runs])
    parts.set(title="stage breakdown (p50)", xlabel="ms")
    parts.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=4)
    fig.savefig(path, format="png", dpi=100)
    return Path(path)
