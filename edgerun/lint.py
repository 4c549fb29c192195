"""`edge-run validate BUNDLE --target tensorrt`: will TensorRT build the modules this bundle gives it?

The modules linted are those `edge-run engine build` reads: for each module the tasks run, its
variant for backend "tensorrt" (edgerun.runtime.variants). Each problem names the module, its file
and the offending node. Checked:
- the opset is one the target TensorRT's ONNX parser reads (`MAX_OPSET`; the target is the
  installed TensorRT, else `--trt-version`, else the oldest supported, and the report says which);
- no `com.microsoft` (or other non-standard domain) contrib ops, no `If` nodes, none of the integer
  ops of onnxruntime's own quantization (MatMulInteger, DynamicQuantizeLinear, QLinear*);
- Q/DQ is symmetric INT8: every QuantizeLinear/DequantizeLinear zero point is int8 and 0;
- every dynamic axis of every input is covered by an optimization profile (edgerun.runtime.profiles).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from packaging.version import Version

from .bundle import Bundle, open_bundle
from .errors import OptionError, require
from .runtime.profiles import uncovered_dims
from .runtime.trtapi import OLDEST, parse_version
from .runtime.variants import select_module

# The newest ONNX opset each TensorRT's parser reads, by (major, minor): from NVIDIA's support
# matrices and ONNX opset guide. A version between rows takes the row below it.
MAX_OPSET = {(8, 5): 17, (8, 6): 17, (10, 0): 19, (10, 3): 20, (11, 0): 25}
STANDARD_DOMAINS = ("", "ai.onnx")
NOT_FOR_TENSORRT = {
    "If": "an If node (TensorRT rejects data-dependent branches in the decoder's loop); re-export without it",
    "MatMulInteger": "onnxruntime's integer MatMul (dynamic quantization); TensorRT wants Q/DQ",
    "ConvInteger": "onnxruntime's integer Conv (dynamic quantization); TensorRT wants Q/DQ",
    "DynamicQuantizeLinear": "dynamic quantization, which TensorRT does not run; use the Q/DQ variant",
    "QLinearMatMul": "a QLinear op (onnxruntime's QOperator format); TensorRT wants Q/DQ",
    "QLinearConv": "a QLinear op (onnxruntime's QOperator format); TensorRT wants Q/DQ",
}
QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class LintProblem:
    module: str
    file: str
    node: str  # node name, or "graph input NAME" / "opset"
    problem: str

    def __str__(self) -> str:
        return f"{self.module} ({self.file}): {self.node}: {self.problem}"


@dataclass
class LintReport:
    target: str  # the TensorRT version linted against
    target_source: str  # "installed", "--trt-version" or "oldest supported (no TensorRT here)"
    modules: list[str] = field(default_factory=list)  # module (variant) names checked
    problems: list[LintProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def max_opset(version: Version) -> int:
    rows = [k for k in sorted(MAX_OPSET) if k <= (version.major, version.minor)]
    return MAX_OPSET[rows[-1]] if rows else MAX_OPSET[min(MAX_OPSET)]


def target_version(requested: str | None) -> tuple[Version, str]:
    from .runtime.roofline import tensorrt_version

    if requested:
        version = parse_version(requested)
        if version < OLDEST:
            raise OptionError(f"TensorRT {version} is older than edge-run supports; give --trt-version {OLDEST} or later")
        return version, "--trt-version"
    installed = tensorrt_version()
    if installed:
        return parse_version(installed), "installed"
    return OLDEST, "oldest supported (no TensorRT here)"


def lint_bundle(bundle: str | Path | Bundle, trt_version: str | None = None) -> LintReport:
    """Lint the modules a TensorRT build of `bundle` reads (see the module doc)."""
    bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    version, source = target_version(trt_version)
    report = LintReport(str(version), source)
    seen = []
    for task in bundle.manifest.tasks.values():
        for name in task.modules:
            if name not in seen:
                seen.append(name)
    for name in seen:
        variant, spec = select_module(bundle.manifest, name, "tensorrt")
        report.modules.append(variant)
        report.problems += lint_module(variant, bundle.file(spec.file), spec, version)
    return report


def lint_module(module: str, path: Path, spec, version: Version) -> list[LintProblem]:
    onnx = require("onnx", "trt")
    model = onnx.load(str(path), load_external_data=False)
    file = path.name
    out = [LintProblem(module, file, f"graph input {name}", f"dynamic axis {i} '{dim}' is covered by no "
                       "optimization profile (profile axes: batch, rows, past, new, seq)")
           for name, i, dim in uncovered_dims(spec.inputs)]
    limit = max_opset(version)
    for opset in model.opset_import:
        if opset.domain in STANDARD_DOMAINS and opset.version > limit:
            out.append(LintProblem(module, file, "opset", f"ONNX opset {opset.version}; TensorRT {version} parses "
                                   f"up to {limit}: re-export with --opset {limit}"))
    constants = _constants(model.graph, path.parent)
    for node in _nodes(model.graph):
        where = f"node {node.name or '(unnamed)'} ({node.op_type})"
        if node.domain not in STANDARD_DOMAINS:
            out.append(LintProblem(module, file, where, f"a {node.domain} contrib op, which TensorRT does not "
                                   "parse; use the variant without onnxruntime fusions"))
        elif node.op_type in NOT_FOR_TENSORRT:
            out.append(LintProblem(module, file, where, NOT_FOR_TENSORRT[node.op_type]))
        elif node.op_type in QDQ:
            problem = _zero_point_problem(node, constants)
            if problem:
                out.append(LintProblem(module, file, where, problem))
    return out


def _nodes(graph):
    """Every node, subgraphs (Loop/Scan/If bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in list(attr.g.node and [attr.g]) + list(attr.graphs):
                yield from _nodes(sub)


def _constants(graph, base: Path) -> dict:
    """Initializers and Constant outputs by name, as numpy arrays, read lazily."""
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    def read(tensor):
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(base))
        return numpy_helper.to_array(tensor)

    out = {t.name: (lambda t=t: read(t)) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = lambda t=attr.t: read(t)
    return out


def _zero_point_problem(node, constants: dict) -> str | None:
    if len(node.input) < 3 or not node.input[2]:
        if node.op_type == "QuantizeLinear":
            return "no zero point, so ONNX quantizes to uint8; TensorRT takes int8 with a zero point of 0"
        return None  # DequantizeLinear: its input's type decides, checked where it was quantized
    zp = constants.get(node.input[2])
    if zp is None:
        return f"zero point {node.input[2]} is computed at run time; TensorRT wants a constant 0"
    value = zp()
    if value.dtype != np.int8:
        return (f"zero point {node.input[2]} is {value.dtype} (asymmetric {value.dtype} quantization, "
                "onnxruntime's CPU scheme); TensorRT takes symmetric int8 Q/DQ with zero point 0")
    if np.any(value != 0):
        return f"zero point {node.input[2]} is not 0 (asymmetric); TensorRT takes symmetric Q/DQ"
    return None
