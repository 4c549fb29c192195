"""`edge-run export`: source -> graphs -> parity check -> bundle, written atomically.

Nothing is written at the destination until every graph has been exported and checked against
torch; a failure at any step leaves no bundle (the temporary directory is removed).
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..bundle import BundleWriter
from ..manifest import Manifest, ModuleSpec, TaskSpec
from ..runtime.onnxrt import OnnxRuntimeRunner
from ..runtime.preprocess import PreprocessConfig
from . import hf
from .onnx import EXTERNAL_DATA_BYTES, export_graph
from .simplify import io_specs


@dataclass
class ExportReport:
    path: Path
    seconds: float
    max_abs_diff: dict[str, float]
    bundle_bytes: int
    source_bytes: int
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _exporter(architecture: str, task: str, model):
    """The exporter of (architecture, task), from `hf.EXPORTERS`.

    An exporter has `image_hw`; `graphs() -> list[GraphSpec]`; `verify(run, atol) -> {graph: max abs
    diff}`, which runs the written ONNX graphs through `run(name, feeds) -> outputs` on shapes other
    than the trace's and compares them with the torch model; and `manifest_parts(tokenizer) -> dict`
    with the manifest's "tasks", "module_extra" (per graph), "decoding" and "model" entries.
    """
    import importlib

    module, cls = hf.EXPORTERS[architecture][task].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)(model)


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))


def _source_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in _weight_files(folder))


def weights_digest(folder: Path) -> str:
    """One sha256 over the checkpoint's weight files: the identity of the embedding model, which a
    quantized or FP16 twin exported from the same checkpoint shares (indexes compare it)."""
    import hashlib

    from ..bundle import sha256_file

    digest = hashlib.sha256()
    for path in _weight_files(folder):
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def write_graphs(exporter, folder: Path, *, opset: int, external_data_bytes: int, atol: float | None,
                 progress: Callable[[str], None], stages: dict[str, float]) -> tuple[list, dict[str, float]]:
    """Every graph of `exporter` traced into `folder`, then checked against torch on new shapes by
    the exporter's own `verify`. Returns the specs and the max abs diff per graph."""
    t = time.perf_counter()
    specs = exporter.graphs()
    for spec in specs:
        progress(f"exporting {spec.name}")
        export_graph(spec, folder / f"{spec.name}.onnx", opset=opset, external_data_bytes=external_data_bytes)
    stages["export"] = time.perf_counter() - t
    t = time.perf_counter()
    progress("checking every graph against torch on new shapes")
    diffs = _verify(exporter, folder, specs, atol)
    stages["verify"] = time.perf_counter() - t
    progress("parity: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return specs, diffs


def module_specs(folder: Path, specs, diffs: dict[str, float], module_extra: dict,
                 progress: Callable[[str], None] = lambda msg: None, default_beams: int = 1) -> dict[str, ModuleSpec]:
    """Manifest entries of the written graphs: interface read back from the files, the exporter's
    metadata per graph, and the measured parity; a KV-cache decoder and an encoder with
    self-attention also get their onnxruntime CPU variants (edgerun.export.cpu_variants), a decoder
    one per beam count of `beam_heads.beam_counts(default_beams)`."""
    from .beam_heads import beam_counts
    from .cpu_variants import add_cpu_variants

    modules = {}
    for spec in specs:
        inputs, outputs = io_specs(folder / f"{spec.name}.onnx")
        modules[spec.name] = ModuleSpec(file=f"{spec.name}.onnx", inputs=inputs, outputs=outputs,
                                        precision="fp32", backends=("cpu", "cuda", "ort-trt"),
                                        extra={**module_extra.get(spec.name, {}),
                                               "max_abs_diff": diffs.get(spec.name)})
    return add_cpu_variants(folder, modules, progress, beam_counts(default_beams))


def _verify(exporter, folder: Path, specs, atol: float | None) -> dict[str, float]:
    """The exporter's parity checks, run on the written ONNX files; the sessions close on return."""
    runners = {s.name: OnnxRuntimeRunner(folder / f"{s.name}.onnx", threads=1) for s in specs}
    return exporter.verify(lambda name, feeds: runners[name].infer(feeds), atol)


def _check_image_size(preprocess: PreprocessConfig, model_hw: tuple, ckpt) -> None:
    """The processor must produce what the vision graph takes; a mismatch would fail at run time."""
    out_hw = preprocess.crop_size if preprocess.resize_mode == "shortest_edge" else preprocess.size
    if tuple(out_hw) != tuple(model_hw):
        from ..errors import ExportError

        raise ExportError(f"{ckpt.folder}: the image processor makes {out_hw[0]}x{out_hw[1]} images but the "
                          f"vision model takes {model_hw[0]}x{model_hw[1]}; fix preprocessor_config.json")


def export(source: str, *, task: str, output: str | Path, opset: int = 17, revision: str | None = None,
           overwrite: bool = False, atol: float | None = None, external_data_bytes: int = EXTERNAL_DATA_BYTES,
           progress: Callable[[str], None] = lambda msg: None) -> ExportReport:
    """Export `source` (hf:NAME_OR_DIR, zoo:NAME or ckpt:PATH) for `task` into the bundle directory
    `output`. A built-in checkpoint (ckpt:) also takes task "all": every head in one bundle."""
    if source.startswith("ckpt:"):
        from .builtin import export_checkpoint

        return export_checkpoint(source, task=task, output=output, opset=opset, revision=revision,
                                 overwrite=overwrite, atol=atol, external_data_bytes=external_data_bytes,
                                 progress=progress)
    if source.startswith("zoo:"):
        from .zoo import export_zoo

        return export_zoo(source, task=task, output=output, opset=opset, revision=revision, overwrite=overwrite,
                          atol=atol, external_data_bytes=external_data_bytes, progress=progress)
    if not isinstance(opset, int) or not 14 <= opset <= 21:
        from ..errors import OptionError

        raise OptionError(f"opset must be between 14 and 21 (17 is the default), got {opset!r}")
    start = time.perf_counter()
    stages: dict[str, float] = {}
    hf.check_task_name(task)
    ckpt = hf.resolve(source, revision)
    hf.check_task(ckpt, task)
    progress(f"loading {ckpt.architecture} from {ckpt.folder}")
    t = time.perf_counter()
    model = hf.load_model(ckpt)
    preprocess = PreprocessConfig.from_hf(ckpt.folder)
    exporter = _exporter(ckpt.architecture, task, model)
    _check_image_size(preprocess, exporter.image_hw, ckpt)
    stages["load"] = time.perf_counter() - t
    with BundleWriter(output, overwrite=overwrite) as writer:
        specs, diffs = write_graphs(exporter, writer.dir, opset=opset, external_data_bytes=external_data_bytes,
                                    atol=atol, progress=progress, stages=stages)
        tokenizer = hf.save_tokenizer(ckpt, writer.dir / "tokenizer.json")
        parts = exporter.manifest_parts(tokenizer)
        generation = hf.generation_defaults(ckpt)
        modules = module_specs(writer.dir, specs, diffs, parts["module_extra"], progress,
                               int(generation.get("num_beams") or 1))
        decoding = {**parts["decoding"], "generation": generation}
        manifest = Manifest(
            tasks={k: TaskSpec(**v) for k, v in parts["tasks"].items()},
            modules=modules,
            preprocess=preprocess.to_dict(),
            tokenizer={"file": "tokenizer.json"},
            decoding=decoding,
            model=parts["model"],
            provenance={
                "source": source, "revision": ckpt.revision, "folder": str(ckpt.folder),
                "weights_sha256": weights_digest(ckpt.folder), "architecture": ckpt.architecture,
                "opset": opset, "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "libraries": hf.library_versions(),
            },
        )
        path = writer.commit(manifest)
    bundle_bytes = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    return ExportReport(Path(path), time.perf_counter() - start, diffs, bundle_bytes, _source_bytes(ckpt.folder),
                        stages)
