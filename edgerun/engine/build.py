"""`edge-run engine build`: one TensorRT engine per module the bundle's tasks run, into the bundle.

    report = build_engines("blip-int8/", BuildOptions(fp16=True, workspace_mb=1024))

Per module: plan which ONNX to parse (the variant for backend "tensorrt": the symmetric Q/DQ
`NAME@tensorrt` of a quantized bundle, `NAME@fp16` under TensorRT 11 with --fp16, else the module
itself), its precision flags (by TensorRT version, edgerun.runtime.trtapi), its optimization
profiles (edgerun.runtime.profiles); skip it when its engine already matches this machine and
plan (unless `rebuild`); parse, build with the timing cache shared by every build on this machine,
and write the engine and its manifest entry into the bundle (edgerun.engine.write).
"""
from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .._verifycache import cache_dir
from ..atomic import atomic_write
from ..bundle import Bundle, open_bundle
from ..errors import BundleError, ExportError, OptionError
from ..runtime.guard import decide, engine_for
from ..runtime.profiles import ProfileGrid, module_profiles, parse_grid
from ..runtime.trtapi import api as trt_api
from ..runtime.trtapi import import_tensorrt
from ..runtime.variants import select_module
from . import write
from .calibrator import cache_calibrator, cache_of

DEFAULT_WORKSPACE_MB = 2048  # at most; and at most a quarter of the device memory (8 GB Jetsons share it)


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = False
    int8: bool = False
    workspace_mb: int | None = None  # None: min(2048, device memory / 4)
    profiles: tuple[str, ...] = ()  # AXIS=N[,N...] specs over ProfileGrid's defaults
    rebuild: bool = False  # build even where a matching engine exists
    modules: tuple[str, ...] = ()  # default: every module the tasks run
    timing_cache: Path | None = None  # default: one per TensorRT version and GPU under the user cache
    calibration_from: Path | None = None  # legacy INT8: a quantized twin whose calibration caches to use

    def __post_init__(self):
        w = self.workspace_mb
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 16):
            raise OptionError(f"workspace is in MB and at least 16, got {w!r}")
        object.__setattr__(self, "profiles", tuple(self.profiles))
        object.__setattr__(self, "modules", tuple(self.modules))
        if self.calibration_from is not None and not self.int8:
            raise OptionError("calibration_from (--calibration-from) is for --int8 builds")


@dataclass
class Plan:
    """How one module's engine is built."""

    module: str  # the name the tasks use
    source: str  # the ONNX module parsed (a variant name where one is picked)
    path: Path
    precision: str  # fp32, fp16 or int8 (what the engine may run)
    fp16_flag: bool
    int8_flag: bool
    profiles: list
    grid: ProfileGrid
    calibration_cache: Path | None = None


@dataclass
class EngineResult:
    module: str
    file: str
    built: bool  # False: an engine matching this machine and plan was kept
    seconds: float
    precision: str
    source: str


@dataclass
class BuildReport:
    bundle: Path
    device: dict
    api: str
    timing_cache: Path
    results: list[EngineResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def task_modules(bundle: Bundle) -> list[str]:
    out = []
    for task in bundle.manifest.tasks.values():
        out += [m for m in task.modules if m not in out]
    return out


def _decoder_limit(bundle: Bundle, module: str) -> int | None:
    spec = bundle.module(module)
    return spec.extra.get("cache", {}).get("max_positions") or bundle.manifest.model.get("max_positions")


def plan_module(bundle: Bundle, module: str, options: BuildOptions, api, grid: ProfileGrid,
                notes: list[str]) -> Plan:
    """Which ONNX, which flags and which profiles build `module` under TensorRT API `api`."""
    source, spec = select_module(bundle.manifest, module, "tensorrt")
    fp16_variant = f"{module}@fp16"
    if options.fp16 and not api.precision_flags and fp16_variant in bundle.manifest.modules:
        source, spec = fp16_variant, bundle.manifest.modules[fp16_variant]
    elif options.fp16 and not api.precision_flags and spec.precision == "fp32":
        notes.append(f"{module}: TensorRT {api.version} has no FP16 flag and the bundle no FP16 variant; "
                     "built in FP32 (make one with: edge-run calibrate BUNDLE --fp16)")
    if "tensorrt" not in spec.backends and "ort-trt" not in spec.backends:
        raise BundleError(f"module {source} is for backends {list(spec.backends)}, and no variant of {module} is "
                          "for tensorrt; export or calibrate the bundle again")
    cache = None
    if options.int8 and spec.precision != "int8":
        cache = _legacy_cache(module, options, api)
        if cache is None:
            raise OptionError(f"--int8: module {module} has no INT8 Q/DQ variant ({module}@tensorrt); quantize the "
                              "bundle with: edge-run calibrate BUNDLE --data IMAGES -o BUNDLE-int8"
                              + ("" if not api.calibrators else
                                 ", or give its quantized twin: --calibration-from BUNDLE-int8"))
    int8 = spec.precision == "int8" or cache is not None
    fp16 = options.fp16 or spec.precision == "fp16"
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    profiles = module_profiles(spec.inputs, grid)
    return Plan(module, source, bundle.file(spec.file), precision, fp16 and api.precision_flags,
                int8 and api.precision_flags, profiles, grid, cache)


def _legacy_cache(module: str, options: BuildOptions, api) -> Path | None:
    if options.calibration_from is None:
        return None
    if not api.calibrators:
        raise OptionError(f"TensorRT {api.version} removed implicit INT8 calibration; build the quantized "
                          "bundle's Q/DQ variants instead (edge-run engine build BUNDLE-int8)")
    cache = cache_of(open_bundle(options.calibration_from), module)
    if cache is None:
        raise OptionError(f"{options.calibration_from} records no TensorRT calibration cache for {module}")
    return cache


def workspace_bytes(options: BuildOptions, cuda) -> int:
    if options.workspace_mb is not None:
        return options.workspace_mb << 20
    _, total = cuda.memory()
    return min(DEFAULT_WORKSPACE_MB << 20, total // 4)


def build_serialized(trt, api, plan: Plan, workspace: int, timing: bytes) -> tuple[bytes, bytes]:
    """(engine bytes, timing cache bytes) for `plan`; ExportError naming what TensorRT rejected."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = api.create_network(builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT {api.version} could not parse {plan.path.name}: {'; '.join(errors) or 'no detail'}"
                          f" (check it with: edge-run validate BUNDLE --target tensorrt)")
    config = builder.create_builder_config()
    api.set_workspace(config, workspace)
    api.set_precision(config, plan.fp16_flag, plan.int8_flag)
    if plan.calibration_cache is not None:
        config.int8_calibrator = cache_calibrator(trt, plan.calibration_cache)
    cache = config.create_timing_cache(timing)
    config.set_timing_cache(cache, False)
    for p in plan.profiles:
        profile = builder.create_optimization_profile()
        for name, rng in p.shapes.items():
            profile.set_shape(name, rng["min"], rng["opt"], rng["max"])
        config.add_optimization_profile(profile)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise ExportError(f"TensorRT {api.version} failed to build {plan.path.name} (see its log above; a larger "
                          "--workspace may help)")
    return bytes(data), bytes(config.get_timing_cache().serialize())


def timing_cache_path(options: BuildOptions, device) -> Path:
    if options.timing_cache is not None:
        return Path(options.timing_cache)
    gpu = "".join(c if c.isalnum() else "-" for c in device.gpu_name)
    return cache_dir() / "tensorrt" / f"timing-{device.trt_version}-{gpu}-sm{device.compute_capability}.cache"


def _entry(plan: Plan, rel: str, device, api, workspace: int, bundle: Bundle) -> dict:
    return {"module": plan.module, "onnx_module": plan.source, "file": rel, "precision": plan.precision,
            "trt_version": device.trt_version, "gpu_name": device.gpu_name,
            "compute_capability": device.compute_capability,
            "onnx_sha256": bundle.manifest.files[bundle.module(plan.source).file].sha256,
            "profiles": [p.to_dict() for p in plan.profiles], "grid": plan.grid.to_dict(), "api": api.name,
            "workspace_mb": workspace >> 20,
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _current(bundle: Bundle, plan: Plan, device) -> dict | None:
    """The module's existing entry when it matches this machine, ONNX, precision and profiles."""
    entry = engine_for(bundle.manifest.engines, plan.module)
    if entry is None or entry.get("onnx_module") != plan.source or entry.get("precision") != plan.precision:
        return None
    sha = bundle.manifest.files[bundle.module(plan.source).file].sha256
    try:
        same = decide(entry, device, sha, rebuild=False).action == "use"
    except BundleError:
        return None
    return entry if same and entry.get("profiles") == [p.to_dict() for p in plan.profiles] else None


def build_engines(bundle_path, options: BuildOptions | None = None, *, trt=None, cuda=None,
                  progress: Callable[[str], None] = lambda msg: None) -> BuildReport:
    """Build (or keep) the engine of every module of `options.modules` (default: all the tasks run)."""
    from ..runtime.trt import CudaRuntime, device_info

    options = options or BuildOptions()
    trt = trt if trt is not None else import_tensorrt()
    cuda = cuda if cuda is not None else CudaRuntime()
    api = trt_api(trt)
    bundle = open_bundle(bundle_path)
    device = device_info(trt, cuda)
    modules = list(options.modules) or task_modules(bundle)
    unknown = [m for m in modules if m not in bundle.manifest.modules]
    if unknown:
        raise OptionError(f"no module(s) {unknown} in {bundle.path}; its modules: {task_modules(bundle)}")
    report = BuildReport(bundle.path, vars(device), api.name, timing_cache_path(options, device))
    plans = [plan_module(bundle, m, options, api, _grid(bundle, m, options), report.notes) for m in modules]
    workspace = workspace_bytes(options, cuda)
    entries = {}
    for plan in plans:
        current = None if options.rebuild else _current(bundle, plan, device)
        if current is not None:
            report.results.append(EngineResult(plan.module, current["file"], False, 0.0, plan.precision, plan.source))
            progress(f"{plan.module}: engine up to date ({current['file']})")
            continue
        progress(f"{plan.module}: building from {plan.source} ({plan.precision}, {len(plan.profiles)} profile(s))")
        start = time.perf_counter()
        entries[plan.module] = _build_one(bundle, plan, trt, api, device, workspace, report.timing_cache)
        seconds = time.perf_counter() - start
        report.results.append(EngineResult(plan.module, entries[plan.module]["file"], True, seconds,
                                           plan.precision, plan.source))
    if entries:
        write.commit_entries(bundle, entries)
    return report


def _grid(bundle: Bundle, module: str, options: BuildOptions, base: ProfileGrid | None = None) -> ProfileGrid:
    return parse_grid(options.profiles, base, max_positions=_decoder_limit(bundle, module))


def _build_one(bundle: Bundle, plan: Plan, trt, api, device, workspace: int, timing_path: Path) -> dict:
    timing = timing_path.read_bytes() if timing_path.is_file() else b""
    data, timing = build_serialized(trt, api, plan, workspace, timing)
    try:
        atomic_write(timing_path, lambda fh: fh.write(timing))
    except OSError:
        pass  # the timing cache only speeds up later builds
    rel = write.engine_name(plan.module, plan.precision, data)
    write.write_engine_file(bundle, rel, data)
    return _entry(plan, rel, device, api, workspace, bundle)


def widen(grid: ProfileGrid, inputs, shapes: Mapping[str, tuple]) -> ProfileGrid:
    """`grid` with buckets added so that `shapes` ({input: shape}) fall inside one."""
    need: dict[str, int] = {}
    for t in inputs:
        for dim, size in zip(t.shape, shapes.get(t.name, ())):
            if isinstance(dim, str):
                need[dim] = max(need.get(dim, 0), int(size))
    changes: dict = {}
    batch = max(grid.batch + ((need["batch"],) if "batch" in need else ()))
    for axis, size in (("batch", need.get("batch")), ("past", need.get("past")),
                       ("beams", math.ceil(need["rows"] / batch) if "rows" in need else None)):
        if size is not None and size > getattr(grid, axis)[-1]:
            changes[axis] = getattr(grid, axis) + (size,)
    for axis in ("new", "seq"):
        if need.get(axis, 0) > getattr(grid, axis):
            changes[axis] = need[axis]
    return replace(grid, **changes)


def rebuild_module(bundle_path, module: str, shapes: Mapping | None, *, trt=None, cuda=None) -> tuple[Path, dict]:
    """Rebuild one module's engine on the spot (for the runner): with its recorded grid widened to
    `shapes` when given. Returns (engine path, manifest entry)."""
    from ..runtime.trt import CudaRuntime, device_info

    trt = trt if trt is not None else import_tensorrt()
    cuda = cuda if cuda is not None else CudaRuntime()
    api = trt_api(trt)
    bundle = open_bundle(bundle_path)
    old = engine_for(bundle.manifest.engines, module) or {}
    options = BuildOptions(fp16=old.get("precision") == "fp16", modules=(module,), rebuild=True)
    grid = ProfileGrid(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in old.get("grid", {}).items()}) \
        if old.get("grid") else _grid(bundle, module, options)
    _, spec = select_module(bundle.manifest, module, "tensorrt")
    if shapes:
        grid = widen(grid, spec.inputs, shapes)
    plan = plan_module(bundle, module, options, api, grid, [])
    device = device_info(trt, cuda)
    entry = _build_one(bundle, plan, trt, api, device, workspace_bytes(options, cuda),
                       timing_cache_path(options, device))
    bundle = write.commit_entries(bundle, {module: entry})
    return bundle.file(entry["file"]), entry
