"""Built-in trainable families, small enough to train on a CPU in minutes.

    from edgerun.models.families import build_model, build_tokenizer, list_models, save_checkpoint

    tok = build_tokenizer(captions + questions + answers)
    model = build_model("tiny-vit-all", vocab_size=tok.vocab_size, answers=answer_set)
    loss = model.loss({"images": ..., "caption_ids": ..., "question_ids": ..., "answer_ids": ...})
    save_checkpoint(model, "run/best.pt", tokenizer=tok)
    # edge-run export ckpt:run/best.pt --task all -o bundle

Families: "lstm" (`LstmCaptioner`, CNN + LSTM) and "transformer" (`MultimodalModel`). Architectures
are JSON configs in `edgerun/models/configs/`, listed by `list_models()`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from ...errors import OptionError
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import list_models, model_config
from .tokenizer import WordTokenizer, build_tokenizer

FAMILIES = ("lstm", "transformer")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_model(config: str | Mapping, *, vocab_size: int | None = None,
                answers: Sequence[str] | None = None):
    """A model from a registry name or a config dict.

    vocab_size : the tokenizer's (required unless the config records it, as a checkpoint's does).
    answers : the answer set of a VQA classifier head, in label order.
    """
    if isinstance(config, str):
        name = config
        config = model_config(name)
        config["name"] = name
    config = dict(config)
    vocab_size = config.get("vocab_size") if vocab_size is None else vocab_size
    if not isinstance(vocab_size, int) or vocab_size < 5:
        raise OptionError(f"vocab_size must be an integer >= 5 (4 special tokens and a word), "
                          f"got {vocab_size!r}")
    family = config.get("family")
    if family == "lstm":
        from .lstm import LstmCaptioner

        if answers:
            raise OptionError("the lstm family captions only; it takes no answer set")
        return LstmCaptioner(config, vocab_size)
    if family == "transformer":
        from .multimodal import MultimodalModel

        return MultimodalModel(config, vocab_size, answers)
    raise OptionError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")


def preprocess_config(model_or_config):
    """The image preprocessing a model is trained with (a `PreprocessConfig`): a plain resize to the
    model's square size, then ImageNet mean/std unless the config's "preprocess" section says otherwise."""
    from ...runtime.preprocess import PreprocessConfig

    config = getattr(model_or_config, "config", model_or_config)
    size = config["image_size"]
    settings = {"size": (size, size), "resize_mode": "exact", "resample": "bilinear",
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    settings.update(config.get("preprocess") or {})
    return check_preprocess(PreprocessConfig.from_dict(settings), size)


def check_preprocess(out, size: int):
    """`out` (a PreprocessConfig) if it makes the model's size x size NCHW images; OptionError otherwise."""
    made = out.crop_size if out.crop_size is not None else out.size
    if out.resize_mode == "shortest_edge" and out.crop_size is None:
        raise OptionError(f"the preprocess section resizes by the shortest edge without a crop_size; give "
                          f"crop_size [{size}, {size}] (image_size)")
    if tuple(made) != (size, size) or out.layout != "nchw":
        raise OptionError(f"the preprocess section makes {made[0]}x{made[1]} {out.layout} images; "
                          f"the model takes {size}x{size} nchw (image_size)")
    return out


__all__ = ["FAMILIES", "Checkpoint", "WordTokenizer", "build_model", "build_tokenizer", "check_preprocess",
           "list_models", "load_checkpoint", "model_config", "preprocess_config", "save_checkpoint"]
