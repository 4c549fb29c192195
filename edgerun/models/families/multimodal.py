"""The compact multimodal transformer family: image encoder, text encoder, fusion, task heads.

Config (JSON; see `edgerun/models/configs/`):

    {"family": "transformer", "image_size": 32, "width": 64,
     "image_encoder": {"type": "cnn" | "vit", ...},
     "text_encoder": {"type": "bow" | "mean" | "gru" | "transformer", ...},   # for vqa and retrieval
     "fusion": {"type": "concat" | "attention" | "cross_transformer", ...},     # for vqa
     "heads": {"caption": {"layers", "heads", "max_positions"},
               "vqa": {"type": "generative", "layers", "heads", "max_positions"}
                    | {"type": "classifier", "hidden"},
               "retrieval": {"embed_dim"}},
     "preprocess": {...}}

One image encoding feeds every head: the caption decoder cross-attends to the image tokens, the
VQA head reads the fusion of the image with the question, retrieval projects the pooled image.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...errors import InputError, OptionError
from .config import check_keys, choice
from .encoders import build_image_encoder
from .fusion import Fused, build_fusion
from .heads import AnswerClassifier, ContrastiveHead, TextDecoder
from .text import TextFeatures, build_text_encoder
from .tokenizer import PAD_ID

TOP_KEYS = ("family", "name", "description", "image_size", "width", "image_encoder", "text_encoder", "fusion",
            "heads", "preprocess", "vocab_size")
VQA_MODES = ("generative", "classifier")


class MultimodalModel(nn.Module):
    family = "transformer"

    def __init__(self, config: dict, vocab_size: int, answers: Sequence[str] | None = None):
        super().__init__()
        check_keys(config, "model", TOP_KEYS, ("family", "image_size", "width", "image_encoder", "heads"))
        heads = check_keys(config["heads"], "heads", ("caption", "vqa", "retrieval"))
        if not heads:
            raise OptionError("config section heads names no head; valid: caption, vqa, retrieval")
        width, self.image_size = config["width"], config["image_size"]
        self.config = {**config, "vocab_size": vocab_size}
        self.answers = tuple(answers) if answers is not None else None
        self.image_encoder = build_image_encoder(config["image_encoder"], self.image_size, width)
        needs_text = "vqa" in heads or "retrieval" in heads
        for section, needed in (("text_encoder", needs_text), ("fusion", "vqa" in heads)):
            if needed and section not in config:
                raise OptionError(f"config needs a {section} section for heads {sorted(heads)}")
        self.text_encoder = None
        if needs_text:
            self.text_encoder = build_text_encoder(config["text_encoder"], vocab_size, width)
        self.fusion = build_fusion(config["fusion"], width) if "vqa" in heads else None
        self.caption_head = None
        if "caption" in heads:
            self.caption_head = TextDecoder(heads["caption"], vocab_size, width, "heads.caption")
        self.vqa_mode = choice(heads["vqa"], "type", "vqa head type", VQA_MODES) if "vqa" in heads else None
        self.vqa_head = None
        if self.vqa_mode == "generative":
            self.vqa_head = TextDecoder(heads["vqa"], vocab_size, width, "heads.vqa")
        elif self.vqa_mode == "classifier":
            if not self.answers:
                raise OptionError("a VQA classifier head needs the answer set: "
                                  "build_model(..., answers=[...])")
            self.vqa_head = AnswerClassifier(heads["vqa"], width, len(self.answers))
        self.retrieval_head = ContrastiveHead(heads["retrieval"], width) if "retrieval" in heads else None
        for module in self.modules():  # small embeddings: the tied LM head starts with small logits
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t, h in (("caption", self.caption_head), ("vqa", self.vqa_head),
                                    ("retrieval", self.retrieval_head)) if h is not None)

    # -- the parts, as the export graphs and the torch reference call them ---------------------

    def encode_image(self, pixel_values) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> image tokens (B, N, width)."""
        return self.image_encoder(pixel_values)

    def encode_text(self, input_ids, mask) -> TextFeatures:
        return self.text_encoder(input_ids, mask)

    def fuse(self, image_tokens, input_ids, mask) -> Fused:
        text = self.encode_text(input_ids, mask)
        return self.fusion(image_tokens, self.image_encoder.pool(image_tokens), text)

    def answer_logits(self, image_tokens, input_ids, mask) -> torch.Tensor:
        """Classifier VQA: (B, n_answers)."""
        return self.vqa_head(self.fuse(image_tokens, input_ids, mask).pooled)

    def image_embeds(self, image_tokens) -> torch.Tensor:
        return self.retrieval_head.embed_images(self.image_encoder.pool(image_tokens))

    def text_embeds(self, input_ids, mask) -> torch.Tensor:
        return self.retrieval_head.embed_texts(self.encode_text(input_ids, mask).pooled)

    # -- training --------------------------------------------------------------------------------

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """One loss per head whose inputs are in `batch`:

        images (B, 3, S, S) float32, always;
        caption_ids (B, T) int64, `[BOS] words [EOS]` padded with [PAD]: caption, and retrieval
            (each image's caption is its positive text);
        question_ids, question_mask (B, Q) with answer_ids (B, A) (generative) or answer_labels (B,)
            (classifier, indices into the answer set): vqa.
        """
        if "images" not in batch:
            raise InputError("a batch needs 'images' (B, 3, S, S)")
        tokens = self.encode_image(batch["images"])
        out = {}
        if self.caption_head is not None and "caption_ids" in batch:
            out["caption"] = self.caption_head.loss(batch["caption_ids"], tokens)
        if self.retrieval_head is not None and "caption_ids" in batch:
            ids = batch["caption_ids"]
            text = self.encode_text(ids, batch.get("caption_mask", (ids != PAD_ID).long()))
            out["retrieval"] = self.retrieval_head.loss(self.image_encoder.pool(tokens), text.pooled)
        target = "answer_ids" if self.vqa_mode == "generative" else "answer_labels"
        if self.vqa_head is not None and "question_ids" in batch and target in batch:
            ids = batch["question_ids"]
            fused = self.fuse(tokens, ids, batch.get("question_mask", (ids != PAD_ID).long()))
            if self.vqa_mode == "generative":
                out["vqa"] = self.vqa_head.loss(batch[target], fused.tokens, fused.mask)
            else:
                out["vqa"] = self.vqa_head.loss(fused.pooled, batch[target])
        if not out:
            raise InputError(f"the batch (keys {sorted(batch)}) feeds none of this model's heads "
                             f"{list(self.tasks)}; "
                             f"caption and retrieval need caption_ids, vqa needs question_ids and {target}")
        return out

    def loss(self, batch: dict) -> torch.Tensor:
        """The sum of `losses(batch)`: what a trainer minimises."""
        return sum(self.losses(batch).values())
