"""Native TensorRT engines behind the runner interface every backend shares.

`TrtRunner` deserializes one engine file, keeps one execution context per optimization profile
(made on first use), and for each call picks the narrowest profile that covers the input shapes
(edgerun.runtime.profiles). Inputs go through pinned host buffers to device buffers on the
runner's own CUDA stream; buffers grow to the largest shape seen and are reused. Device memory
and streams come from cuda-python (`CudaRuntime`); the TensorRT calls differ by version and go
through edgerun.runtime.trtapi.

`engine_runner(bundle, module)` finds the module's engine in the manifest, checks it against this
machine with the device guard (edgerun.runtime.guard) and refuses a mismatched engine, or rebuilds
it when rebuilding is allowed (`rebuild=True`, or EDGERUN_TRT_REBUILD=1 for `edgerun.load`).
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import BundleError, EdgeRunError, MissingDependencyError
from .guard import DeviceInfo, decide, engine_for, refusal
from .onnxrt import IOSpec, Runner
from .profiles import Profile, ShapeOutsideProfilesError, choose_profile
from .trtapi import TRT_EXTRA, api, import_tensorrt

REBUILD_ENV = "EDGERUN_TRT_REBUILD"


def rebuild_allowed() -> bool:
    return os.environ.get(REBUILD_ENV, "").strip().lower() in ("1", "true", "yes")


class CudaError(EdgeRunError):
    """A CUDA runtime call failed."""


def import_cudart():
    """cuda-python's runtime module (`cuda.bindings.runtime` from 12.6, `cuda.cudart` before)."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart
        return cudart
    except ImportError as exc:
        raise MissingDependencyError(
            f"backend 'tensorrt' needs cuda-python for device memory; install it with: "
            f"pip install 'edge-run[{TRT_EXTRA}]'") from exc


class CudaRuntime:
    """The few CUDA runtime calls the runner needs, over cuda-python's `cudart` (each returns
    (error, value...); a non-zero error raises CudaError naming the call)."""

    def __init__(self, cudart=None):
        self.rt = cudart if cudart is not None else import_cudart()

    def _call(self, name: str, *args):
        result = getattr(self.rt, name)(*args)
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if int(getattr(err, "value", err)) != 0:
            raise CudaError(f"CUDA {name} failed: {getattr(err, 'name', err)}")
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", max(nbytes, 1)))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ptr)

    def malloc_host(self, nbytes: int) -> tuple[int, np.ndarray]:
        """Pinned host memory and a uint8 view of it."""
        ptr = int(self._call("cudaMallocHost", max(nbytes, 1)))
        view = np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))
        return ptr, view

    def free_host(self, ptr: int) -> None:
        self._call("cudaFreeHost", ptr)

    def stream(self) -> int:
        return int(self._call("cudaStreamCreate"))

    def copy(self, dst: int, src: int, nbytes: int, to_device: bool, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice if to_device else \
            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)

    def synchronize(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", stream)

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        free, total = self._call("cudaMemGetInfo")
        return int(free), int(total)

    def device(self) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor") of the current device."""
        props = self._call("cudaGetDeviceProperties", int(self._call("cudaGetDevice")))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\0").strip(), f"{props.major}.{props.minor}"


class _Buffer:
    """A device buffer with its pinned host twin, grown on demand."""

    def __init__(self, cuda: CudaRuntime):
        self.cuda, self.nbytes = cuda, 0
        self.device = self.host_ptr = 0
        self.host: np.ndarray | None = None

    def ensure(self, nbytes: int) -> None:
        nbytes = max(nbytes, 256)  # never empty: an empty past still needs a valid address
        if nbytes <= self.nbytes:
            return
        self.release()
        self.device = self.cuda.malloc(nbytes)
        self.host_ptr, self.host = self.cuda.malloc_host(nbytes)
        self.nbytes = nbytes

    def release(self) -> None:
        if self.nbytes:
            self.cuda.free(self.device)
            self.cuda.free_host(self.host_ptr)
            self.nbytes, self.host = 0, None


class TrtRunner(Runner):
    """One TensorRT engine file; `infer(feeds) -> outputs` like every runner."""

    def __init__(self, path: str | Path, entry: dict, *, trt=None, cuda: CudaRuntime | None = None,
                 rebuild: Callable[[dict], tuple[Path, dict]] | None = None):
        self.trt = trt if trt is not None else import_tensorrt()
        self.api = api(self.trt)
        self.cuda = cuda if cuda is not None else CudaRuntime()
        self.rebuild = rebuild
        self._buffers: dict[str, _Buffer] = {}
        self._load(Path(path), entry)
        self.stream = self.cuda.stream()

    def _load(self, path: Path, entry: dict) -> None:
        self.path, self.entry = path, entry
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read TensorRT engine {path}: {exc}") from None
        logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(logger)
        try:
            engine = self._runtime.deserialize_cuda_engine(data)
        except Exception as exc:  # noqa: BLE001 -- TensorRT raises its own untyped errors for bad files
            engine, why = None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        else:
            why = "TensorRT could not deserialize it"
        if engine is None:
            raise BundleError(f"TensorRT engine {path} is corrupt or not an engine ({why}); rebuild it with: "
                              "edge-run engine build BUNDLE --rebuild")
        self.engine = engine
        self.tensors = self.api.io_tensors(engine)
        self.profiles = [Profile.from_dict(p) for p in entry["profiles"]]
        if engine.num_optimization_profiles != len(self.profiles):
            raise BundleError(f"engine {path} has {engine.num_optimization_profiles} optimization profiles, its "
                              f"manifest entry lists {len(self.profiles)}; rebuild it")
        self._contexts: dict[int, object] = {}
        spec = lambda t: IOSpec(t.name, t.dtype, tuple(d if d >= 0 else None for d in t.shape))
        self.inputs = [spec(t) for t in self.tensors if t.is_input]
        self.outputs = [spec(t) for t in self.tensors if not t.is_input]

    def _profile(self, feeds: dict) -> int:
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        try:
            return choose_profile(self.profiles, shapes, what=f"engine {self.path.name}")
        except ShapeOutsideProfilesError:
            if self.rebuild is None:
                raise
        path, entry = self.rebuild(shapes)  # a wider engine, written into the bundle
        self._contexts.clear()
        self._load(Path(path), entry)
        return choose_profile(self.profiles, shapes, what=f"engine {self.path.name}")

    def _context(self, profile: int):
        if profile not in self._contexts:
            context = self.engine.create_execution_context()
            if context is None:
                raise CudaError(f"TensorRT could not create an execution context for {self.path.name} "
                                "(out of device memory?)")
            context.set_optimization_profile_async(profile, self.stream)
            self._contexts[profile] = context
        return self._contexts[profile]

    def _buffer(self, name: str, nbytes: int) -> _Buffer:
        buf = self._buffers.setdefault(name, _Buffer(self.cuda))
        buf.ensure(nbytes)
        return buf

    def _infer_impl(self, feeds: dict) -> dict:
        profile = self._profile(feeds)
        context = self._context(profile)
        addresses = {}
        for t in (t for t in self.tensors if t.is_input):
            arr = np.ascontiguousarray(feeds[t.name], dtype=t.dtype)
            self.api.set_input_shape(context, self.engine, t, profile, arr.shape)
            buf = self._buffer(t.name, arr.nbytes)
            buf.host[:arr.nbytes] = arr.reshape(-1).view(np.uint8)
            self.cuda.copy(buf.device, buf.host_ptr, arr.nbytes, True, self.stream)
            addresses[t.name] = buf.device
        shapes = {}
        for t in (t for t in self.tensors if not t.is_input):
            shapes[t.name] = self.api.output_shape(context, self.engine, t, profile)
            addresses[t.name] = self._buffer(t.name, _nbytes(shapes[t.name], t.dtype)).device
        if not self.api.execute(context, self.engine, profile, addresses, self.tensors, self.stream):
            raise CudaError(f"TensorRT failed to run {self.path.name} on shapes "
                            f"{ {k: list(v.shape) for k, v in feeds.items()} }")
        for t in (t for t in self.tensors if not t.is_input):
            buf = self._buffers[t.name]
            self.cuda.copy(buf.host_ptr, buf.device, _nbytes(shapes[t.name], t.dtype), False, self.stream)
        self.cuda.synchronize(self.stream)
        out = {}
        for t in (t for t in self.tensors if not t.is_input):
            n = _nbytes(shapes[t.name], t.dtype)
            out[t.name] = self._buffers[t.name].host[:n].view(t.dtype).reshape(shapes[t.name]).copy()
        return out

    def close(self) -> None:
        for buf in self._buffers.values():
            buf.release()
        self._buffers.clear()
        self._contexts.clear()


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def device_info(trt, cuda: CudaRuntime) -> DeviceInfo:
    name, cc = cuda.device()
    return DeviceInfo(str(trt.__version__), name, cc)


def engine_runner(bundle, module: str, *, rebuild: bool | None = None, trt=None,
                  cuda: CudaRuntime | None = None) -> TrtRunner:
    """The runner of `module`'s engine in `bundle` (an opened Bundle), after the device guard."""
    trt = trt if trt is not None else import_tensorrt()
    cuda = cuda if cuda is not None else CudaRuntime()
    rebuild = rebuild_allowed() if rebuild is None else rebuild
    entry = engine_for(bundle.manifest.engines, module)
    if entry is None and not rebuild:
        raise BundleError(f"bundle {bundle.path} has no TensorRT engine for module {module!r}; build its engines "
                          f"on this machine with: edge-run engine build {bundle.path}")
    device = device_info(trt, cuda)
    if entry is not None:
        source = bundle.manifest.modules.get(entry.get("onnx_module", ""))
        sha = bundle.manifest.files[source.file].sha256 if source and source.file in bundle.manifest.files else None
        decision = decide(entry, device, sha, rebuild)
        if decision.action == "refuse":
            raise refusal(entry, device, decision.reasons, str(bundle.path))
        if decision.action == "use":
            return TrtRunner(bundle.file(entry["file"]), entry, trt=trt, cuda=cuda,
                             rebuild=_rebuilder(bundle, module, trt, cuda) if rebuild else None)
    path, entry = _rebuilder(bundle, module, trt, cuda)(None)
    return TrtRunner(path, entry, trt=trt, cuda=cuda, rebuild=_rebuilder(bundle, module, trt, cuda))


def _rebuilder(bundle, module: str, trt, cuda) -> Callable:
    """Rebuild `module`'s engine in place (widened to `shapes` when given); returns (path, entry)."""
    def rebuild(shapes: dict | None):
        from ..engine.build import rebuild_module

        return rebuild_module(bundle.path, module, shapes, trt=trt, cuda=cuda)
    return rebuild
