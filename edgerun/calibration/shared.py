"""One copy of the int8 weights for all the variants of a module.

The onnxruntime variant and the TensorRT variant of a module quantize each weight the same way
(symmetric int8, per output channel, the same scales), so most of their weight bytes are equal.
After both files are written, each initializer of the second whose name, type, shape and bytes
equal one the first keeps in external data is pointed at the first's data file; the second's own
data file then holds only what differs (activation scales, layers one variant keeps float). ONNX
external data is a file name, an offset and a length, so both sessions read the one file.
"""
from __future__ import annotations

import contextlib
from pathlib import Path


def _external(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _index(primary: Path) -> dict[str, tuple]:
    """{initializer name: (type, dims, location, offset, length)} of `primary`'s external weights."""
    import onnx

    model = onnx.load(str(primary), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            ext = _external(t)
            out[t.name] = (t.data_type, tuple(t.dims), ext["location"], int(ext.get("offset", 0)),
                           int(ext["length"]))
    return out


def share_weights(primary: Path, secondary: Path) -> int:
    """Rewrite `secondary` (an ONNX file with its own `.data` beside it, in `primary`'s folder) so
    that the weights it has in common with `primary` are read from `primary`'s data file.
    Returns the bytes saved."""
    import onnx

    index = _index(primary)
    model = onnx.load(str(secondary))  # weights loaded: its own data file is rewritten below
    saved = 0
    with contextlib.ExitStack() as files:
        opened: dict[str, object] = {}
        for t in model.graph.initializer:
            found = index.get(t.name)
            if found is None or (t.data_type, tuple(t.dims)) != found[:2] or not t.HasField("raw_data"):
                continue
            location, offset, length = found[2:]
            if length != len(t.raw_data):
                continue
            if location not in opened:
                opened[location] = files.enter_context(open(primary.parent / location, "rb"))
            opened[location].seek(offset)
            if opened[location].read(length) != t.raw_data:
                continue
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
            saved += length
    data = secondary.with_name(secondary.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(secondary), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    if data.exists():
        data.chmod(0o644)  # onnx writes 0600; a service account must read the bundle
    return saved
