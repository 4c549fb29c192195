"""Image-text retrieval models as embedding graphs: CLIP, and BLIP's retrieval model with its ITM head.

CLIP (`CLIPModel`):
- `image_embed`: pixel_values (batch, 3, H, W) -> image_embeds (batch, d), projected, L2-normalised
- `text_embed`: input_ids, attention_mask (batch, seq) -> text_embeds (batch, d), the same

BLIP (`BlipForImageTextRetrieval`), split so that the vision encoder runs once per image for both
the contrastive (ITC) embedding and the image-text matching (ITM) re-ranker:
- `vision`: pixel_values -> image_features (batch, patches, d_vision), the full sequence
- `image_proj`: image_features -> image_embeds (batch, d), vision_proj of the CLS token, normalised
- `text_embed`: input_ids, attention_mask -> text_embeds (batch, d), the text encoder without the
  image, text_proj of [CLS], normalised
- `itm`: image_features (batch, patches, d_vision), input_ids, attention_mask (rows, seq) ->
  itm_probs (rows,), softmax(itm_head([CLS]))[:, 1] with the text encoder attending to the image.
  Rows are image-major (rows = batch * texts per image); each image's cross-attention K/V are
  computed once and every text of that image reads them.

Text encoders are re-stated with the modules' own weights rather than called: transformers 5 builds
their masks with helpers that branch on the mask's values, which a trace would freeze. Parity
against the HF model's own forward is checked at export, on batch sizes and padded text lengths
other than the trace's.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ExportError
from .blip import BlipVisionGraph

MIN_COSINE = 0.9999
ITM_ATOL = 1e-4
_NEG = torch.finfo(torch.float32).min
TEXT_AXES = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, H, T, D / H)"""
    return x.view(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


def _merge(ctx: torch.Tensor) -> torch.Tensor:
    """(B, H, T, hd) -> (B, T, H * hd)"""
    return ctx.transpose(1, 2).reshape(ctx.shape[0], ctx.shape[2], -1)


def _attend(q, k, v, allowed: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention; `allowed` (bool, broadcast to the scores) masks keys out with
    the float32 minimum, as transformers' eager masks do, so a fully masked row stays finite."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, _NEG)
    return torch.matmul(scores.softmax(dim=-1), v)


# --- CLIP --------------------------------------------------------------------------------------------


class ClipImageGraph(nn.Module):
    """pixel_values (B, 3, H, W) -> image_embeds (B, d): `get_image_features`, L2-normalised."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model = model.vision_model
        self.projection = model.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return F.normalize(self.projection(pooled), dim=-1)


class ClipTextGraph(nn.Module):
    """input_ids, attention_mask (B, T) -> text_embeds (B, d): `get_text_features`, L2-normalised.

    CLIP pools the final hidden state at one token per row. Like `CLIPTextModel`, a text config
    whose eos_token_id is 2 (checkpoints from before transformers' PR #24773) pools at the highest
    token id (CLIP's EOS is its highest id); any other pools at the first `eos_token_id`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        text = model.text_model
        self.embeddings = text.embeddings
        self.layers = text.encoder.layers
        self.final_layer_norm = text.final_layer_norm
        self.projection = model.text_projection
        self.n_heads = model.config.text_config.num_attention_heads
        self.eos_token_id = model.config.text_config.eos_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding(positions)[None]
        causal = positions[None, :] <= positions[:, None]  # (query, key)
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = x + self._attention(layer.self_attn, layer.layer_norm1(x), allowed)
            x = x + layer.mlp(layer.layer_norm2(x))
        x = self.final_layer_norm(x)
        ids = input_ids.to(torch.int32)  # ArgMax takes no int64 in older opsets
        keys = ids if self.eos_token_id == 2 else (ids == self.eos_token_id).to(torch.int32)
        index = keys.argmax(dim=-1)[:, None, None].expand(-1, 1, x.shape[-1])
        pooled = torch.gather(x, 1, index)[:, 0]
        return F.normalize(self.projection(pooled), dim=-1)

    def _attention(self, attn, x, allowed):
        q, k, v = (_heads(proj(x), self.n_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        return attn.out_proj(_merge(_attend(q, k, v, allowed)))


# --- BLIP --------------------------------------------------------------------------------------------


class BlipImageProjGraph(nn.Module):
    """image_features (B, N, Dv) -> image_embeds (B, d): vision_proj of the CLS token, normalised."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_proj = model.vision_proj

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(image_features[:, 0]), dim=-1)


class BlipTextEncoder(nn.Module):
    """BLIP's BERT text encoder: bidirectional self-attention over the unpadded tokens and, given
    image features, cross-attention to them after each self-attention (as BlipTextLayer does)."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.embeddings = text_model.embeddings
        self.layers = text_model.encoder.layer
        self.n_heads = text_model.config.num_attention_heads

    def forward(self, input_ids, attention_mask, image_features=None) -> torch.Tensor:
        """input_ids, attention_mask (R, T); image_features (B, N, Dv) with R = B * texts per image.
        returns the last hidden state (R, T, D)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        emb = self.embeddings
        x = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions)[None])
        allowed = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = self._self_attention(layer.attention, x, allowed)
            if image_features is not None:
                x = self._cross_attention(layer.crossattention, x, image_features)
            x = layer.output(layer.intermediate(x), x)
        return x

    def _self_attention(self, attention, x, allowed):
        a = attention.self
        q, k, v = (_heads(proj(x), self.n_heads) for proj in (a.query, a.key, a.value))
        return attention.output(_merge(_attend(q, k, v, allowed)), x)

    def _cross_attention(self, attention, x, image_features):
        a = attention.self
        rows, t, _ = x.shape
        batch = image_features.shape[0]
        k, v = _heads(a.key(image_features), self.n_heads), _heads(a.value(image_features), self.n_heads)
        # (R, T, D) -> (B, H, texts * T, hd): the texts of one image share its K/V.
        q = a.query(x).view(batch, -1, t, self.n_heads, k.shape[-1])
        q = q.permute(0, 3, 1, 2, 4).reshape(batch, self.n_heads, -1, k.shape[-1])
        ctx = _attend(q, k, v, None).view(batch, self.n_heads, -1, t, k.shape[-1]).permute(0, 2, 3, 1, 4)
        return attention.output(ctx.reshape(rows, t, -1), x)


class BlipTextEmbedGraph(nn.Module):
    """input_ids, attention_mask (B, T) -> text_embeds (B, d): text_proj of [CLS], normalised."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = BlipTextEncoder(model.text_encoder)
        self.text_proj = model.text_proj

    def forward(self, input_ids, attention_mask):
        return F.normalize(self.text_proj(self.encoder(input_ids, attention_mask)[:, 0]), dim=-1)


class BlipItmGraph(nn.Module):
    """image_features (B, N, Dv), input_ids, attention_mask (R, T) -> itm_probs (R,)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = BlipTextEncoder(model.text_encoder)
        self.itm_head = model.itm_head

    def forward(self, image_features, input_ids, attention_mask):
        hidden = self.encoder(input_ids, attention_mask, image_features)
        return self.itm_head(hidden[:, 0]).softmax(dim=-1)[:, 1]


# --- exporters ---------------------------------------------------------------------------------------


def _pixels(image_hw, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, *image_hw), generator=gen)


def _texts(lengths, bos: int | None, eos: int, pad: int, content: list[int], seed: int):
    """Token rows as a tokenizer pads them, [bos] words [eos] pad..., and their attention mask (int64)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(lengths), width), dtype=torch.int64)
    pool = torch.tensor(content, dtype=torch.int64)
    for row, n in enumerate(lengths):
        body = pool[torch.randint(0, len(pool), (n,), generator=gen)]
        if bos is not None:
            body[0] = bos
        body[-1] = eos
        ids[row, :n] = body
        mask[row, :n] = 1
    return ids, mask


def check_embeddings(name: str, got, want, atol: float | None) -> float:
    """Cosine of every row >= MIN_COSINE (and max abs diff <= atol when given); returns the max
    abs diff. ExportError otherwise."""
    import numpy as np

    if got.shape != want.shape:
        raise ExportError(f"{name}: ONNX gives shape {got.shape}, torch {want.shape}")
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    cos = (got64 * want64).sum(-1) / (np.linalg.norm(got64, axis=-1) * np.linalg.norm(want64, axis=-1))
    diff = float(np.abs(got64 - want64).max())
    if not cos.min() >= MIN_COSINE or (atol is not None and not diff <= atol):
        raise ExportError(f"{name}: ONNX embeddings differ from torch (min cosine {cos.min():.6f}, "
                          f"max abs diff {diff:.3g}; need cosine >= {MIN_COSINE}"
                          f"{f', diff <= {atol:g}' if atol is not None else ''}); no bundle was written")
    return diff


def _max_text_length(model_positions: int, tokenizer) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < model_positions:
        return limit
    return model_positions


class _RetrievalExporter:
    task = "retrieval"

    def __init__(self, model):
        self.model = model
        size = model.config.vision_config.image_size
        self.image_hw = (size, size) if isinstance(size, int) else tuple(size)
        self.text_cfg = model.config.text_config

    def _text_batch(self, lengths, seed: int):
        specials = {self._bos(), self._eos(), self._pad()}
        content = [i for i in range(self.text_cfg.vocab_size) if i not in specials]
        return _texts(lengths, self._bos(), self._eos(), self._pad(), content, seed)

    def _verify_texts(self):
        """Batches of sizes other than the trace's, padded to their longest row."""
        return [self._text_batch(lengths, seed=7 + i) for i, lengths in enumerate(([7, 2, 4], [3]))]

    def _pad(self) -> int:
        pad = self.text_cfg.pad_token_id
        return 0 if pad is None else pad


class ClipRetrievalExporter(_RetrievalExporter):
    """Graph specs, parity cases and manifest entries for `CLIPModel`."""

    def __init__(self, model):
        super().__init__(model)
        self.image_graph = ClipImageGraph(model).eval()
        self.text_graph = ClipTextGraph(model).eval()
        self.legacy_eos = self.text_cfg.eos_token_id == 2

    def _bos(self):
        return self.text_cfg.bos_token_id

    def _eos(self):
        # With a legacy config, EOS is the highest id (as in CLIP's vocabulary).
        return self.text_cfg.vocab_size - 1 if self.legacy_eos else self.text_cfg.eos_token_id

    def _pad(self):
        return self._eos()  # CLIP pads with <|endoftext|>

    def graphs(self) -> list:
        from .onnx import GraphSpec

        ids, mask = self._text_batch([5, 3], seed=0)
        return [
            GraphSpec("image_embed", self.image_graph, (_pixels(self.image_hw, 2, 0),), ["pixel_values"],
                      ["image_embeds"], {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}),
            GraphSpec("text_embed", self.text_graph, (ids, mask), ["input_ids", "attention_mask"], ["text_embeds"],
                      {**TEXT_AXES, "text_embeds": {0: "batch"}}),
        ]

    def verify(self, run, atol: float | None) -> dict[str, float]:
        """Against `get_image_features`/`get_text_features` (normalised) on new batch sizes and
        padded lengths; ExportError below cosine 0.9999. Returns the max abs diff per graph."""
        diffs = {"image_embed": 0.0, "text_embed": 0.0}
        for batch in (1, 3):
            pixels = _pixels(self.image_hw, batch, 10 + batch)
            with torch.no_grad():
                want = F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)), dim=-1)
            got = run("image_embed", {"pixel_values": pixels.numpy()})["image_embeds"]
            diffs["image_embed"] = max(diffs["image_embed"], check_embeddings("image_embed", got, want.numpy(), atol))
        for ids, mask in self._verify_texts():
            with torch.no_grad():
                want = F.normalize(_pooled(self.model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
            got = run("text_embed", {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["text_embeds"]
            diffs["text_embed"] = max(diffs["text_embed"], check_embeddings("text_embed", got, want.numpy(), atol))
        return diffs

    def manifest_parts(self, tokenizer) -> dict:
        cfg = self.text_cfg
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return {
            "tasks": {"retrieval": {"modules": ["image_embed", "text_embed"]}},
            "module_extra": {"image_embed": {"role": "image_embedder"}, "text_embed": {"role": "text_embedder"}},
            "decoding": {"pad_id": pad},
            "model": {"family": "clip", "architecture": "CLIPModel", "image_size": list(self.image_hw),
                      "vocab_size": cfg.vocab_size, "embedding_dim": self.model.config.projection_dim,
                      "max_text_length": _max_text_length(cfg.max_position_embeddings, tokenizer),
                      "pad_id": pad, "has_itm": False,
                      "text_pooling": "max_id" if self.legacy_eos else "first_eos",
                      "logit_scale": float(self.model.logit_scale.detach().exp())},
        }


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected features; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class BlipRetrievalExporter(_RetrievalExporter):
    """Graph specs, parity cases and manifest entries for `BlipForImageTextRetrieval`.

    transformers' forward feeds the processor's input_ids ([CLS] text [SEP]) unchanged to both the
    ITC and the ITM pass; it does not put `[ENC]` in front for ITM as Salesforce's BLIP does. The
    bundle reproduces transformers and records `itm_first_token_id: null`.
    """

    def __init__(self, model):
        super().__init__(model)
        self.vision = BlipVisionGraph(model.vision_model).eval()
        self.image_proj = BlipImageProjGraph(model).eval()
        self.text_embed = BlipTextEmbedGraph(model).eval()
        self.itm = BlipItmGraph(model).eval()

    def _bos(self):
        return None  # any first token will do for parity; the tokenizer puts [CLS] there

    def _eos(self):
        return self.text_cfg.sep_token_id

    def graphs(self) -> list:
        from .onnx import GraphSpec

        pixels = _pixels(self.image_hw, 2, 0)
        with torch.no_grad():
            features = self.vision(pixels)
        ids, mask = self._text_batch([5, 3, 4, 5], seed=0)
        rows_axes = {"input_ids": {0: "rows", 1: "seq"}, "attention_mask": {0: "rows", 1: "seq"}}
        return [
            GraphSpec("vision", self.vision, (pixels,), ["pixel_values"], ["image_features"],
                      {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}}),
            GraphSpec("image_proj", self.image_proj, (features,), ["image_features"], ["image_embeds"],
                      {"image_features": {0: "batch"}, "image_embeds": {0: "batch"}}),
            GraphSpec("text_embed", self.text_embed, (ids[:2], mask[:2]), ["input_ids", "attention_mask"],
                      ["text_embeds"], {**TEXT_AXES, "text_embeds": {0: "batch"}}),
            GraphSpec("itm", self.itm, (features, ids, mask), ["image_features", "input_ids", "attention_mask"],
                      ["itm_probs"], {"image_features": {0: "batch"}, **rows_axes, "itm_probs": {0: "rows"}}),
        ]

    def verify(self, run, atol: float | None) -> dict[str, float]:
        """Against `BlipForImageTextRetrieval.forward` with use_itm_head False (ITC similarities and
        the encoders' states) and True (ITM softmax), on new batch sizes and padded lengths."""
        import numpy as np

        from .onnx import compare

        diffs = dict.fromkeys(("vision", "image_proj", "text_embed", "itm"), 0.0)
        for n_images, (ids, mask) in zip((1, 3), self._verify_texts()):
            pixels = _pixels(self.image_hw, n_images, 10 + n_images)
            with torch.no_grad():
                itc = self.model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False)
            ref = itc.last_hidden_state.numpy()
            features = run("vision", {"pixel_values": pixels.numpy()})["image_features"]
            tol = atol if atol is not None else max(1e-3, 1e-4 * float(np.abs(ref).max()))
            diffs["vision"] = max(diffs["vision"], compare("vision", {"f": features}, {"f": ref}, tol))
            with torch.no_grad():
                want_img = F.normalize(self.model.vision_proj(itc.last_hidden_state[:, 0]), dim=-1).numpy()
                want_txt = F.normalize(self.model.text_proj(itc.question_embeds[:, 0]), dim=-1).numpy()
            img = run("image_proj", {"image_features": features})["image_embeds"]
            txt = run("text_embed", {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["text_embeds"]
            diffs["image_proj"] = max(diffs["image_proj"], check_embeddings("image_proj", img, want_img, atol))
            diffs["text_embed"] = max(diffs["text_embed"], check_embeddings("text_embed", txt, want_txt, atol))
            compare("itc", {"sim": img @ txt.T}, {"sim": itc.itm_score.numpy()}, 1e-3 if atol is None else atol)
            diffs["itm"] = max(diffs["itm"], self._verify_itm(run, pixels, features, ids, mask, atol))
        return diffs

    def _verify_itm(self, run, pixels, features, ids, mask, atol) -> float:
        """Every text against every image: rows image-major, as the runtime feeds them."""
        from .onnx import compare

        n_images, n_texts = pixels.shape[0], ids.shape[0]
        rows_ids, rows_mask = ids.repeat(n_images, 1), mask.repeat(n_images, 1)
        with torch.no_grad():
            out = self.model(input_ids=rows_ids, pixel_values=pixels.repeat_interleave(n_texts, 0),
                             attention_mask=rows_mask, use_itm_head=True)
        want = out.itm_score.softmax(dim=-1)[:, 1].numpy()
        got = run("itm", {"image_features": features, "input_ids": rows_ids.numpy(),
                          "attention_mask": rows_mask.numpy()})
        return compare("itm", got, {"itm_probs": want}, atol if atol is not None else ITM_ATOL)

    def manifest_parts(self, tokenizer) -> dict:
        cfg = self.text_cfg
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.pad_token_id
        return {
            "tasks": {"retrieval": {"modules": ["vision", "image_proj", "text_embed", "itm"]}},
            "module_extra": {"vision": {"role": "image_encoder"}, "image_proj": {"role": "image_embedder"},
                             "text_embed": {"role": "text_embedder"}, "itm": {"role": "itm"}},
            "decoding": {"pad_id": pad},
            "model": {"family": "blip", "architecture": "BlipForImageTextRetrieval",
                      "image_size": list(self.image_hw), "vocab_size": cfg.vocab_size,
                      "embedding_dim": self.model.config.image_text_hidden_size,
                      "max_text_length": _max_text_length(cfg.max_position_embeddings, tokenizer),
                      "pad_id": pad, "has_itm": True, "itm_first_token_id": None},
        }
