"""Random-weight Hugging Face checkpoints built from configs, for tests, demos and benchmarks.

Nothing here downloads anything: the tokenizer is a WordPiece vocabulary written on the spot, the
weights are drawn from a seeded generator, and the folder is what `save_pretrained` writes, so the
exporter reads it exactly as it reads a real checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

# Enough words for prompts and questions in tests ("a picture of", "what is in the image").
WORDS = (
    ["a", "an", "the", "of", "in", "on", "at", "to", "is", "are", "with", "and", "picture", "photo", "image", "what", "color", "how", "many", "there", "dog", "cat", "man", "woman", "person", "sitting", "standing", "red", "blue", "green", "white", "black", "two", "three", "table", "street", "car", "tree", "sky", "water", "grass", "room", "on", "top", "near", "next", "small", "large"]
)
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def bert_tokenizer(folder: Path, size: int | None = None):
    """A lower-casing BERT WordPiece tokenizer with BLIP's added `[DEC]` (bos) and `[ENC]` tokens.

    With `size` (30522 for BERT-base), the vocabulary is padded with `[unusedN]` tokens and the
    special tokens sit at BERT's ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103), so the
    ids match real BLIP checkpoints.
    """
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = list(WORDS) + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    words += list("abcdefghijklmnopqrstuvwxyz0123456789?.,!'")
    if size is None:
        vocab = list(dict.fromkeys(list(SPECIALS) + words))
    else:
        vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = list(dict.fromkeys(vocab + words))
        vocab += [f"[unused{i}]" for i in range(99, 99 + size - len(vocab))]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def reinitialise(model, std: float, seed: int) -> None:
    """Redraw every Linear/Embedding/Conv weight from N(0, std) and reset LayerNorms.

    BLIP's vision `initializer_range` is 1e-10, which leaves degenerate features (and denormals
    that distort timings); tests also want peaky logits, which a larger `std` gives.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or "embedding" in name.lower():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "layernorm" in name.lower() or "layer_norm" in name.lower():
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std * 0.1)


def save_blip_caption(folder: str | Path, **kwargs) -> Path:
    """A BLIP captioning checkpoint (`BlipForConditionalGeneration`); see `save_blip`."""
    return save_blip(folder, architecture="BlipForConditionalGeneration", **kwargs)


def save_blip_vqa(folder: str | Path, **kwargs) -> Path:
    """A BLIP VQA checkpoint (`BlipForQuestionAnswering`); see `save_blip`. Its answer decoder
    cross-attends to the question encoder's states, so the vision width equals the text width."""
    kwargs.setdefault("vision", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "intermediate_size": 29, "image_size": 32, "patch_size": 8})
    return save_blip(folder, architecture="BlipForQuestionAnswering", **kwargs)


def save_blip(
    folder: str | Path,
    *,
    architecture: str,
    text: dict | None = None,
    vision: dict | None = None,
    init_std: float = 0.5,
    stop_bias: float = 0.0,
    seed: int = 0,
    dtype: str = "float32",
    processor_layout: str = "preprocessor",
    bert_vocab: bool = False,
) -> Path:
    """Write a BLIP checkpoint folder (config, weights, tokenizer, processor config).

    `text`/`vision` override `BlipTextConfig`/`BlipVisionConfig` fields; with neither given the
    model is tiny (2 layers, 32 px). `processor_layout` is "preprocessor" (preprocessor_config.json),
    "processor" (processor_config.json with an "image_processor" entry) or "both".
    """
    import torch
    import transformers
    from transformers import BlipConfig

    folder = Path(folder)
    tok = bert_tokenizer(folder, 30522 if bert_vocab else None)
    tiny_text = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
                     "max_position_embeddings": 64}
    tiny_vision = {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 29,
                       "image_size": 32, "patch_size": 8}
    text_cfg = {**(tiny_text if text is None else text), "vocab_size": len(tok),
                "pad_token_id": tok.pad_token_id, "sep_token_id": tok.sep_token_id,
                "bos_token_id": tok.bos_token_id}
    vision_cfg = tiny_vision if vision is None else vision
    config = BlipConfig(text_config=text_cfg, vision_config=vision_cfg)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    reinitialise(model, init_std, seed)
    if stop_bias:
        head = model.text_decoder.cls.predictions
        with torch.no_grad():  # the two biases are tied in some architectures and not in others
            for bias in {id(b): b for b in (head.bias, head.decoder.bias)}.values():
                bias[tok.sep_token_id] += stop_bias
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    size = config.vision_config.image_size
    processor = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"height": size, "width": size},
    }
    if processor_layout in ("preprocessor", "both"):
        (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    if processor_layout in ("processor", "both"):
        (folder / "processor_config.json").write_text(
            json.dumps({"image_processor": processor, "processor_class": "BlipProcessor"}, indent=2))
    return folder
