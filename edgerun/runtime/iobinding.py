"""onnxruntime on a GPU with IO binding: the decoder's KV cache stays on the device.

`IOBindingRunner` is an `OnnxRuntimeRunner` whose calls go through an IO binding on the backend's
device ("cuda" for backends cuda and ort-trt, "cpu" otherwise, so the same code runs in CPU tests).
`DeviceDecoderInference` is decoding's `Inference` over it: the self-attention cache is one
preallocated time-major device buffer (capacity, layer, row, head, dim) per K and V, as in
edgerun.runtime.kvcache. Each step binds the cache prefix [0, past) as the past inputs and binds
the new K/V outputs straight into [past, past + new) of the same buffer, so nothing is copied;
the cross-attention K/V are copied to the device once per generation; only the token ids go to
the device and only the logits come back each step. Beam reordering is a Gather on the device
(a one-node ONNX graph, serialized here without the onnx package) into a spare buffer, then a swap.

`ort_trt_options` gives the TensorRT execution provider its engine and timing cache directories
(under the user cache, one engine folder per ONNX file's sha256) and explicit min/opt/max profile
shapes: without them it rebuilds an engine for every new sequence length (onnxruntime issue 13559:
24-48 s per call for GPT-2).
"""
from __future__ import annotations

import functools
from importlib import metadata

import numpy as np

from .._verifycache import cache_dir
from ..errors import OptionError
from .onnxrt import OnnxRuntimeRunner
from .profiles import ProfileGrid, module_profiles, ort_trt_shapes, uncovered_dims

DEVICE = {"cpu": "cpu", "cuda": "cuda", "ort-trt": "cuda"}
_ELEM = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.int64): 7}


# -- which onnxruntime is installed -------------------------------------------------------------


def ort_distributions() -> list[str]:
    """The onnxruntime distributions installed (more than one overwrite each other's files)."""
    out = []
    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def providers_report() -> dict:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "distributions": ort_distributions()}


def check_backend(backend: str) -> None:
    """OptionError saying which provider is missing, what is installed and how to fix it."""
    from .onnxrt import _PROVIDERS

    report = providers_report()
    wanted = _PROVIDERS[backend][0]
    if wanted in report["providers"]:
        return
    dists = report["distributions"]
    clash = (f" Both {' and '.join(dists)} are installed; they overwrite each other's files. Keep one: "
             "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
             if len(dists) > 1 else "")
    raise OptionError(
        f"backend {backend!r} needs onnxruntime's {wanted}; this onnxruntime {report['onnxruntime']} "
        f"({', '.join(dists) or 'unknown distribution'}) has only {', '.join(report['providers'])}.{clash} "
        "On a desktop: pip uninstall -y onnxruntime && pip install onnxruntime-gpu; on a Jetson install "
        "NVIDIA's Jetson build of onnxruntime-gpu (see docs/jetson.md)")


# -- TensorRT execution provider options ------------------------------------------------------------


def ort_trt_options(bundle, module: str, spec, grid: ProfileGrid | None = None) -> dict:
    """TensorrtExecutionProvider options for `module` (its variant `spec`) of `bundle`."""
    sha = bundle.manifest.files[spec.file].sha256 if spec.file in bundle.manifest.files else "unhashed"
    root = cache_dir() / "ort-trt"
    engines, timing = root / "engines" / sha[:16], root / "timing"
    engines.mkdir(parents=True, exist_ok=True)
    timing.mkdir(parents=True, exist_ok=True)
    options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(engines),
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(timing),
               "trt_fp16_enable": str(spec.precision == "fp16"), "trt_int8_enable": str(spec.precision == "int8")}
    if any(not isinstance(d, int) for t in spec.inputs for d in t.shape) and not uncovered_dims(spec.inputs):
        limit = spec.extra.get("cache", {}).get("max_positions") or bundle.manifest.model.get("max_positions") or 64
        grid = grid or ProfileGrid(past=tuple(sorted({min(16, limit), limit})))
        options.update(ort_trt_shapes(module_profiles(spec.inputs, grid)))
    return options


# -- the runner ---------------------------------------------------------------------------------------


class IOBindingRunner(OnnxRuntimeRunner):
    """An onnxruntime session run through IO bindings on the backend's device."""

    device_resident = True

    def __init__(self, path, *, backend: str = "cpu", threads: int | None = None,
                 provider_options: dict | None = None):
        super().__init__(path, backend=backend, threads=threads, provider_options=provider_options)
        self.backend = backend
        self.device = DEVICE[backend]

    def _infer_impl(self, feeds: dict) -> dict:
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self._output_names:
            binding.bind_output(name, "cpu")  # the next module is fed from the host
        self.session.run_with_iobinding(binding)
        return dict(zip(self._output_names, (v.numpy() for v in binding.get_outputs())))


# -- the decoder with its cache on the device ---------------------------------------------------------


class DeviceDecoderInference:
    """decoding's `Inference` with the KV cache in device buffers (see the module doc)."""

    def __init__(self, runner: IOBindingRunner, cross: dict[str, np.ndarray], rows: int, capacity: int, dims: dict):
        from onnxruntime import OrtValue

        self.runner, self.device = runner, runner.device
        dtype = next((i.dtype for i in runner.inputs if i.name == "past_key"), np.float32)
        self.dtype = np.dtype(dtype)
        self.shape = (capacity, dims["layers"], rows, dims["heads"], dims["head_dim"])
        self.step_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        alloc = lambda: OrtValue.ortvalue_from_shape_and_type(self.shape, self.dtype, self.device, 0)
        self._key, self._value, self._spare_key, self._spare_value = alloc(), alloc(), alloc(), alloc()
        self.cross = {k: OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), self.device, 0) for k, v in cross.items()}
        self.length, self.capacity = 0, capacity
        self.step_times: list[float] = []

    def _bind(self, binding, name: str, buffer, start: int, steps: int, output: bool) -> None:
        shape = (steps,) + self.shape[1:]
        ptr = buffer.data_ptr() + start * self.step_bytes
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.device, 0, self.dtype, list(shape), ptr)

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """tokens : (rows, new) int64 -> logits (rows, vocab) float32 at the last position."""
        past, new = self.length, tokens.shape[1]
        assert past + new <= self.capacity, "cache capacity is sized for the whole generation"
        binding = self.runner.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64))
        self._bind(binding, "past_key", self._key, 0, past, False)
        self._bind(binding, "past_value", self._value, 0, past, False)
        for name, value in self.cross.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # the only thing that comes back each step
        self._bind(binding, "new_key", self._key, past, new, True)
        self._bind(binding, "new_value", self._value, past, new, True)
        self.runner.run_binding(binding)
        self.step_times.append(self.runner.last_time)
        self.length = past + new
        return binding.get_outputs()[0].numpy()

    def rearrange_kv_cache(self, source_indices: np.ndarray) -> None:
        n = self.length
        if n == 0:
            return
        session = _gather_session(self.device, self.dtype.str, tuple(self.runner.session.get_providers()))
        indices = np.ascontiguousarray(source_indices, dtype=np.int64)
        for buffer, spare in ((self._key, self._spare_key), (self._value, self._spare_value)):
            binding = session.io_binding()
            self._bind(binding, "data", buffer, 0, n, False)
            binding.bind_cpu_input("indices", indices)
            self._bind(binding, "out", spare, 0, n, True)
            session.run_with_iobinding(binding)
        self._key, self._spare_key = self._spare_key, self._key
        self._value, self._spare_value = self._spare_value, self._value

    def cleanup_caching(self) -> None:
        self.length = 0


# -- a one-node Gather graph, written as protobuf bytes (no onnx package at run time) -------------------


def gather_model(elem: int, axis: int = 2) -> bytes:
    """ModelProto of out = Gather(data, indices, axis): data (time, layer, row, head, dim)."""
    from . import onnxproto as pb

    dims = ["time", "layer", "row", "head", "dim"]
    gather = pb.node("Gather", ["data", "indices"], ["out"], pb.int_attribute("axis", axis))
    return pb.model("gather_rows", [gather], [pb.value_info("data", elem, dims), pb.value_info("indices", 7, ["row"])],
                    [pb.value_info("out", elem, dims)], opset=13)


@functools.lru_cache(maxsize=8)
def _gather_session(device: str, dtype: str, providers: tuple):

    elem = _ELEM.get(np.dtype(dtype))
    if elem is None:
        raise OptionError(f"the device KV cache holds float32 or float16, not {dtype}")
    keep = [p for p in providers if p in ("CUDAExecutionProvider", "CPUExecutionProvider")] or ["CPUExecutionProvider"]
    return plain_session(gather_model(elem), keep)


def plain_session(model, providers):
    """A small helper session with the runtime's session options (edgerun.runtime.onnxrt), on the
    process-wide thread pool where one exists."""
    import onnxruntime as ort

    from .onnxrt import session_options

    return ort.InferenceSession(model, session_options(1), providers=providers)
