"""List the external-data files an ONNX model refers to, without the `onnx` package.

A minimal protobuf wire-format walker over the memory-mapped file. It descends
only into the messages that can hold tensors and jumps over everything else,
`raw_data` included, so a model with gigabytes of embedded weights costs a few
page reads, not a copy in memory.

Field numbers are those of onnx/onnx.proto:
  ModelProto: graph 7, training_info 20, functions 25
  TrainingInfoProto: initialization 1, algorithm 2
  FunctionProto: node 7, attribute_proto 11
  GraphProto: node 1, initializer 5, sparse_initializer 15
  NodeProto: attribute 5
  AttributeProto: t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23
  SparseTensorProto: values 1, indices 2
  TensorProto: external_data 13 (StringStringEntryProto key 1 / value 2), data_location 14
"""
from __future__ import annotations

import os

from edgerun.errors import BundleError

# message kind -> {field number: kind of the sub-message in that field}
_CHILDREN = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}

_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_EXTERNAL = 1
_MAX_DEPTH = 100


class _Malformed(Exception):
    pass


class _FileBytes:
    """Indexable bytes of a file, read through one small window.

    Not mmap: touching a mapped page per tensor header makes the kernel map its neighbourhood
    too, and a 500 MB model's scan then shows up as ~200 MB of resident memory in the process.
    """

    WINDOW = 1 << 16

    def __init__(self, fh):
        self._fh = fh
        self._start = 0
        self._data = b""

    def _load(self, pos: int) -> None:
        self._fh.seek(pos)
        self._start, self._data = pos, self._fh.read(self.WINDOW)

    def __getitem__(self, key):
        if isinstance(key, slice):
            self._fh.seek(key.start)
            return self._fh.read(key.stop - key.start)
        offset = key - self._start
        if not 0 <= offset < len(self._data):
            self._load(key)
            offset = 0
        if offset >= len(self._data):
            raise IndexError(key)
        return self._data[offset]


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """Yield ``(field_number, wire_type, value_or_start, next_pos)`` for one message's fields.

    For length-delimited fields the value is the payload's start offset and the
    payload spans ``[start, next_pos)``; other wire types are skipped.
    """
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == 2:
            length, start = _varint(buf, pos, end)
            pos = start + length
            if pos > end:
                raise _Malformed("length-delimited field runs past its message")
            yield number, wire, start, pos
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed("fixed-width field runs past its message")
        else:
            raise _Malformed(f"unsupported wire type {wire}")


def _entry(buf, start: int, end: int) -> tuple[str | None, str | None]:
    key = value = None
    for number, wire, at, nxt in _fields(buf, start, end):
        if wire == 2 and number in (1, 2):
            text = bytes(buf[at:nxt]).decode("utf-8")
            if number == 1:
                key = text
            else:
                value = text
    return key, value


def _tensor_location(buf, start: int, end: int) -> str | None:
    """The ``location`` of a TensorProto stored externally, or None."""
    location, data_location = None, 0
    for number, wire, at, nxt in _fields(buf, start, end):
        if number == _TENSOR_EXTERNAL_DATA and wire == 2:
            key, value = _entry(buf, at, nxt)
            if key == "location":
                location = value
        elif number == _TENSOR_DATA_LOCATION and wire == 0:
            data_location = at
    return location if data_location == _EXTERNAL else None


def _walk(buf, size: int) -> list[str]:
    found: list[str] = []
    saw_graph = False
    stack = [("model", 0, size, 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise _Malformed("messages nested too deeply")
        children = _CHILDREN[kind]
        for number, wire, at, nxt in _fields(buf, start, end):
            child = children.get(number)
            if child is None:
                continue
            if wire != 2:
                raise _Malformed(f"field {number} of a {kind} message is not a message")
            saw_graph = saw_graph or (kind == "model" and child == "graph")
            if child == "tensor":
                location = _tensor_location(buf, at, nxt)
                if location is not None and location not in found:
                    found.append(location)
            else:
                stack.append((child, at, nxt, depth + 1))
    if not saw_graph:
        raise _Malformed("no graph")
    return found


def external_data_locations(path: str | os.PathLike[str]) -> list[str]:
    """Return the distinct external-data ``location`` strings of the ONNX model at `path`.

    Locations are returned as written in the model (relative to the model's
    directory, in the order first seen), for tensors whose data_location is
    EXTERNAL: graph initializers, tensors in node attributes, sparse tensors,
    subgraphs, functions and training-info graphs.
    Raises BundleError if the file is empty or not parseable as an ONNX model.
    """
    bad = f"{os.fspath(path)} is empty or not an ONNX model"
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise BundleError(f"{bad} (the file has 0 bytes); re-export it")
        try:
            return _walk(_FileBytes(fh), size)
        except (_Malformed, UnicodeDecodeError) as exc:
            raise BundleError(f"{bad} ({exc}); re-export it") from None
