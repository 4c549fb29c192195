"""The typed bundle manifest: what `manifest.json` holds, as frozen dataclasses.

Every class validates itself on construction and converts to and from the plain
JSON form with `to_dict()` / `from_dict()`. A bad value raises `BundleError`
naming the field (``manifest field 'modules.vision.precision': ...``) and what
would have been valid. `edgerun.bundle` re-exports all of these names.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgerun.errors import BundleError

FORMAT = "edgerun-bundle"
VERSION = 1
MANIFEST_NAME = "manifest.json"

PRECISIONS = ("fp32", "fp16", "int8")
DTYPES = (
    "float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "uint16",
    "int32", "uint32", "int64", "uint64", "bool", "string",
)


class ManifestFieldError(BundleError):
    """A manifest value is wrong; `field` is its dotted path, e.g. ``modules.vision.file``."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"manifest field '{field}': {problem}")

    def under(self, prefix: str) -> ManifestFieldError:
        return ManifestFieldError(f"{prefix}.{self.field}", self.problem)


def check_relpath(value: Any, field: str) -> str:
    """Return `value` if it is a canonical bundle-relative POSIX path, else raise.

    Valid: ``vision.onnx``, ``weights/vision.bin``. Refused: absolute paths, drive
    letters, backslashes, and ``.``, ``..`` or empty components.
    """
    rule = "paths must be relative to the bundle root and '/'-separated, e.g. 'weights/vision.bin'"
    if not isinstance(value, str) or not value:
        raise ManifestFieldError(field, f"expected a non-empty path string, got {value!r}")
    if "\\" in value or "\0" in value:
        raise ManifestFieldError(field, f"path {value!r} contains a backslash or NUL; {rule}")
    if value.startswith("/") or (len(value) > 1 and value[1] == ":"):
        raise ManifestFieldError(field, f"path {value!r} is absolute; {rule}")
    parts = value.split("/")
    if ".." in parts:
        raise ManifestFieldError(field, f"path {value!r} leaves the bundle; {rule}")
    if "" in parts or "." in parts:
        raise ManifestFieldError(field, f"path {value!r} has '.' or empty components; {rule}")
    return value


def _json_dict(value: Any, field: str) -> dict:
    """A JSON-serialisable dict with string keys (free-form manifest sections)."""
    if not isinstance(value, Mapping):
        raise ManifestFieldError(field, f"expected an object, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ManifestFieldError(field, f"must be JSON-serialisable (no NaN/inf): {exc}") from None


def _str_tuple(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ManifestFieldError(field, f"expected a list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise ManifestFieldError(field, f"expected non-empty strings, got {item!r}")
    return tuple(value)


def _keys(data: Any, field: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Check that `data` is an object with all `required` keys and nothing unknown."""
    if not isinstance(data, Mapping):
        raise ManifestFieldError(field, f"expected an object, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ManifestFieldError(field, f"missing key(s) {missing}; required: {list(required)}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        valid = list(required) + list(optional)
        raise ManifestFieldError(field, f"unknown key(s) {unknown}; valid keys: {valid}")


def _under(prefix: str, build, *args):
    try:
        return build(*args)
    except ManifestFieldError as exc:
        raise exc.under(prefix) from None


@dataclass(frozen=True)
class TensorSpec:
    """A module input or output: `shape` entries are ints or symbolic names like ``"batch"``."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ManifestFieldError("name", f"expected a non-empty string, got {self.name!r}")
        if self.dtype not in DTYPES:
            raise ManifestFieldError("dtype", f"{self.dtype!r} is not one of {list(DTYPES)}")
        if isinstance(self.shape, str) or not isinstance(self.shape, (list, tuple)):
            raise ManifestFieldError("shape", f"expected a list, got {self.shape!r}")
        for dim in self.shape:
            ok_int = isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0
            if not (ok_int or (isinstance(dim, str) and dim)):
                raise ManifestFieldError(
                    "shape", f"entry {dim!r} is neither a size >= 0 nor a symbolic name like 'batch'"
                )
        object.__setattr__(self, "shape", tuple(self.shape))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping) -> TensorSpec:
        _keys(data, "tensor", ("name", "dtype", "shape"))
        return cls(data["name"], data["dtype"], data["shape"])


def _tensors(value: Any, field: str) -> tuple[TensorSpec, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ManifestFieldError(field, f"expected a list of tensors, got {value!r}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, TensorSpec):
            item = _under(f"{field}[{i}]", TensorSpec.from_dict, item)
        out.append(item)
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ManifestFieldError(field, f"tensor names repeat: {names}")
    return tuple(out)


@dataclass(frozen=True)
class ModuleSpec:
    """One ONNX graph of the model and what it needs to run.

    `external_data` lists the bundle-relative files its weights live in; `backends`
    the backends this variant is for; `extra` is free-form module metadata such as
    a decoder's KV-cache layout.
    """

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"
    external_data: tuple[str, ...] = ()
    backends: tuple[str, ...] = ("cpu",)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_relpath(self.file, "file")
        object.__setattr__(self, "inputs", _tensors(self.inputs, "inputs"))
        object.__setattr__(self, "outputs", _tensors(self.outputs, "outputs"))
        if self.precision not in PRECISIONS:
            raise ManifestFieldError("precision", f"{self.precision!r} is not one of {list(PRECISIONS)}")
        ext = _str_tuple(self.external_data, "external_data")
        for i, path in enumerate(ext):
            check_relpath(path, f"external_data[{i}]")
        object.__setattr__(self, "external_data", ext)
        backends = _str_tuple(self.backends, "backends")
        if not backends:
            raise ManifestFieldError("backends", "must name at least one backend, e.g. ['cpu']")
        object.__setattr__(self, "backends", backends)
        object.__setattr__(self, "extra", _json_dict(self.extra, "extra"))

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "precision": self.precision,
            "external_data": list(self.external_data),
            "backends": list(self.backends),
            "extra": json.loads(json.dumps(self.extra)),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ModuleSpec:
        _keys(data, "module", ("file", "inputs", "outputs"),
              ("precision", "external_data", "backends", "extra"))
        return cls(**data)


@dataclass(frozen=True)
class TaskSpec:
    """A task the bundle serves (caption, vqa, retrieval) and the modules it runs, in order."""

    modules: tuple[str, ...]

    def __post_init__(self):
        modules = _str_tuple(self.modules, "modules")
        if not modules:
            raise ManifestFieldError("modules", "a task must run at least one module")
        object.__setattr__(self, "modules", modules)

    def to_dict(self) -> dict:
        return {"modules": list(self.modules)}

    @classmethod
    def from_dict(cls, data: Mapping) -> TaskSpec:
        _keys(data, "task", ("modules",))
        return cls(data["modules"])


@dataclass(frozen=True)
class FileEntry:
    """Size in bytes and lowercase hex sha256 of one file in the bundle."""

    sha256: str
    size: int

    def __post_init__(self):
        sha = self.sha256
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ManifestFieldError("sha256", f"expected 64 lowercase hex digits, got {sha!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ManifestFieldError("size", f"expected a byte count >= 0, got {self.size!r}")

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, data: Mapping) -> FileEntry:
        _keys(data, "file", ("sha256", "size"))
        return cls(data["sha256"], data["size"])


def _named(value: Any, field: str, cls, key_check=None) -> dict:
    """A `{name: cls}` mapping, building entries from dicts where needed."""
    if not isinstance(value, Mapping):
        raise ManifestFieldError(field, f"expected an object, got {type(value).__name__}")
    out = {}
    for name, item in value.items():
        if not isinstance(name, str) or not name:
            raise ManifestFieldError(field, f"keys must be non-empty strings, got {name!r}")
        if key_check is not None:
            key_check(name, f"{field}.{name}")
        if not isinstance(item, cls):
            item = _under(f"{field}.{name}", cls.from_dict, item)
        out[name] = item
    return out


_SECTIONS = ("preprocess", "tokenizer", "decoding", "model", "provenance")


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to run a bundle, without importing model code.

    `files` maps every bundle-relative path to its size and sha256; `BundleWriter.commit`
    fills it in. `tokenizer["file"]` and each engine's ``"file"`` are bundle paths too.
    """

    tasks: dict[str, TaskSpec]
    modules: dict[str, ModuleSpec]
    files: dict[str, FileEntry] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    engines: tuple[dict[str, Any], ...] = ()

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "tasks", _named(self.tasks, "tasks", TaskSpec))
        set_(self, "modules", _named(self.modules, "modules", ModuleSpec))
        set_(self, "files", _named(self.files, "files", FileEntry, check_relpath))
        if MANIFEST_NAME in self.files:
            raise ManifestFieldError(f"files.{MANIFEST_NAME}", "the manifest cannot list itself")
        for section in _SECTIONS:
            set_(self, section, _json_dict(getattr(self, section), section))
        if self.quantization is not None:
            set_(self, "quantization", _json_dict(self.quantization, "quantization"))
        if isinstance(self.engines, (str, Mapping)) or not isinstance(self.engines, (list, tuple)):
            raise ManifestFieldError("engines", f"expected a list of objects, got {self.engines!r}")
        set_(self, "engines", tuple(_json_dict(e, f"engines[{i}]") for i, e in enumerate(self.engines)))
        for task, spec in self.tasks.items():
            for name in spec.modules:
                if name not in self.modules:
                    raise ManifestFieldError(
                        f"tasks.{task}.modules",
                        f"module {name!r} is not defined; modules: {sorted(self.modules)}",
                    )
        for where, path in self.paths():
            check_relpath(path, where)

    def paths(self) -> tuple[tuple[str, str], ...]:
        """Every bundle path the manifest refers to, as ``(field, path)``, `files` keys excluded."""
        out = []
        for name, mod in self.modules.items():
            out.append((f"modules.{name}.file", mod.file))
            out += [(f"modules.{name}.external_data[{i}]", p) for i, p in enumerate(mod.external_data)]
        if "file" in self.tokenizer:
            out.append(("tokenizer.file", self.tokenizer["file"]))
        out += [(f"engines[{i}].file", e["file"]) for i, e in enumerate(self.engines) if "file" in e]
        return tuple(out)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        out["tasks"] = {k: v.to_dict() for k, v in self.tasks.items()}
        out["modules"] = {k: v.to_dict() for k, v in self.modules.items()}
        out["files"] = {k: self.files[k].to_dict() for k in sorted(self.files)}
        for section in _SECTIONS:
            out[section] = json.loads(json.dumps(getattr(self, section)))
        out["quantization"] = json.loads(json.dumps(self.quantization))
        out["engines"] = json.loads(json.dumps(list(self.engines)))
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> Manifest:
        if not isinstance(data, Mapping):
            raise BundleError(f"the manifest must be a JSON object, got {type(data).__name__}")
        check_format(data)
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        _keys(body, "manifest", ("tasks", "modules", "files"),
              _SECTIONS + ("quantization", "engines"))
        if isinstance(body.get("engines"), list):
            body["engines"] = tuple(body["engines"])
        return cls(**body)


def check_format(data: Mapping) -> None:
    """Refuse a manifest whose format tag or version this edge-run does not read."""
    fmt = data.get("format")
    if fmt != FORMAT:
        raise BundleError(
            f"manifest format is {fmt!r}, expected {FORMAT!r}; this is not an edge-run bundle manifest"
        )
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise BundleError(
            f"manifest version {version} is newer than this edge-run reads (version {VERSION}); "
            "a newer edge-run may read it: pip install -U edge-run"
        )
    if version != VERSION or isinstance(version, bool):
        raise BundleError(
            f"manifest version {version!r} is not supported; this edge-run reads version {VERSION}"
        )
