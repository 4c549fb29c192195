"""`describe`: the text `edge-run info` prints for a bundle."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from edgerun.manifest import FORMAT, VERSION, TensorSpec

if TYPE_CHECKING:
    from edgerun.bundle import Bundle


def _human(n: int) -> str:
    """A byte count as people read it: 512 B, 1.5 KiB, 3.2 GiB."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{size:.1f} {unit}"


def _flat(section: Mapping) -> str:
    if not section:
        return "(none)"
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in section.items())


def _tensor_line(kind: str, t: TensorSpec) -> str:
    return f"      {kind} {t.name}: {t.dtype}[{', '.join(str(d) for d in t.shape)}]"


def describe(bundle: Bundle) -> str:
    """The human-readable summary `edge-run info` prints."""
    m = bundle.manifest
    lines = [f"bundle {bundle.path}", f"  format: {FORMAT} version {VERSION}"]
    if m.model:
        lines.append(f"  model: {_flat(m.model)}")
    lines.append("  tasks:")
    lines += [f"    {name}: {' -> '.join(t.modules)}" for name, t in m.tasks.items()]
    lines.append("  modules:")
    for name, spec in m.modules.items():
        ext = f" + {len(spec.external_data)} external data file(s)" if spec.external_data else ""
        lines.append(f"    {name}: {spec.file}{ext}, {spec.precision}, backends {', '.join(spec.backends)}, "
                     f"{_human(bundle.module_bytes(name))}")
        lines += [_tensor_line("in ", t) for t in spec.inputs]
        lines += [_tensor_line("out", t) for t in spec.outputs]
        if spec.extra:
            lines.append(f"      extra: {_flat(spec.extra)}")
    lines.append(f"  preprocess: {_flat(m.preprocess)}")
    if m.tokenizer:
        lines.append(f"  tokenizer: {_flat(m.tokenizer)}")
    lines.append(f"  decoding: {_flat(m.decoding)}")
    lines.append(f"  provenance: {_flat(m.provenance)}")
    if m.quantization is not None:
        lines.append(f"  quantization: {_flat(m.quantization)}")
    for engine in m.engines:
        lines.append(f"  engine: {_flat(engine)}")
    lines.append(f"  total: {_human(bundle.size_bytes())} in {len(m.files) + 1} files")
    return "\n".join(lines)
