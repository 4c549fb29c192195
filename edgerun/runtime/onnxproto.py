"""Tiny ONNX models written as protobuf bytes, for the runtime's own helper graphs (the roofline's
test graphs, the device KV cache's Gather): the runtime does not depend on the onnx package.

Field numbers are those of onnx/onnx.proto: ModelProto{ir_version 1, graph 7, opset_import 8},
GraphProto{node 1, name 2, initializer 5, input 11, output 12}, NodeProto{input 1, output 2,
op_type 4, attribute 5}, TensorProto{dims 1, data_type 2, name 8, raw_data 9}.
"""
from __future__ import annotations

import numpy as np


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field_int(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(data)) + data


def value_info(name: str, elem_type: int, dims) -> bytes:
    """ValueInfoProto of a tensor; each dim an int or a symbolic name."""
    shape = b"".join(field_bytes(1, field_bytes(2, d) if isinstance(d, str) else field_int(1, d))
                     for d in dims)
    return field_bytes(1, name) + field_bytes(2, field_bytes(1, field_int(1, elem_type) + field_bytes(2, shape)))


def node(op: str, inputs: list[str], outputs: list[str], attributes: bytes = b"") -> bytes:
    ins = b"".join(field_bytes(1, name) for name in inputs)
    return ins + b"".join(field_bytes(2, name) for name in outputs) + field_bytes(4, op) + attributes


def int_attribute(name: str, value: int) -> bytes:
    """A NodeProto attribute field: AttributeProto{name 1, i 3, type 20 = INT}."""
    return field_bytes(5, field_bytes(1, name) + field_int(3, value) + field_int(20, 2))


def tensor(name: str, array: np.ndarray, data_type: int) -> bytes:
    return (b"".join(field_int(1, d) for d in array.shape) + field_int(2, data_type) + field_bytes(8, name)
            + field_bytes(9, array.tobytes()))


def model(name: str, nodes: list[bytes], inputs: list[bytes], outputs: list[bytes],
          initializers: list[bytes] = (), opset: int = 17) -> bytes:
    """ModelProto, IR version 8, the default domain at `opset`."""
    graph = (b"".join(field_bytes(1, n) for n in nodes) + field_bytes(2, name)
             + b"".join(field_bytes(5, t) for t in initializers)
             + b"".join(field_bytes(11, i) for i in inputs) + b"".join(field_bytes(12, o) for o in outputs))
    return field_int(1, 8) + field_bytes(8, field_bytes(1, "") + field_int(2, opset)) + field_bytes(7, graph)
