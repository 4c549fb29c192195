"""torch module -> ONNX file, one graph at a time, then checks on the file.

Steps are small and named for what they turn into what: `export_graph` writes a file from a torch
module, `check_graph` refuses what the runtime and TensorRT cannot use (`simplify.io_specs` reads
the interface back for the manifest), `compare` measures an ONNX graph against its torch reference.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from .simplify import drop_dead_nodes, fold_reshape_shapes, gemm_as_matmul, share_tied_head, unflatten_matmuls

# Ops that TensorRT rejects inside decode loops or that hide cache branches.
FORBIDDEN_OPS = {"If", "Loop", "Scan"}
# Above this many bytes of weights a module keeps them in `<file>.data` beside it. By default
# always: onnxruntime then reads the weights straight from the file instead of parsing them out of
# one protobuf string, which measured 843 -> 603 MB resident for BLIP-base's decoder session (and
# protobuf's 2 GB limit is near for large decoders).
EXTERNAL_DATA_BYTES = 0


@dataclass
class GraphSpec:
    """A torch module to export, with trace inputs and the names and dynamic axes of its interface."""

    name: str
    module: torch.nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


def export_graph(spec: GraphSpec, path: Path, *, opset: int = 17,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES) -> Path:
    """Trace `spec.module` to `path` with the TorchScript exporter (fast, predictable graphs)."""
    import onnx

    spec.module.eval()  # the exporter restores the wrapper's training flag onto the whole tree
    tmp = path.with_name(path.name + ".raw")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            spec.module, spec.args, str(tmp), dynamo=False, opset_version=opset,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes, do_constant_folding=True)
        outputs = spec.module(*spec.args)
    model = onnx.load(str(tmp))
    _fix_static_output_dims(model, spec, outputs if isinstance(outputs, tuple) else (outputs,))
    for leftover in tmp.parent.glob(tmp.name + "*"):
        leftover.unlink()
    for stray in [p for p in tmp.parent.iterdir() if p.suffix == "" and p.name.startswith("onnx__")]:
        stray.unlink()  # the legacy exporter's external-data files of >2 GB models
    check_graph(model, spec.name)
    if fold_reshape_shapes(model.graph):
        drop_dead_nodes(model.graph)
    gemm_as_matmul(model.graph)
    unflatten_matmuls(model)  # GPT-2's Conv1D: no flatten / unflatten Reshapes around each product
    share_tied_head(model.graph)  # the embedding table held once in onnxruntime's memory, not twice
    short_tensor_names(model.graph)
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    if weights > external_data_bytes:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        data = path.with_name(path.name + ".data")
        if data.exists():  # none when every initializer is under the threshold
            data.chmod(path.stat().st_mode & 0o777)  # onnx writes it 0600; a service account must read it
    else:
        onnx.save_model(model, str(path))
    return path


def _fix_static_output_dims(model, spec: GraphSpec, outputs: tuple) -> None:
    """Output dims the exporter could not infer get invented names; the ones that are not declared
    dynamic are static, so record their traced size instead."""
    for value, traced in zip(model.graph.output, outputs):
        dynamic = spec.dynamic_axes.get(value.name, {})
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis not in dynamic and not dim.HasField("dim_value"):
                dim.dim_value = int(traced.shape[axis])


def short_tensor_names(graph) -> None:
    """Rename the intermediate tensors of `graph` `t0`, `t1`, ... in node order. The exporter names
    them after the module path (`/text_decoder/bert/encoder/layer.0/.../MatMul_output_0`), which
    made up half of a graph file; node names, graph inputs/outputs and initializers keep theirs."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    renamed: dict[str, str] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        for i, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = node.output[i] = f"t{len(renamed)}"
    for value in graph.value_info:
        value.name = renamed.get(value.name, value.name)


def check_graph(model, name: str) -> None:
    """Refuse cache branches and duplicated weights (each costs a copy read on every step)."""
    ops = {n.op_type for n in model.graph.node}
    if ops & FORBIDDEN_OPS:
        raise ExportError(f"graph {name} contains {sorted(ops & FORBIDDEN_OPS)} nodes, which TensorRT "
                          "rejects in decode loops; the export wrapper must avoid them")
    seen: dict[str, str] = {}
    for t in model.graph.initializer:
        if len(t.raw_data) < 1 << 16:
            continue
        digest = hashlib.sha256(t.raw_data).hexdigest()
        if digest in seen:
            raise ExportError(f"graph {name} stores the weights {seen[digest]} and {t.name} twice")
        seen[digest] = t.name


def compare(name: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float) -> float:
    """Max abs diff over matching outputs; ExportError when above `atol` or shapes differ."""
    worst = 0.0
    for key, ref in want.items():
        out = got[key]
        if out.shape != ref.shape:
            raise ExportError(f"{name}: output {key} has shape {out.shape}, torch gives {ref.shape}")
        if ref.size:
            worst = max(worst, float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()))
    if not worst <= atol:
        raise ExportError(f"{name}: ONNX output differs from torch by {worst:.3g} (tolerance {atol:g}); "
                          "the export is wrong, no bundle was written")
    return worst
