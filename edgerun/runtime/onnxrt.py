"""onnxruntime behind the runner interface every backend shares.

A runner checks feeds once (names, dtypes, ranks, fixed dims) and then only runs; each backend
writes `_infer_impl`. Every runner records the time of its last and all its calls, so `bench`
times every backend alike.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BundleError, InputError, OptionError

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}

BACKENDS = ("cpu", "cuda", "ort-trt")
_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: type
    shape: tuple  # ints for fixed dims, str or None for symbolic ones


def default_threads() -> int:
    """Physical-ish core count: onnxruntime's pool gains nothing from SMT siblings on small boards."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_shared_pool_threads: int | None = None  # threads of the process-wide pool; 0 once unavailable


def shared_pool(threads: int) -> bool:
    """Whether sessions of `threads` threads run on onnxruntime's process-wide intra-op pool.

    Opt-in (EDGERUN_ORT_SHARED_POOL=1) for the library, on by default in the `edge-run` command
    (`edgerun.cli.entry`: its process is edge-run's own): once onnxruntime has made its global pool,
    every later session of the process must use it, the user's own sessions included (onnxruntime
    refuses a session with a pool of its own then). The first caller sizes the pool; a later one
    asking for another size still gets it (the pool cannot be replaced). One pool serves all of a
    bundle's sessions with one set of workers, which spin between ops (onnxruntime offers no spin
    control for the global pool from Python): with one pool there is no other pool's spinning to
    steal the cores, and a decode step's ~500 small kernels no longer wait for sleeping workers
    (BLIP-base INT8 step 10.9-12.1 -> 9.7-9.8 ms on the 2-core test machine)."""
    global _shared_pool_threads
    if _shared_pool_threads is None:
        if os.environ.get("EDGERUN_ORT_SHARED_POOL", "0") != "1":
            return False
        import onnxruntime.capi._pybind_state as C
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail

        try:
            C.set_global_thread_pool_sizes(threads, 1)
            _shared_pool_threads = threads
        except Fail:  # its global pools exist already, made by someone else in this process
            _shared_pool_threads = 0
    return bool(_shared_pool_threads)


def session_options(threads: int | None, *, shared: bool = False):
    """Options for one session: `threads` intra-op threads (None: the usable cores), sequential
    execution, all graph optimizations, no spinning, no memory arena. `shared`: run on the process-wide pool where
    it is enabled (`shared_pool`); once that pool exists, every session must."""
    import onnxruntime as ort

    threads = threads or default_threads()
    so = ort.SessionOptions()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # No CPU memory arena: it kept the vision encoder's peak activations (~50 MB for BLIP-base)
    # for the life of the session; without it the vision encoder and decode step ran as fast
    # (599 vs 609 ms, 27.4 vs 26.6 ms, interleaved medians on the 2-core development machine).
    so.enable_cpu_mem_arena = False
    if _shared_pool_threads or (shared and shared_pool(threads)):
        so.use_per_session_threads = False  # sizes and spinning are the pool's
        return so
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Spinning workers of several sessions steal the few cores from each other (FACTS.md).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class Runner:
    """What every backend's runner shares: `inputs`/`outputs` (IOSpec lists), `path`, the feed check
    and the timed `infer`; a backend writes `_infer_impl` alone (Polygraphy's BaseRunner pattern)."""

    path: Path
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    last_time: float = 0.0
    total_time: float = 0.0
    calls: int = 0

    def check(self, feeds: dict) -> None:
        """Names, dtypes, ranks and fixed dims of `feeds`; InputError says which and what was expected."""
        names = {i.name for i in self.inputs}
        if set(feeds) != names:
            raise InputError(f"{self.path.name}: inputs {sorted(feeds)} given, expected {sorted(names)}")
        for spec in self.inputs:
            arr = feeds[spec.name]
            if arr.dtype != spec.dtype or arr.ndim != len(spec.shape):
                raise InputError(
                    f"{self.path.name}: input {spec.name} is {arr.dtype}{list(arr.shape)}, expected "
                    f"{np.dtype(spec.dtype)} of shape {list(spec.shape)}")
            for got, want in zip(arr.shape, spec.shape):
                if isinstance(want, int) and got != want:
                    raise InputError(
                        f"{self.path.name}: input {spec.name} has shape {list(arr.shape)}, expected {list(spec.shape)}")

    def infer(self, feeds: dict, *, check: bool = True) -> dict:
        if check:
            self.check(feeds)
        start = time.perf_counter()
        out = self._infer_impl(feeds)
        self.last_time = time.perf_counter() - start
        self.total_time += self.last_time
        self.calls += 1
        return out

    def _infer_impl(self, feeds: dict) -> dict:
        raise NotImplementedError


# onnxruntime graph rewrites left out of every session. MatMulAddFusion turns a 2-D MatMul + Add into
# a Gemm before the Q/DQ fusions run, and onnxruntime has no integer kernel for a Q/DQ Gemm whose
# output is float: its weights were dequantized at every call (ViT-GPT2's INT8 cross-attention K/V:
# 108 -> 18.8 ms without it; float graphs the same, 72 vs 71 ms).
DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


class OnnxRuntimeRunner(Runner):
    """One ONNX file in one onnxruntime session."""

    def __init__(self, path: str | Path, *, backend: str = "cpu", threads: int | None = None,
                 provider_options: dict | None = None, graph: bytes | None = None):
        """provider_options: {provider name: its options}, e.g. the TensorRT provider's caches and
        profile shapes (edgerun.runtime.iobinding.ort_trt_options). `graph`: a serialized graph to run
        instead of the file at `path` (one rewritten in memory), its external data beside `path`."""
        import onnxruntime as ort

        if backend not in _PROVIDERS:
            raise OptionError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        available = ort.get_available_providers()
        wanted = _PROVIDERS[backend][0]
        if wanted not in available:
            raise OptionError(
                f"backend {backend!r} needs onnxruntime's {wanted}, which this onnxruntime lacks "
                f"(available: {', '.join(available)}); install it with: pip install 'edge-run[gpu]'")
        self.path = Path(path)
        so = session_options(threads, shared=backend == "cpu")
        if graph is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path.parent))
        try:
            self.session = ort.InferenceSession(
                str(self.path) if graph is None else graph, so,
                providers=[(p, (provider_options or {}).get(p, {})) for p in _PROVIDERS[backend] if p in available],
                disabled_optimizers=list(DISABLED_OPTIMIZERS))
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise BundleError(f"{self.path} is not a loadable ONNX model: {str(exc).splitlines()[0]}") from exc
        self.inputs = [self._spec(i) for i in self.session.get_inputs()]
        self.outputs = [self._spec(o) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    @staticmethod
    def _spec(arg) -> IOSpec:
        return IOSpec(arg.name, _ORT_DTYPES.get(arg.type, np.float32), tuple(arg.shape))

    def _infer_impl(self, feeds: dict) -> dict:
        return dict(zip(self._output_names, self.session.run(self._output_names, feeds)))

    def run_binding(self, binding, reads=None) -> None:
        """Run through an IO binding (its inputs and outputs already bound), timed like `infer`.
        `reads()`: the arrays the call reads, built only for whoever captures the feeds (the bench's
        roofline, `roofline.captured_feeds`)."""
        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.last_time = time.perf_counter() - start
        self.total_time += self.last_time
        self.calls += 1
