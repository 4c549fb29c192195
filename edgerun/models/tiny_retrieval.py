"""Random-weight retrieval checkpoints (CLIP, BLIP image-text retrieval) for tests and demos.

Like `edgerun.models.tiny`, nothing is downloaded: CLIP's byte-level BPE is trained on the spot
with the `tokenizers` library on a few sentences, and the weights are drawn from a seeded generator.
"""
from __future__ import annotations

import json
from pathlib import Path

from .tiny import WORDS, bert_tokenizer, reinitialise

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
             "max_position_embeddings": 32}
TINY_VISION = {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 29,
               "image_size": 32, "patch_size": 8}


def clip_vocab(merges_wanted: int = 200) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary and merges, trained on `WORDS`.

    As in CLIP, every byte symbol is in the vocabulary twice (alone and with the `</w>` end-of-word
    suffix), so any text encodes without an unknown token, and `<|startoftext|>`/`<|endoftext|>`
    are the last two ids (CLIP's bos/eos are its highest ids, which its legacy EOS pooling relies on).
    """
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=2 * len(alphabet) + merges_wanted, min_frequency=1,
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
    corpus = [" ".join(WORDS[i:i + 6]) for i in range(0, len(WORDS), 3)] * 4
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    learned = sorted(model["vocab"], key=model["vocab"].get)
    tokens = list(dict.fromkeys(alphabet + [c + "</w>" for c in alphabet] + learned)) + [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(folder: Path, max_length: int):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


def save_clip(
    folder: str | Path,
    *,
    text: dict | None = None,
    vision: dict | None = None,
    projection_dim: int = 16,
    init_std: float = 0.2,
    seed: int = 0,
    legacy_eos: bool = False,
) -> Path:
    """Write a tiny CLIPModel checkpoint folder (config, weights, tokenizer, preprocessor config).

    `text`/`vision` override `CLIPTextConfig`/`CLIPVisionConfig` fields. The image processor is
    CLIP's: resize the short side to the vision `image_size`, then centre-crop a square. `legacy_eos` writes
    `eos_token_id` 2 into the text config, as checkpoints from before transformers' PR #24773 do;
    CLIP then pools at the highest token id instead of the first EOS.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_cfg = {**TINY_TEXT, **(text or {})}
    tok = clip_tokenizer(folder, text_cfg["max_position_embeddings"])
    text_cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                    eos_token_id=2 if legacy_eos else tok.eos_token_id)
    vision_cfg = {**TINY_VISION, **(vision or {})}
    config = CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    reinitialise(model, init_std, seed)
    model.save_pretrained(folder)
    size = config.vision_config.image_size
    processor = {
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": size},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder


def save_blip_retrieval(
    folder: str | Path,
    *,
    text: dict | None = None,
    vision: dict | None = None,
    image_text_hidden_size: int = 16,
    init_std: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write a tiny BlipForImageTextRetrieval checkpoint folder.

    Every weight is redrawn (`reinitialise`): BLIP's vision `initializer_range` of 1e-10 would
    leave every image with the same features.
    """
    import torch
    from transformers import BlipConfig, BlipForImageTextRetrieval

    folder = Path(folder)
    tok = bert_tokenizer(folder)
    text_cfg = {**TINY_TEXT, **(text or {}), "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                "sep_token_id": tok.sep_token_id, "bos_token_id": tok.bos_token_id}
    config = BlipConfig(text_config=text_cfg, vision_config={**TINY_VISION, **(vision or {})},
                        image_text_hidden_size=image_text_hidden_size)
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    reinitialise(model, init_std, seed)
    model.save_pretrained(folder)
    tok.model_max_length = config.text_config.max_position_embeddings
    tok.save_pretrained(folder)
    size = config.vision_config.image_size
    processor = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"height": size, "width": size},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder
