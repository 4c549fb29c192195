"""Variants of an exported bundle's float graphs for onnxruntime's CPU provider.

Each is `NAME@cpu` (file `NAME.cpu.onnx`, reading the module's own weights file), listed for the
CPU only, while the module's own graph keeps CUDA and onnxruntime-TensorRT:

- a KV-cache decoder: self-attention as GroupQueryAttention, the cache written in place
  (edgerun.export.gqa), and its tied LM head prepacked (simplify.prepack_tied_head);
- an encoder: its unmasked self-attentions fused into com.microsoft MultiHeadAttention
  (simplify.fuse_attention), what calibrate does for the INT8 onnxruntime variant. BLIP-base's
  FP32 vision encoder: 579 -> 562 ms and 601 -> 587 ms in two alternating runs;
- for such a decoder with unmasked cross-attention, `NAME@cpu-beamsG` for one image and G beams
  (G in `beams`): the beams as the cross-attention's query heads (edgerun.export.beam_heads).

com.microsoft ops are onnxruntime's own (TensorRT parses standard ops only; the CUDA provider has
no float32 GroupQueryAttention), hence the separate files. A variant is kept only when it gives the
module's outputs within TOLERANCE of their magnitude.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .beam_heads import BEAMS, add_beam_heads
from .gqa import TOLERANCE, checked_rewrite, rewritten_dims
from .simplify import fuse_attention, prepack_tied_head

CPU_TAG = "cpu"

def add_cpu_variants(folder, modules: dict, progress=lambda msg: None, beams=BEAMS) -> dict:
    """`modules` (name -> ModuleSpec, files in `folder`) with the CPU variants above added where
    they apply; a module that gets one keeps its other backends."""
    import onnx

    from .simplify import io_specs

    out = dict(modules)
    for name, spec in modules.items():
        if "cpu" not in spec.backends:
            continue
        dims = spec.extra.get("cache")
        if dims:
            model = checked_rewrite(Path(folder) / spec.file, dims, name, progress)
            if model is not None and prepack_tied_head(model.graph):
                progress(f"{name}: the tied LM head prepacked for the CPU (the table's bytes named twice, held once)")
        else:
            model = _fused_encoder(Path(folder) / spec.file, name, progress)
        if model is None:
            continue
        file = f"{name}.{CPU_TAG}.onnx"
        onnx.save_model(model, str(Path(folder) / file))  # reads the module's own weights file
        inputs, outputs = io_specs(Path(folder) / file)
        extra = {**spec.extra, "variant_of": name}
        if dims:
            extra["cache"] = rewritten_dims(dims)
        out[name] = replace(spec, backends=tuple(b for b in spec.backends if b != "cpu"))
        out[f"{name}@{CPU_TAG}"] = replace(spec, file=file, inputs=inputs, outputs=outputs, backends=("cpu",),
                                           extra=extra)
    return add_beam_heads(folder, out, beams, progress)


def _fused_encoder(path: Path, name: str, progress):
    """`path`'s graph with its self-attentions fused (an ONNX ModelProto, weights left in external
    data), or None where there are none or the outputs move beyond TOLERANCE."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    fused = fuse_attention(model)
    if not fused:
        return None
    error = output_error(path, model.SerializeToString())
    if error > TOLERANCE:
        progress(f"{name}: attention not fused for the CPU, its outputs differ by {error:.2g} of their magnitude")
        return None
    progress(f"{name}: {fused} self-attentions fused into MultiHeadAttention for the CPU (outputs within "
             f"{error:.1g})")
    return model


def output_error(path: Path, graph: bytes) -> float:
    """The largest difference between the outputs of the graph at `path` and of `graph` (the same
    interface, its external data beside `path`) on random inputs, relative to their magnitude."""
    from ..runtime.onnxrt import OnnxRuntimeRunner

    standard = OnnxRuntimeRunner(path)  # every core: a BLIP-base vision encoder runs twice here
    other = OnnxRuntimeRunner(path, graph=graph)
    rng, feeds = np.random.default_rng(0), {}
    for arg in standard.session.get_inputs():  # dynamic dims 3; ids all ones, masks with padding
        shape = [d if isinstance(d, int) else 3 for d in arg.shape]
        if "bool" in arg.type or "int" in arg.type:
            dtype = bool if "bool" in arg.type else np.int64 if "64" in arg.type else np.int32
            value = np.ones(shape, dtype)
            if "mask" in arg.name and value.ndim == 2:  # a fusion that dropped a mask must show
                value[:, 1:] = rng.integers(0, 2, (shape[0], shape[1] - 1)).astype(dtype)
            feeds[arg.name] = value
        else:
            feeds[arg.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    want, got = standard.infer(feeds), other.infer(feeds)
    return max(float(np.abs(want[k] - got[k]).max() / max(1.0, float(np.abs(want[k]).max()))) for k in want)
