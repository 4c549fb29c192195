"""From statistics to files: which layers of each module get INT8, the variant files, their specs.

Every quantized module gets two variants, each naming the backends it is for:
- `NAME` (the module the tasks name): the onnxruntime CPU variant, backends ["cpu", "cuda"]:
  U8S8 Q/DQ on the linear layers (a projection with a bias as one MatMulIntegerToFloat) and
  self-attention fused into onnxruntime's MultiHeadAttention for encoders, block-wise (or dynamic)
  INT8 weights for decoders;
- `NAME@tensorrt`: symmetric S8 Q/DQ with standard ops only, backends ["tensorrt", "ort-trt"].
`--fp16` instead adds `NAME@fp16` (backends ["cuda", "tensorrt", "ort-trt"]) beside the float
module, which keeps the CPU. `edgerun.runtime.variants.select_module` picks one per backend.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..export.gqa import CACHE_TYPE as GQA_CACHE
from ..export.gqa import checked_rewrite, rewritten_dims
from ..export.simplify import prepack_tied_head
from ..manifest import ModuleSpec
from .blockwise import MIN_ONNXRUNTIME
from .nodes import HEAD_REASON, Target, calibration_view, find_targets, float_nodes, load_model
from .shared import share_weights
from .stats import Range

CPU_BACKENDS = ("cpu", "cuda")
TRT_BACKENDS = ("tensorrt", "ort-trt")
TRT_TAG = "tensorrt"
FP16_TAG = "fp16"
CUDA_TAG = "cuda"  # a decoder's standard-op graph for onnxruntime's CUDA provider, beside a GQA CPU one
# what a variant's file needs beyond the runtime's own minimum (checked when a session is made)
REQUIRES = {"blockwise-int8": {"onnxruntime": MIN_ONNXRUNTIME}}


@dataclass
class ModulePlan:
    """A module of the float bundle and the fate of its linear layers."""

    name: str
    spec: ModuleSpec
    path: Path  # its float ONNX file
    targets: list[Target]
    kept: dict[str, str] = field(default_factory=dict)  # node -> why it stays float

    @property
    def role(self) -> str | None:
        return self.spec.extra.get("role")

    @property
    def decoder(self) -> bool:
        return self.role == "decoder" or "cache" in self.spec.extra

    @property
    def quantized(self) -> list[Target]:
        return [t for t in self.targets if t.node not in self.kept]


@dataclass(frozen=True)
class Variant:
    """One written module file: `module` is its manifest name (`NAME` or `NAME@TAG`)."""

    module: str
    base: str
    file: str  # bundle-relative
    backends: tuple[str, ...]
    scheme: str  # "u8s8-qdq", "s8s8-qdq", "blockwise-int8", "dynamic-int8" or "fp16"
    precision: str
    layers: int  # layers quantized (fp16: nodes kept in float32)
    fused_attention: int = 0  # self-attentions fused into com.microsoft MultiHeadAttention
    centred: int = 0  # activations quantized centred (the TensorRT variant; qdq.py)
    cache: str | None = None  # a decoder's cache type when it is not its float module's ("gqa")

    def to_dict(self) -> dict:
        out = {"file": self.file, "backends": list(self.backends), "scheme": self.scheme, "layers": self.layers}
        if self.fused_attention:
            out["fused_attention"] = self.fused_attention
        if self.centred:
            out["centred_activations"] = self.centred
        if self.cache:
            out["cache"] = self.cache
        return out


def plan_modules(bundle, patterns, extra_float: Mapping[str, Mapping[str, str]] = {}) -> dict[str, ModulePlan]:
    """A plan per module that the bundle's tasks run, in task order."""
    import onnx

    plans = {}
    for task in bundle.manifest.tasks.values():
        for name in task.modules:
            if name in plans:
                continue
            spec = bundle.module(name)
            path = bundle.file(spec.file)
            graph = onnx.load(str(path), load_external_data=False).graph
            calibration_view(graph)
            targets = find_targets(graph)
            kept = float_nodes(name, graph, spec.extra.get("role"), targets, patterns, extra_float.get(name, {}))
            plans[name] = ModulePlan(name, spec, path, targets, kept)
    return plans


def _save(model, dst: Path) -> None:
    import onnx

    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    data = dst.with_name(dst.name + ".data")
    if data.exists():
        data.chmod(0o644)  # onnx writes 0600; a service account must read the bundle


def write_static(plan: ModulePlan, ranges: Mapping[str, Range], dst: Path, scheme: str, per_channel: bool,
                 means: Mapping | None = None, codes: Mapping | None = None) -> tuple[int, int, int]:
    """Write `plan`'s module with Q/DQ on its quantized layers to `dst`; returns the layer count,
    the number of self-attentions fused (the onnxruntime variant only: `fuse_attention`) and of
    activations quantized centred (the TensorRT variant only: `qdq.centred_tensors`).
    `means`: per-channel input means of its convolutions, for bias correction (qdq.py); `codes`:
    int8 weights rounded by gptq.py."""
    from ..export.simplify import fuse_attention
    from .qdq import centred_tensors, insert_qdq, integer_matmuls

    model = load_model(plan.path)
    calibration_view(model.graph)
    centred = len(centred_tensors(model.graph, plan.quantized, ranges)) if scheme == "tensorrt" else 0
    count = insert_qdq(model, plan.quantized, ranges, scheme=scheme, per_channel=per_channel, means=means,
                       codes=codes)
    fused = fuse_attention(model) if scheme == "cpu" else 0  # TensorRT parses standard ops only
    if scheme == "cpu":
        integer_matmuls(model)  # the projections' biases inside onnxruntime's integer kernel
    _save(model, dst)
    return count, fused, centred


def head_targets(plan: ModulePlan) -> list[Target]:
    """The output-head layers that stay float by default (the LM head of a decoder)."""
    return [t for t in plan.targets if plan.kept.get(t.node) == HEAD_REASON]


def write_decoder(plan: ModulePlan, dst: Path, per_channel: bool, head: bool = False,
                  scheme: str = "blockwise") -> int:
    """The decoder's onnxruntime variant (decoder.py, blockwise.py); `head`: its LM head INT8 too."""
    from .decoder import write_decoder as write

    return write(plan.path, dst, plan.quantized + (head_targets(plan) if head else []), scheme=scheme,
                 per_channel=per_channel)


def write_gqa(plan: ModulePlan, out_dir: Path, cpu_file: str, progress: Callable[[str], None]) -> str | None:
    """Give the decoder's onnxruntime CPU variant `cpu_file` GroupQueryAttention self-attention
    (edgerun.export.gqa: ~20 kernels a layer become one, the cache written in place). The graph as
    written moves to `NAME.int8-cuda.onnx` for onnxruntime's CUDA provider, which has no float32
    GroupQueryAttention; both graphs read the one weights file. Done only when the float decoder,
    rewritten the same way, gives its logits within 1e-4 over a prompt, steps and a reorder; returns
    the standard graph's new file name, or None (the variant stays as written)."""
    import onnx

    model = checked_rewrite(plan.path, plan.spec.extra.get("cache") or {}, plan.name, progress,
                            graph=out_dir / cpu_file)
    if model is None:
        return None
    standard = f"{plan.name}.int8-{CUDA_TAG}.onnx"
    prepack_tied_head(model.graph)  # a head left float: prepacked, its table still held once
    (out_dir / cpu_file).replace(out_dir / standard)  # its weights stay in cpu_file's data file
    onnx.save_model(model, str(out_dir / cpu_file))  # the same external data, read by both graphs
    return standard


def write_int8(plan: ModulePlan, ranges: Mapping[str, Range] | None, out_dir: Path, per_channel: bool,
               progress: Callable[[str], None] = lambda msg: None, means: Mapping | None = None,
               int8_head: bool = False, codes: Mapping | None = None, tensorrt: bool = True,
               decoder_scheme: str = "blockwise") -> list[Variant]:
    """The CPU and TensorRT variants of one module, written into `out_dir`. A decoder without
    statistics (calibrated on no samples) gets no TensorRT variant; another module without them
    (one the calibration runs never reach) none at all: it stays float. `int8_head`: a decoder's
    onnxruntime variant quantizes its LM head too; `decoder_scheme`: its weights block-wise
    (MatMulNBits) or dynamic (MatMulInteger). `tensorrt=False`: no TensorRT variant (a bundle for
    onnxruntime alone, a third smaller)."""
    variants = []
    if not plan.decoder and not ranges:
        progress(f"{plan.name}: stays float (the calibration runs did not reach it)")
        return variants
    cpu_file = f"{plan.name}.int8.onnx"
    if plan.decoder:
        n = write_decoder(plan, out_dir / cpu_file, per_channel, head=int8_head, scheme=decoder_scheme)
        standard = write_gqa(plan, out_dir, cpu_file, progress)
        scheme = f"{decoder_scheme}-int8"
        if standard:
            variants.append(Variant(plan.name, plan.name, cpu_file, ("cpu",), scheme, "int8", n, cache=GQA_CACHE))
            variants.append(Variant(f"{plan.name}@{CUDA_TAG}", plan.name, standard, ("cuda",), scheme, "int8", n))
        else:
            variants.append(Variant(plan.name, plan.name, cpu_file, CPU_BACKENDS, scheme, "int8", n))
    else:
        n, fused, _ = write_static(plan, ranges, out_dir / cpu_file, "cpu", per_channel, means, codes)
        variants.append(Variant(plan.name, plan.name, cpu_file, CPU_BACKENDS, "u8s8-qdq", "int8", n, fused))
    if ranges and tensorrt:
        trt_file = f"{plan.name}.int8-{TRT_TAG}.onnx"
        n, _, centred = write_static(plan, ranges, out_dir / trt_file, "tensorrt", per_channel, means, codes)
        share_weights(out_dir / cpu_file, out_dir / trt_file)  # the int8 weights both read, stored once
        variants.append(Variant(f"{plan.name}@{TRT_TAG}", plan.name, trt_file, TRT_BACKENDS, "s8s8-qdq", "int8", n,
                                centred=centred))
    written = ", ".join(f"{v.module}: {v.layers}" + (f" + {v.fused_attention} attentions fused" if v.fused_attention
                                                      else "")
                        + (f" + {v.centred} inputs centred" if v.centred else "")
                        for v in variants)  # what each file really holds
    progress(f"{plan.name}: {len(plan.quantized)} of {len(plan.targets)} linear layers INT8, "
             f"{len(plan.kept)} kept float (layers written: {written})")
    return variants


def write_fp16(plan: ModulePlan, out_dir: Path) -> Variant:
    from .fp16 import FP16_BACKENDS, convert_fp16

    file = f"{plan.name}.fp16.onnx"
    kept = convert_fp16(plan.path, out_dir / file)
    return Variant(f"{plan.name}@{FP16_TAG}", plan.name, file, FP16_BACKENDS, "fp16", "fp16", kept)


def module_specs(modules: Mapping[str, ModuleSpec], variants: Mapping[str, list[Variant]]) -> dict[str, ModuleSpec]:
    """The output manifest's modules: each float module, or its variants in its place (the one
    named like the module first). A float module kept beside FP16 variants serves the CPU only."""
    out = {}
    for name, spec in modules.items():
        if _float_variant_of_replaced(name, spec, variants):
            continue  # the float bundle's own variant of a module the new variants replace
        mine = variants.get(name, [])
        if not any(v.module == name for v in mine):
            out[name] = replace(spec, backends=("cpu",)) if mine else spec
        for v in mine:
            extra = dict(spec.extra)
            if v.module != name:
                extra["variant_of"] = name
            if v.scheme in REQUIRES:
                extra["requires"] = dict(REQUIRES[v.scheme])
            if v.cache == GQA_CACHE:
                extra["cache"] = rewritten_dims(extra.get("cache", {}))
            out[v.module] = replace(spec, file=v.file, external_data=(), precision=v.precision,
                                    backends=v.backends, extra=extra)
    return out


def _float_variant_of_replaced(name: str, spec: ModuleSpec, variants: Mapping[str, list[Variant]]) -> bool:
    """Whether `name` is a variant in the float bundle (an exported decoder's `NAME@cpu`) of a module
    that gets variants of its own here: the new set replaces it."""
    base = spec.extra.get("variant_of")
    return bool(base) and base != name and any(v.module == base for v in variants.get(base, []))


def replaced_files(modules: Mapping[str, ModuleSpec], variants: Mapping[str, list[Variant]]) -> set[str]:
    """Files of the float bundle that the variants replace (so they are not copied)."""
    replaced = {name for name, mine in variants.items() if any(v.module == name for v in mine)}
    replaced |= {name for name, spec in modules.items() if _float_variant_of_replaced(name, spec, variants)}

    def files(spec: ModuleSpec) -> set[str]:
        return {spec.file, *spec.external_data}

    kept = set().union(*(files(s) for n, s in modules.items() if n not in replaced))
    return set().union(*(files(modules[n]) for n in replaced)) - kept
