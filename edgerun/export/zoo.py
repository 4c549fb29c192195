"""`zoo:NAME` sources: packaged pretrained models (edgerun.models.zoo) exported into bundles.

`zoo:effnet-lite0-minilm --task retrieval` writes two graphs with the same interface as CLIP's, so the
runtime's `embed_images`/`embed_texts` serve it unchanged:
- `image_embed`: pixel_values (batch, 3, 224, 224) -> image_embeds (batch, 384): EfficientNet-Lite0's
  logits, softmax at a temperature, the top-k classes' prompt embeddings weighted by their
  probabilities (the (1000, 384) prompt matrix is a constant of the graph), normalised, centred;
- `text_embed`: input_ids, attention_mask (batch, seq) -> text_embeds (batch, 384): all-MiniLM-L6-v2,
  mean pooling over the unpadded tokens, normalised, centred. MiniLM's token_type_ids are all zero
  for one sentence, so they are a constant of the graph, not an input.

MiniLM is re-stated with BertModel's own weights rather than called (as in `retrieval.py`), and
checked at export against BertModel's forward on real sentences of other batch sizes and lengths.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..bundle import BundleWriter, sha256_file
from ..errors import OptionError
from ..manifest import Manifest, TaskSpec
from ..models import zoo
from ..runtime.preprocess import PreprocessConfig
from .onnx import EXTERNAL_DATA_BYTES, GraphSpec
from .pipeline import ExportReport, module_specs, write_graphs
from .retrieval import TEXT_AXES, _attend, _heads, _merge, _pixels, check_embeddings

# Sentences for tracing and checking the text graph: real words, so the check sees real activations.
TRACE_TEXTS = ["a dog on a porch", "two horses running across a field under a cloudy sky"]
VERIFY_TEXTS = (["a cup of coffee", "an astronaut in an orange suit holding a white helmet beside a flag",
                 "moon"], ["kites over the sea on a windy day at the beach"])


class ZeroShotImageGraph(nn.Module):
    """pixel_values (B, 3, H, W) -> image_embeds (B, D): `zoo.weight_prompts`, then centred."""

    def __init__(self, classifier: nn.Module, prompts: torch.Tensor, options: zoo.ZeroShotOptions):
        super().__init__()
        self.classifier = classifier
        self.options = options
        self.register_buffer("prompts", prompts.detach().float().contiguous())
        self.register_buffer("mean", self.prompts.mean(0) if options.center else torch.zeros(prompts.shape[1]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = zoo.weight_prompts(self.classifier(pixel_values), self.prompts, self.options)
        return zoo.centred(embeds, self.mean) if self.options.center else embeds


class MeanPoolTextGraph(nn.Module):
    """input_ids, attention_mask (B, T) -> text_embeds (B, D): BERT, mean over the unpadded tokens,
    normalised, then centred on `mean` when given."""

    def __init__(self, bert: nn.Module, mean: torch.Tensor | None):
        super().__init__()
        self.embeddings = bert.embeddings
        self.layers = bert.encoder.layer
        self.n_heads = bert.config.num_attention_heads
        self.center = mean is not None
        self.register_buffer("mean", mean.detach().float() if mean is not None else torch.zeros(0))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = emb.word_embeddings(input_ids) + emb.position_embeddings(positions)[None]
        x = emb.LayerNorm(x + emb.token_type_embeddings.weight[0])  # token type 0 everywhere
        allowed = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            a = layer.attention.self
            q, k, v = (_heads(proj(x), self.n_heads) for proj in (a.query, a.key, a.value))
            x = layer.attention.output(_merge(_attend(q, k, v, allowed)), x)
            x = layer.output(layer.intermediate(x), x)
        embeds = zoo.mean_pool(x, attention_mask)
        return zoo.centred(embeds, self.mean) if self.center else embeds


class ZooRetrievalExporter:
    """Graph specs, parity checks and manifest entries for `zoo:effnet-lite0-minilm`."""

    task = "retrieval"

    def __init__(self, model: zoo.ZooModel, options: zoo.ZeroShotOptions,
                 progress: Callable[[str], None] = lambda msg: None):
        self.model = model
        self.options = options
        self.preprocess = PreprocessConfig(**model.preprocess)
        self.image_hw = self.preprocess.crop_size
        self.classifier = zoo.load_classifier()
        self.bert, self.tokenizer = zoo.load_text_model()
        progress("embedding the 1000 class prompts with MiniLM")
        self.prompts = zoo.embed_texts(self.bert, self.tokenizer, zoo.class_prompts())
        self.mean = self.prompts.mean(0)
        self.image_graph = ZeroShotImageGraph(self.classifier, self.prompts, options).eval()
        self.text_graph = MeanPoolTextGraph(self.bert, self.mean if options.center else None).eval()

    def _tokens(self, texts: list[str]):
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=zoo.max_text_length(),
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def graphs(self) -> list[GraphSpec]:
        return [
            GraphSpec("image_embed", self.image_graph, (_pixels(self.image_hw, 2, 0),), ["pixel_values"],
                      ["image_embeds"], {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}),
            GraphSpec("text_embed", self.text_graph, self._tokens(TRACE_TEXTS), ["input_ids", "attention_mask"],
                      ["text_embeds"], {**TEXT_AXES, "text_embeds": {0: "batch"}}),
        ]

    def reference_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The torch reference: the package's EfficientNet forward, then the same weighting."""
        with torch.no_grad():
            embeds = zoo.weight_prompts(self.classifier(pixels), self.prompts, self.options)
        return zoo.centred(embeds, self.mean) if self.options.center else embeds

    def reference_texts(self, texts: list[str]) -> torch.Tensor:
        """The torch reference: BertModel's own forward, mean pooling, normalised (and centred)."""
        embeds = zoo.embed_texts(self.bert, self.tokenizer, texts)
        return zoo.centred(embeds, self.mean) if self.options.center else embeds

    def verify(self, run, atol: float | None) -> dict[str, float]:
        """Both graphs against the torch reference on batch sizes and text lengths other than the
        trace's; ExportError below cosine 0.9999. Returns the max abs diff per graph."""
        diffs = {"image_embed": 0.0, "text_embed": 0.0}
        for batch in (1, 3):
            pixels = _pixels(self.image_hw, batch, 10 + batch)
            got = run("image_embed", {"pixel_values": pixels.numpy()})["image_embeds"]
            want = self.reference_images(pixels).numpy()
            diffs["image_embed"] = max(diffs["image_embed"], check_embeddings("image_embed", got, want, atol))
        for texts in VERIFY_TEXTS:
            ids, mask = self._tokens(texts)
            got = run("text_embed", {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["text_embeds"]
            want = self.reference_texts(texts).numpy()
            diffs["text_embed"] = max(diffs["text_embed"], check_embeddings("text_embed", got, want, atol))
        return diffs

    def manifest_parts(self) -> dict:
        pad = self.tokenizer.pad_token_id
        return {
            "tasks": {"retrieval": {"modules": ["image_embed", "text_embed"]}},
            "module_extra": {"image_embed": {"role": "image_embedder"}, "text_embed": {"role": "text_embedder"}},
            "decoding": {"pad_id": pad},
            "model": {"family": "zoo-zero-shot", "architecture": "EfficientNetLite0+MiniLM-L6-v2",
                      "zoo": self.model.name, "image_size": list(self.image_hw),
                      "vocab_size": self.bert.config.vocab_size, "embedding_dim": int(self.prompts.shape[1]),
                      "max_text_length": zoo.max_text_length(), "pad_id": pad, "has_itm": False,
                      "text_pooling": "mean", "n_classes": int(self.prompts.shape[0]),
                      "zero_shot": self.options.to_dict()},
        }


def save_tokenizer(path: Path) -> None:
    """MiniLM's tokenizer.json without its fixed padding to 128 and truncation (the runtime pads to the
    longest text of a batch and truncates to the manifest's max_text_length)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(zoo.text_folder() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    tok.save(str(path), pretty=False)


def weights_digest(files: list[Path]) -> str:
    """One sha256 over the packaged weight files (as `pipeline.weights_digest` does for a folder)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _parse(source: str) -> zoo.ZooModel:
    if not source.startswith("zoo:"):
        raise OptionError(f"not a zoo source: {source!r}; valid: {', '.join(m.source for m in zoo.list_models())}")
    return zoo.get_model(source.removeprefix("zoo:"))


def _check_options(model: zoo.ZooModel, task: str, opset: int, revision: str | None) -> None:
    if task not in model.tasks:
        raise OptionError(f"zoo:{model.name} serves {', '.join(model.tasks)}, not {task!r}")
    if revision:
        raise OptionError("--revision applies to hub names; a zoo model is the installed package's version")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 14 <= opset <= 21:
        raise OptionError(f"opset must be between 14 and 21 (17 is the default), got {opset!r}")


def export_zoo(source: str, *, task: str, output: str | Path, opset: int = 17, revision: str | None = None,
               overwrite: bool = False, atol: float | None = None, external_data_bytes: int = EXTERNAL_DATA_BYTES,
               options: zoo.ZeroShotOptions | None = None,
               progress: Callable[[str], None] = lambda msg: None) -> ExportReport:
    """Export `source` (zoo:NAME, see `edge-run zoo list`) for `task` into the bundle directory `output`."""
    start = time.perf_counter()
    model = _parse(source)
    _check_options(model, task, opset, revision)
    zoo.require(model)
    progress(f"loading {', '.join(p.dist for p in model.packages)}")
    exporter = ZooRetrievalExporter(model, options if options is not None else zoo.ZeroShotOptions(), progress)
    load = time.perf_counter() - start
    report = write_bundle(exporter, output, opset=opset, overwrite=overwrite, atol=atol,
                          external_data_bytes=external_data_bytes, progress=progress)
    report.stage_seconds = {"load": load, **report.stage_seconds}
    report.seconds = time.perf_counter() - start
    return report


def write_bundle(exporter: ZooRetrievalExporter, output: str | Path, *, opset: int = 17, overwrite: bool = False,
                 atol: float | None = None, external_data_bytes: int = EXTERNAL_DATA_BYTES,
                 progress: Callable[[str], None] = lambda msg: None) -> ExportReport:
    """Export, check and write the exporter's graphs as one bundle, atomically."""
    start = time.perf_counter()
    weights = zoo.weight_files(exporter.model)
    stages: dict[str, float] = {}
    with BundleWriter(output, overwrite=overwrite) as writer:
        specs, diffs = write_graphs(exporter, writer.dir, opset=opset, external_data_bytes=external_data_bytes,
                                    atol=atol, progress=progress, stages=stages)
        save_tokenizer(writer.dir / "tokenizer.json")
        manifest = _manifest(exporter, writer.dir, specs, diffs, opset=opset, weights=weights)
        path = writer.commit(manifest)
    bundle_bytes = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    return ExportReport(Path(path), time.perf_counter() - start, diffs, bundle_bytes,
                        sum(p.stat().st_size for p in weights), stages)


def _manifest(exporter: ZooRetrievalExporter, folder: Path, specs: list[GraphSpec], diffs: dict, *,
              opset: int, weights: list[Path]) -> Manifest:
    from .hf import library_versions

    parts = exporter.manifest_parts()
    modules = module_specs(folder, specs, diffs, parts["module_extra"])
    return Manifest(
        tasks={k: TaskSpec(**v) for k, v in parts["tasks"].items()},
        modules=modules,
        preprocess=exporter.preprocess.to_dict(),
        tokenizer={"file": "tokenizer.json"},
        decoding=parts["decoding"],
        model=parts["model"],
        provenance={
            "source": exporter.model.source, "revision": None, "weights_sha256": weights_digest(weights),
            "weight_files": [p.name for p in weights], "architecture": parts["model"]["architecture"],
            "opset": opset, "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "libraries": {**library_versions(), **zoo.versions(exporter.model)},
        },
    )
