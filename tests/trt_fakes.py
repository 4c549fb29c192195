"""Stand-ins for `tensorrt` and cuda-python's `cudart` where neither can run (no GPU, no TensorRT).

They carry the method names of each version's documented Python API (TensorRT 8.5/8.6 bindings,
10.x tensor names, 11 strongly typed; cudart's (error, value) tuples) and do the work for real:
"device memory" is host memory moved with memmove, and a built "engine" runs its ONNX with
onnxruntime on the CPU, so what comes out of a TrtRunner can be compared with the CPU backend.
Every call is recorded in `calls` so tests can check which API the code used.
"""
from __future__ import annotations

import ctypes
import json
import types

import numpy as np

MAGIC = b"FAKE-TRT-ENGINE\n"


class _Enum:
    def __init__(self, **members):
        for k, v in members.items():
            setattr(self, k, _Member(k, v))


class _Member:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def __int__(self):
        return self.value

    def __eq__(self, other):
        return isinstance(other, _Member) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


_DT = {"tensor(float)": "FLOAT", "tensor(int64)": "INT64", "tensor(float16)": "HALF"}


class FakeCudart:
    """cudart: every call returns (error, value...); error 0 is success."""

    def __init__(self, name=b"Fake GPU", cc=(8, 7), total=8 << 30):
        self.cudaMemcpyKind = _Enum(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.mem, self.name, self.cc, self.total = {}, name, cc, total
        self.copies = []  # (kind, nbytes)

    def _alloc(self, n):
        buf = np.zeros(n, np.uint8)
        self.mem[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def cudaMalloc(self, n):
        return self._alloc(n)

    def cudaMallocHost(self, n):
        return self._alloc(n)

    def cudaFree(self, ptr):
        self.mem.pop(ptr)
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        self.copies.append((kind.name, n))
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaGetDevice(self):
        return 0, 0

    def cudaGetDeviceProperties(self, dev):
        return 0, types.SimpleNamespace(name=self.name, major=self.cc[0], minor=self.cc[1])

    def cudaMemGetInfo(self):
        return 0, self.total // 2, self.total


def _ort(path):
    from edgerun.runtime.iobinding import plain_session

    return plain_session(str(path), ["CPUExecutionProvider"])


class FakeEngine:
    def __init__(self, trt, desc):
        self.trt, self.desc = trt, desc
        self.session = _ort(desc["onnx"])
        self.io = desc["io"]  # [name, is_input, dtype, shape]
        self.num_optimization_profiles = len(desc["profiles"])
        self.num_io_tensors = len(self.io)
        self.num_bindings = len(self.io) * self.num_optimization_profiles

    # 8.x
    def _io(self, i):
        return self.io[i % len(self.io)]

    def get_binding_name(self, i):
        return self._io(i)[0]

    def binding_is_input(self, i):
        return self._io(i)[1]

    def get_binding_dtype(self, i):
        return getattr(self.trt.DataType, self._io(i)[2])

    def get_binding_shape(self, i):
        return self._io(i)[3]

    def get_profile_shape(self, profile, i):
        rng = self.desc["profiles"][profile][self._io(i)[0]]
        return [rng["min"], rng["opt"], rng["max"]]

    # 10.x
    def get_tensor_name(self, i):
        return self.io[i][0]

    def _named(self, name):
        return next(t for t in self.io if t[0] == name)

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if self._named(name)[1] else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return getattr(self.trt.DataType, self._named(name)[2])

    def get_tensor_shape(self, name):
        return self._named(name)[3]

    def get_tensor_profile_shape(self, name, profile):
        rng = self.desc["profiles"][profile][name]
        return [rng["min"], rng["opt"], rng["max"]]

    def create_execution_context(self):
        return FakeContext(self)


_NP = {"FLOAT": np.float32, "INT64": np.int64, "HALF": np.float16}


class FakeContext:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, None, {}, {}
        self.calls = engine.trt.calls

    def set_optimization_profile_async(self, profile, stream):
        self.calls.append(("set_optimization_profile_async", profile))
        self.profile = profile
        return True

    def _within(self, name, shape):
        rng = self.engine.desc["profiles"][self.profile][name]
        return len(shape) == len(rng["min"]) and all(lo <= s <= hi for s, lo, hi in zip(shape, rng["min"], rng["max"]))

    def set_binding_shape(self, i, shape):
        per = len(self.engine.io)
        if i // per != self.profile:
            return False  # a binding of another profile
        self.shapes[self.engine.io[i % per][0]] = tuple(shape)
        return self._within(self.engine.io[i % per][0], shape)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return self._within(name, shape)

    def _outputs(self, feeds):
        names = [t[0] for t in self.engine.io if not t[1]]
        return dict(zip(names, self.engine.session.run(names, feeds)))

    def _output_shape(self, name):
        feeds = {t[0]: np.zeros(self.shapes[t[0]], _NP[t[2]]) for t in self.engine.io if t[1]}
        return self._outputs(feeds)[name].shape

    def get_binding_shape(self, i):
        return self._output_shape(self.engine.io[i % len(self.engine.io)][0])

    def get_tensor_shape(self, name):
        return self._output_shape(name)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def _run(self, addresses):
        feeds = {}
        for name, is_input, dt, _ in self.engine.io:
            if is_input:
                shape, dtype = self.shapes[name], np.dtype(_NP[dt])
                n = int(np.prod(shape)) * dtype.itemsize
                feeds[name] = np.frombuffer((ctypes.c_uint8 * n).from_address(addresses[name]), dtype).reshape(shape).copy()
        for name, value in self._outputs(feeds).items():
            value = np.ascontiguousarray(value)
            ctypes.memmove(addresses[name], value.ctypes.data, value.nbytes)
        return True

    def execute_async_v2(self, bindings, stream):
        self.calls.append(("execute_async_v2", len(bindings)))
        per = len(self.engine.io)
        base = self.profile * per
        return self._run({t[0]: bindings[base + i] for i, t in enumerate(self.engine.io)})

    def execute_async_v3(self, stream):
        self.calls.append(("execute_async_v3",))
        return self._run(self.addresses)


class _Parser:
    def __init__(self, network, logger):
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path):
        self.network.onnx = path
        return True

    def get_error(self, i):
        return "none"


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}


class _TimingCache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return self.data + b"+"


class _Config:
    def __init__(self, trt):
        self.trt, self.flags, self.profiles, self.pool = trt, [], [], {}
        self.int8_calibrator = None

    def set_memory_pool_limit(self, pool, size):
        self.pool[pool.name] = size

    def set_flag(self, flag):
        self.flags.append(flag.name)

    def create_timing_cache(self, data):
        self.trt.calls.append(("create_timing_cache", bytes(data)))
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing = cache

    def get_timing_cache(self):
        return self.timing

    def add_optimization_profile(self, profile):
        self.profiles.append(profile.shapes)


class _Builder:
    def __init__(self, trt):
        self.trt = trt

    def create_network(self, flags):
        self.trt.calls.append(("create_network", flags))
        return types.SimpleNamespace(flags=flags, onnx=None)

    def create_builder_config(self):
        return _Config(self.trt)

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        self.trt.calls.append(("build", list(config.flags), dict(config.pool), config.int8_calibrator))
        session = _ort(network.onnx)
        io = [[a.name, True, _DT[a.type], [d if isinstance(d, int) else -1 for d in a.shape]] for a in session.get_inputs()]
        io += [[a.name, False, _DT[a.type], [d if isinstance(d, int) else -1 for d in a.shape]] for a in session.get_outputs()]
        return MAGIC + json.dumps({"onnx": network.onnx, "io": io, "profiles": config.profiles}).encode()


class _Runtime:
    def __init__(self, trt):
        self.trt = trt

    def deserialize_cuda_engine(self, data):
        if not data.startswith(MAGIC):
            return None  # what TensorRT does with a corrupt plan (after logging an error)
        return FakeEngine(self.trt, json.loads(data[len(MAGIC):]))


def fake_tensorrt(version: str) -> types.ModuleType:
    """A `tensorrt` module of `version` with that version's API surface."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    major = int(version.split(".")[0])
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.Runtime = lambda logger: _Runtime(trt)
    trt.Builder = lambda logger: _Builder(trt)
    trt.OnnxParser = _Parser
    trt.MemoryPoolType = _Enum(WORKSPACE=0)
    trt.DataType = _Enum(FLOAT=0, HALF=1, INT8=2, INT32=3, BOOL=4, INT64=5)
    trt.TensorIOMode = _Enum(NONE=0, INPUT=1, OUTPUT=2)
    flags = {"EXPLICIT_BATCH": 0} if major < 10 else {}
    if major >= 10:
        flags["STRONGLY_TYPED"] = 5
    trt.NetworkDefinitionCreationFlag = _Enum(**flags)
    if major < 11:
        trt.BuilderFlag = _Enum(FP16=0, INT8=1)
        base = type("IInt8Calibrator", (), {"__init__": lambda self: None})
        trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (base,), {})
        trt.IInt8MinMaxCalibrator = type("IInt8MinMaxCalibrator", (base,), {})
    else:
        trt.BuilderFlag = _Enum(DEBUG=0)  # FP16/INT8 removed in 11
    return trt
