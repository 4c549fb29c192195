"""Hugging Face checkpoints as edge-run sources: `hf:NAME_OR_DIR`.

A source resolves to a local folder (a `save_pretrained` folder, or the hub snapshot for a name),
whose config names the architecture. Everything the runtime needs besides the graphs (tokenizer,
special ids, image processor settings, generation defaults) is read here from the folder's files,
without instantiating image processors (BlipImageProcessor needs torchvision).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError, OptionError, UnsupportedModelError

# architecture -> {task: "module:ExporterClass"} (modules under edgerun.export, imported when used)
EXPORTERS: dict[str, dict[str, str]] = {
    "BlipForConditionalGeneration": {"caption": "blip:BlipCaptionExporter"},
    "BlipForQuestionAnswering": {"vqa": "blip_vqa:BlipVqaExporter"},
    "BlipForImageTextRetrieval": {"retrieval": "retrieval:BlipRetrievalExporter"},
    "CLIPModel": {"retrieval": "retrieval:ClipRetrievalExporter"},
    "VisionEncoderDecoderModel": {"caption": "vision_encoder_decoder:VisionEncoderDecoderExporter"},
}
SUPPORTED: dict[str, tuple[str, ...]] = {arch: tuple(tasks) for arch, tasks in EXPORTERS.items()}
TASKS = ("caption", "vqa", "retrieval")


@dataclass(frozen=True)
class HFCheckpoint:
    spec: str  # what the user wrote, e.g. "hf:Salesforce/blip-image-captioning-base"
    folder: Path
    revision: str | None
    config: dict

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise UnsupportedModelError(
                f"{self.folder}/config.json names no architecture; supported: {supported_list()}")
        return archs[0]


def supported_list() -> str:
    return ", ".join(f"{a} ({'/'.join(t)})" for a, t in SUPPORTED.items())


def resolve(source: str, revision: str | None = None) -> HFCheckpoint:
    """`hf:NAME_OR_DIR` -> a local checkpoint folder with its config read."""
    if not source.startswith("hf:") or len(source) == 3:
        raise OptionError(f"unknown source {source!r}; valid: hf:HUB_NAME, hf:LOCAL_FOLDER, zoo:NAME "
                          "(edge-run zoo list) or ckpt:PATH (edge-run train)")
    name = source[3:]
    folder = Path(name).expanduser()
    if folder.exists():
        if revision:
            raise OptionError("--revision applies to hub names, not to local folders")
        if not folder.is_dir():
            raise ExportError(f"{folder} is a file; a Hugging Face source is a folder from save_pretrained")
    else:
        folder = _download(name, revision)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{folder} has no config.json; is it a save_pretrained folder?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ExportError(f"{config_file} is not valid JSON: {exc}") from exc
    return HFCheckpoint(source, folder.resolve(), revision, config)


def _download(name: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # transformers depends on it, so this means a broken install
        raise ExportError("huggingface_hub is needed to fetch hub models: pip install 'edge-run[export]'") from exc
    try:
        path = snapshot_download(
            name, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"])
    except Exception as exc:  # hub errors have many types; the message is what users need
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"could not fetch {name!r} from the Hugging Face hub"
                          f"{f' at revision {revision}' if revision else ''}: {first}; "
                          "pass a local folder (hf:/path/to/folder) when offline") from exc
    return Path(path)


def check_task_name(task: str) -> None:
    if task not in TASKS:
        raise OptionError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")


def check_task(ckpt: HFCheckpoint, task: str) -> None:
    check_task_name(task)
    arch = ckpt.architecture
    if arch not in SUPPORTED:
        raise UnsupportedModelError(f"architecture {arch} is not supported; supported: {supported_list()}")
    if task not in SUPPORTED[arch]:
        raise UnsupportedModelError(
            f"{arch} cannot be exported for task {task!r}; it serves: {', '.join(SUPPORTED[arch])}")


def load_model(ckpt: HFCheckpoint):
    """The torch model in float32 and eval mode (fp16/bf16 checkpoints are upcast)."""
    import torch
    import transformers

    cls = getattr(transformers, ckpt.architecture)
    try:
        # eager attention traces to MatMul -> Mul -> Softmax -> MatMul, the form `fuse_attention`
        # turns into one MultiHeadAttention; SDPA's trace scales q and k apart and adds a Reshape
        model = cls.from_pretrained(str(ckpt.folder), dtype=torch.float32, attn_implementation="eager")
    except Exception as exc:
        raise ExportError(f"could not load {ckpt.spec} as {ckpt.architecture}: {exc}") from exc
    return model.float().eval()


def save_tokenizer(ckpt: HFCheckpoint, path: Path):
    """Write the checkpoint's tokenizer, added tokens included, as one tokenizer.json."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt.folder))
    except Exception as exc:
        raise ExportError(f"could not load the tokenizer of {ckpt.spec}: {exc}") from exc
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"the tokenizer of {ckpt.spec} ({type(tok).__name__}) has no tokenizer.json form")
    backend.save(str(path), pretty=False)  # read by machines: a quarter smaller than the indented form
    return tok


GENERATION_KEYS = ("num_beams", "max_length", "max_new_tokens", "min_length", "min_new_tokens",
                   "length_penalty", "early_stopping", "no_repeat_ngram_size", "repetition_penalty",
                   "num_return_sequences")


def generation_defaults(ckpt: HFCheckpoint) -> dict:
    """The generation config's decoding options (max_length/min_length count the prompt, as in HF)."""
    from transformers import GenerationConfig

    if (ckpt.folder / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(ckpt.folder))
    else:
        gen = GenerationConfig()
    return {k: getattr(gen, k) for k in GENERATION_KEYS if getattr(gen, k, None) is not None}


def library_versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("edge-run", "torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
