"""What this machine can do, and how close a bundle's stages come to it.

Peaks are measured once per (machine, backend, threads, onnxruntime version) and cached in
``roofline.json`` under the edge-run cache dir (``$EDGERUN_CACHE_DIR``, else
``$XDG_CACHE_HOME/edgerun``, else ``~/.cache/edgerun``), written atomically:
- MatMul FLOP/s: onnxruntime multiplying two MATMUL_DIM-square float32 matrices, best of a few;
- bandwidth: a chain of GEMV_LAYERS float32 (1, K) x (K, K) MatMuls in onnxruntime, weights
  constant (so prepacked, as a decoder's are) and far larger than the caches, best of a few;
  bytes/s counts the weights read.
The test graphs are written as ONNX protobuf bytes here, so neither needs the `onnx` package.

Work per stage, what the achieved rates divide:
- encoders (compute-bound): FLOPs of every MatMul/Gemm/Conv (and their integer and quantized
  forms), 2 x multiply-adds, from the shapes onnxruntime reports when it profiles one call of the
  module on the real feeds with graph optimisations off (so nodes are the exported ones).
  Attention score products are MatMuls and are counted, fused (MultiHeadAttention) or not;
  elementwise ops, Softmax and norms are not.
- decoder steps (memory-bound): the bytes of the module on disk (its weights, stored once) plus
  the bytes of every tensor fed to the step (self-attention cache, cross-attention K/V, ids).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .._verifycache import cache_dir
from ..errors import OptionError
from .variants import select_module

MATMUL_DIM = 1536
GEMV_DIM = 4096  # a (4096, 4096) float32 weight is 64 MiB
GEMV_LAYERS = 4
REPEATS = 8  # best of: other processes on the machine only ever make a run slower
BUSY_LOAD = 0.5  # per core: above this 1-minute load, measured peaks are not cached
_CACHE_NAME = "roofline.json"
_FORMAT = "edgerun-roofline"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "ort-trt": "TensorrtExecutionProvider"}


@dataclass(frozen=True)
class Peaks:
    matmul_flops_per_s: float
    gemv_bytes_per_s: float
    backend: str
    threads: int
    measured_at: str
    load_average: float | None = None  # of the machine (1 min) when measured: high means others ran
    cached: bool = False  # read from the cache rather than measured by this process

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StageRoofline:
    bound: str  # "compute": work is FLOPs; "memory": work is bytes read
    work: float  # per call of the stage
    achieved_per_s: float  # work / the stage's p50 time
    peak_per_s: float

    @property
    def fraction(self) -> float:
        return self.achieved_per_s / self.peak_per_s if self.peak_per_s else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction}


def stage_roofline(work: dict, seconds: float, peaks: Peaks) -> StageRoofline | None:
    """`work` is {"flops": n} or {"bytes": n}; None when there is no time or no work to divide."""
    if seconds <= 0:
        return None
    if work.get("flops"):
        return StageRoofline("compute", work["flops"], work["flops"] / seconds, peaks.matmul_flops_per_s)
    if work.get("bytes"):
        return StageRoofline("memory", work["bytes"], work["bytes"] / seconds, peaks.gemv_bytes_per_s)
    return None


# --- ONNX test graphs (edgerun.runtime.onnxproto) -----------------------------------------------------


def matmul_model(n: int) -> bytes:
    """Y = A @ B, all (n, n) float32 inputs."""
    from . import onnxproto as pb

    inputs = [pb.value_info("a", 1, (n, n)), pb.value_info("b", 1, (n, n))]
    return pb.model("edgerun_roofline", [pb.node("MatMul", ["a", "b"], ["y"])], inputs,
                    [pb.value_info("y", 1, (n, n))])


def gemv_chain_model(k: int, layers: int) -> bytes:
    """x (1, k) through `layers` MatMuls with distinct constant (k, k) weights. Each weight is an Expand
    of a scalar, which onnxruntime folds into an initializer at load, so the file stays tiny; the
    scalar 2**-12 (times 1 + a small per-layer offset) keeps the activations near 1."""
    from . import onnxproto as pb

    inits, nodes = [pb.tensor("shape", np.array([k, k], np.int64), 7)], []
    for i in range(layers):
        inits.append(pb.tensor(f"s{i}", np.array([[2.0 ** -12 * (1 + i / 1024)]], np.float32), 1))
        nodes.append(pb.node("Expand", [f"s{i}", "shape"], [f"w{i}"]))
        nodes.append(pb.node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"]))
    return pb.model("edgerun_roofline", nodes, [pb.value_info("x", 1, (1, k))],
                    [pb.value_info(f"h{layers - 1}", 1, (1, k))], inits)


# --- measuring the peaks -----------------------------------------------------------------------------------


def _session(model: bytes, backend: str, threads: int):
    import onnxruntime as ort

    from .onnxrt import session_options

    return ort.InferenceSession(model, session_options(threads), providers=[PROVIDERS[backend]])


def _best_time(run, repeats: int = REPEATS) -> float:
    run()  # warm-up: first-run allocations, prepacking
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(backend: str, threads: int) -> Peaks:
    """MatMul FLOP/s and streaming GEMV bytes/s of onnxruntime on `backend` (see the module doc)."""
    import onnxruntime as ort

    device = "cpu" if backend == "cpu" else "cuda"
    n = MATMUL_DIM
    square = _session(matmul_model(n), backend, threads)
    a = ort.OrtValue.ortvalue_from_numpy(np.full((n, n), 0.5, np.float32), device)
    flops = 2 * n ** 3 / _best_time(lambda: square.run_with_ort_values(["y"], {"a": a, "b": a}))
    k, layers = GEMV_DIM, GEMV_LAYERS
    chain = _session(gemv_chain_model(k, layers), backend, threads)
    x = {"x": ort.OrtValue.ortvalue_from_numpy(np.ones((1, k), np.float32), device)}
    seconds = _best_time(lambda: chain.run_with_ort_values([f"h{layers - 1}"], x), 2 * REPEATS)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return Peaks(flops, layers * k * k * 4 / seconds, backend, threads, now, load)


def _cache_key(backend: str, threads: int) -> str:
    import onnxruntime as ort

    return f"{cpu_model()}|{platform.node()}|{backend}|threads={threads}|onnxruntime={ort.__version__}"


def _read_cache() -> dict:
    try:
        data = json.loads((cache_dir() / _CACHE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("format") == _FORMAT and isinstance(data.get("peaks"), dict)
    return data["peaks"] if ok else {}


def _write_cache(entries: dict) -> None:
    """Write to a temporary file and rename it over the cache, so readers never see half a file.
    A cache that cannot be written only means measuring again next time."""
    directory, tmp = cache_dir(), None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_CACHE_NAME}.", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"format": _FORMAT, "version": 1, "peaks": entries}, fh, indent=1)
        os.replace(tmp, directory / _CACHE_NAME)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _busy() -> bool:
    """Other processes keep the cores busy (1-minute load above half the cores): peaks measured now
    would be low, and a cached low peak would inflate every later fraction."""
    if not hasattr(os, "getloadavg"):
        return False
    return os.getloadavg()[0] > BUSY_LOAD * (os.cpu_count() or 1)


def peaks(backend: str, threads: int, *, remeasure: bool = False) -> Peaks:
    """The cached peaks of this machine for (backend, threads), measured first if not cached. A
    measurement taken while the machine is busy is used but not cached."""
    if backend not in PROVIDERS:
        raise OptionError(f"unknown backend {backend!r}; valid: {', '.join(PROVIDERS)}")
    key = _cache_key(backend, threads)
    entries = _read_cache()
    if not remeasure and isinstance(entries.get(key), dict):
        try:
            return Peaks(**{**entries[key], "cached": True})
        except TypeError:
            pass  # an entry from another version of this file: measure again
    busy = _busy()
    measured = measure_peaks(backend, threads)
    if not busy:
        _write_cache({**_read_cache(), key: {k: v for k, v in measured.to_dict().items() if k != "cached"}})
    return measured


# --- FLOPs of a module, from onnxruntime's profile of one call ----------------------------------------------

_MATMULS = {"MatMul", "MatMulInteger", "FusedMatMul", "QLinearMatMul", "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat"}
_CONVS = {"Conv", "ConvInteger", "FusedConv"}


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> int:
    """2 x multiply-adds of one MatMul/Gemm/Conv-like node, from its input and output shapes; 0 otherwise."""
    if not inputs or not outputs:
        return 0
    out = math.prod(outputs[0])
    if op in _MATMULS and inputs[0]:
        return 2 * out * inputs[0][-1]
    if op == "Gemm" and outputs[0]:
        return 2 * out * (math.prod(inputs[0]) // outputs[0][0])  # K whether A is (M, K) or (K, M)
    if op in _CONVS | {"QLinearConv"}:
        weight = inputs[3] if op == "QLinearConv" else inputs[1]
        return 2 * out * math.prod(weight[1:])  # (C_out, C_in / groups, kh, kw)
    if op == "MultiHeadAttention" and len(inputs) > 1 and len(inputs[1]) in (3, 4):
        keys = inputs[1][1] if len(inputs[1]) == 3 else inputs[1][2]  # key (B, L, D) or (B, heads, L, head_dim)
        return 4 * out * keys  # q.k^T and p.v: 2 x (B, S, D) x L multiply-adds
    return 0


def count_flops(path: str | Path, feeds: dict, threads: int | None = None) -> int:
    """FLOPs of one call of the ONNX model at `path` on `feeds` (see the module doc)."""
    import onnxruntime as ort

    from .onnxrt import session_options

    with tempfile.TemporaryDirectory(prefix="edgerun-flops-") as tmp:
        so = session_options(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    total = 0
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "op_name" in args and "input_type_shape" in args:
            shapes = [[next(iter(d.values())) for d in args[k]]  # [{"float": [1, 577, 768]}, ...]
                      for k in ("input_type_shape", "output_type_shape")]
            total += node_flops(args["op_name"], *shapes)
    return total


@contextlib.contextmanager
def captured_feeds(model, wanted: dict[str, tuple[int, ...]], batch: int | None = None, beams: int | None = None):
    """Yields {(module, call): copies of its feeds} for the wanted calls (0 = first) of each runner,
    the runners that decode `batch` images x `beams` beams where given (a decoder's variant for it)."""
    got, runners = {}, {name: model.runner(name, batch=batch, beams=beams) for name in wanted}
    for name, runner in runners.items():
        def infer(feeds, *, check=True, _name=name, _inner=runner.infer):
            call = next(counters[_name])
            if call in wanted[_name]:
                got[(_name, call)] = {k: np.array(v) for k, v in feeds.items()}
            return _inner(feeds, check=check)

        runner.infer = infer  # an instance attribute shadows the method until deleted
        if hasattr(runner, "run_binding"):  # calls through an IO binding (GqaDecoderInference passes `reads`)
            def run_binding(binding, reads=None, *, _name=name, _inner=runner.run_binding):
                call = next(counters[_name])
                if call in wanted[_name] and reads is not None:
                    got[(_name, call)] = {k: np.array(v) for k, v in reads().items()}
                return _inner(binding, reads)

            runner.run_binding = run_binding
    counters = {name: itertools.count() for name in runners}
    try:
        yield got
    finally:
        for runner in runners.values():
            del runner.infer
            if "run_binding" in vars(runner):
                del runner.run_binding


def decoder_modules(model, task: str) -> list[str]:
    """The task's KV-cache decoders (modules whose manifest entry describes a cache)."""
    return [n for n in model.manifest.tasks[task].modules if "cache" in model.bundle.module(n).extra]


def feeds_wanted(model, task: str, new_tokens: int) -> dict[str, tuple[int, ...]]:
    """The calls `stage_work` counts: each module's first; a decoder's first and middle steps."""
    decoders = decoder_modules(model, task)
    middle = (new_tokens // 2,) if new_tokens > 1 else ()
    return {n: ((0, *middle) if n in decoders else (0,)) for n in model.manifest.tasks[task].modules}


def stage_work(model, feeds: dict, batch: int, threads: int | None = None) -> dict[str, dict]:
    """Work from captured feeds: {module: {"flops"}} of each module but the decoder, per batch of
    `batch` inputs (counted on its first call and scaled, as large batches run in chunks), and
    {"decoder_first" / "decoder_per_token": {"bytes"}} read by the decoder's first and middle steps."""
    work = {}
    for (name, call), step in feeds.items():
        spec = model.bundle.module(name)
        if "cache" not in spec.extra:
            rows = max(len(next(iter(step.values()))), 1)
            # counted on the graph the CPU runs: its variant may take what the base does not (the
            # cross K/V's spare rows for a beam-heads decoder) and counts the same products
            graph = model.bundle.file(select_module(model.manifest, name, "cpu")[1].file)
            work[name] = {"flops": count_flops(graph, step, threads) * batch / rows}
        else:
            read = model.bundle.module_bytes(name) + sum(a.nbytes for a in step.values())
            work["decoder_first" if call == 0 else "decoder_per_token"] = {"bytes": read}
    return work


# --- the machine ----------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command(args: list[str]) -> str | None:
    """First lines of a tool's output, or None where the tool is absent or fails (no GPU here)."""
    if shutil.which(args[0]) is None:
        return None
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def tensorrt_version() -> str | None:
    """From the package metadata, else from the module (Jetson installs it with apt, without metadata)."""
    import importlib.util
    from importlib import metadata

    try:
        return metadata.version("tensorrt")
    except metadata.PackageNotFoundError:
        pass
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt
    except ImportError:  # a stub or a broken install: no TensorRT to describe
        return None
    return getattr(tensorrt, "__version__", None)


def gpu_description() -> dict | None:
    """GPU name, power limit and state (nvidia-smi), or a Jetson's model and power mode (nvpmodel)."""
    smi = _command(["nvidia-smi", "--query-gpu=name,power.limit,pstate,driver_version",
                    "--format=csv,noheader"])
    jetson = None
    with contextlib.suppress(OSError):
        jetson = Path("/proc/device-tree/model").read_text(errors="replace").strip("\0\n ") or None
    mode = _command(["nvpmodel", "-q"])
    if smi is None and mode is None:
        return None
    out: dict = {}
    if smi:
        name, power, pstate, driver = ([*map(str.strip, smi.splitlines()[0].split(","))] + [None] * 4)[:4]
        out.update(name=name, power_limit=power, performance_state=pstate, driver=driver)
    if mode:
        out.update(device=jetson, power_mode=mode.splitlines()[0])
    return out


def machine_description() -> dict:
    import onnxruntime as ort

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    memory = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "memory_bytes": memory,
        "os": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
        "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
        "tensorrt": tensorrt_version(), "gpu": gpu_description(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
