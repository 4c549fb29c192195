"""Which TensorRT Python API to call, by the installed version (parsed, never string-compared).

Three generations are supported, each behind one small class with the same methods:

- `BindingsApi`, TensorRT 8.5 and 8.6 (JetPack 5.1 and 6.0): engines are indexed by binding; with
  several optimization profiles each profile has its own copy of the bindings
  (`num_bindings // num_optimization_profiles` per profile); `execute_async_v2(bindings, stream)`.
  Networks need the EXPLICIT_BATCH creation flag; FP16/INT8 are builder flags; implicit INT8
  calibrators work.
- `TensorApi`, TensorRT 10.x (JetPack 6.1/6.2: 10.3): tensors by name (`num_io_tensors`,
  `set_input_shape`, `set_tensor_address`, `execute_async_v3(stream)`); EXPLICIT_BATCH is gone
  (networks are explicit-batch); calibrators are deprecated but still build.
- `StrongApi`, TensorRT 11 and later: every network is strongly typed, the FP16/INT8 builder
  flags and calibrators are removed; precision comes from the ONNX (Q/DQ or FP16 variants).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from packaging.version import InvalidVersion, Version

from ..errors import MissingDependencyError, OptionError

OLDEST = Version("8.5")
TRT_EXTRA = "trt"


def parse_version(text: str) -> Version:
    """'10.3.0.30' -> Version; OptionError for text that is not a version."""
    try:
        return Version(str(text))
    except InvalidVersion:
        raise OptionError(f"{text!r} is not a TensorRT version; expected e.g. 8.6.1 or 10.3.0") from None


def import_tensorrt():
    """The installed `tensorrt` module, or an error naming the extra (JetPack ships its own)."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(
            "backend 'tensorrt' needs NVIDIA TensorRT's Python package; install it with: "
            f"pip install 'edge-run[{TRT_EXTRA}]' (on a Jetson it comes with JetPack: "
            "sudo apt install python3-libnvinfer)") from exc
    return tensorrt


@dataclass(frozen=True)
class IOTensor:
    """An engine input or output: `shape` has -1 for dynamic dims; `index` is the binding (8.x)."""

    name: str
    is_input: bool
    dtype: type
    shape: tuple[int, ...]
    index: int


_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
           "BOOL": np.bool_, "UINT8": np.uint8}


def numpy_dtype(trt_dtype) -> type:
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1].upper()
    if name not in _DTYPES:
        raise OptionError(f"TensorRT data type {name} has no numpy equivalent here; valid: {', '.join(_DTYPES)}")
    return _DTYPES[name]


class BindingsApi:
    """TensorRT 8.5/8.6."""

    name = "bindings"
    precision_flags = True  # FP16/INT8 are builder flags
    calibrators = True  # implicit INT8 calibration (legacy cache)

    def __init__(self, trt, version: Version):
        self.trt, self.version = trt, version

    # -- building ---------------------------------------------------------------------------------
    def create_network(self, builder):
        flag = 1 << int(self.trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        return builder.create_network(flag)

    def set_workspace(self, config, limit_bytes: int) -> None:
        config.set_memory_pool_limit(self.trt.MemoryPoolType.WORKSPACE, int(limit_bytes))

    def set_precision(self, config, fp16: bool, int8: bool) -> None:
        if fp16:
            config.set_flag(self.trt.BuilderFlag.FP16)
        if int8:
            config.set_flag(self.trt.BuilderFlag.INT8)

    # -- running ----------------------------------------------------------------------------------
    def io_tensors(self, engine) -> list[IOTensor]:
        """The tensors of profile 0 (binding indices 0 .. per-profile count - 1)."""
        per_profile = engine.num_bindings // max(1, engine.num_optimization_profiles)
        return [IOTensor(engine.get_binding_name(i), bool(engine.binding_is_input(i)),
                         numpy_dtype(engine.get_binding_dtype(i)), tuple(engine.get_binding_shape(i)), i)
                for i in range(per_profile)]

    def binding_count(self, engine) -> int:
        return engine.num_bindings

    def profile_shape(self, engine, tensor: IOTensor, profile: int) -> tuple:
        """(min, opt, max) of an input in `profile`."""
        return tuple(tuple(s) for s in engine.get_profile_shape(profile, self._index(engine, tensor, profile)))

    def _index(self, engine, tensor: IOTensor, profile: int) -> int:
        return profile * (engine.num_bindings // max(1, engine.num_optimization_profiles)) + tensor.index

    def set_input_shape(self, context, engine, tensor: IOTensor, profile: int, shape) -> None:
        if not context.set_binding_shape(self._index(engine, tensor, profile), tuple(shape)):
            raise OptionError(f"TensorRT refused shape {list(shape)} for input {tensor.name}")

    def output_shape(self, context, engine, tensor: IOTensor, profile: int) -> tuple:
        return tuple(context.get_binding_shape(self._index(engine, tensor, profile)))

    def execute(self, context, engine, profile: int, addresses: dict[str, int], tensors, stream: int) -> bool:
        bindings = [0] * engine.num_bindings
        for t in tensors:
            bindings[self._index(engine, t, profile)] = addresses[t.name]
        return bool(context.execute_async_v2(bindings, stream))


class TensorApi(BindingsApi):
    """TensorRT 10.x."""

    name = "tensors"
    calibrators = True  # deprecated in 10.x, still honoured

    def create_network(self, builder):
        return builder.create_network(0)

    def io_tensors(self, engine) -> list[IOTensor]:
        out = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT
            out.append(IOTensor(name, is_input, numpy_dtype(engine.get_tensor_dtype(name)),
                                tuple(engine.get_tensor_shape(name)), i))
        return out

    def binding_count(self, engine) -> int:
        return engine.num_io_tensors

    def profile_shape(self, engine, tensor: IOTensor, profile: int) -> tuple:
        return tuple(tuple(s) for s in engine.get_tensor_profile_shape(tensor.name, profile))

    def set_input_shape(self, context, engine, tensor: IOTensor, profile: int, shape) -> None:
        if not context.set_input_shape(tensor.name, tuple(shape)):
            raise OptionError(f"TensorRT refused shape {list(shape)} for input {tensor.name}")

    def output_shape(self, context, engine, tensor: IOTensor, profile: int) -> tuple:
        return tuple(context.get_tensor_shape(tensor.name))

    def execute(self, context, engine, profile: int, addresses: dict[str, int], tensors, stream: int) -> bool:
        for t in tensors:
            context.set_tensor_address(t.name, addresses[t.name])
        return bool(context.execute_async_v3(stream))


class StrongApi(TensorApi):
    """TensorRT 11 and later: strongly typed networks, no precision flags, no calibrators."""

    name = "strong"
    precision_flags = False
    calibrators = False

    def create_network(self, builder):
        return builder.create_network(1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))

    def set_precision(self, config, fp16: bool, int8: bool) -> None:
        pass  # precision is the ONNX's own: the builder picks the Q/DQ or FP16 variant module


def api_for_version(version: str | Version, trt=None):
    """The API class instance for a TensorRT version (OptionError below the oldest supported)."""
    v = version if isinstance(version, Version) else parse_version(version)
    if v < OLDEST:
        raise OptionError(f"TensorRT {v} is older than edge-run supports (>= {OLDEST}, JetPack 5.1); "
                          "upgrade TensorRT or use backend 'cuda'")
    if v.major >= 11:
        return StrongApi(trt, v)
    if v.major >= 10:
        return TensorApi(trt, v)
    return BindingsApi(trt, v)


def api(trt=None):
    """The API of the installed (or given) tensorrt module."""
    trt = trt if trt is not None else import_tensorrt()
    return api_for_version(trt.__version__, trt)
