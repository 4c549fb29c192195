"""BLIP's captioning model as the three graphs the runtime runs.

- `vision`: pixel_values (batch, 3, H, W) -> image_embeds (batch, patches, d_vision)
- `cross_kv`: image_embeds -> cross_key_i, cross_value_i per layer (batch, heads, patches, head_dim),
  computed once per image; every beam of that image reads the same copy.
- `decoder`: ONE step graph with an explicit self-attention past (empty on the first call), so the
  decoder weights and the tied embedding / LM head are stored once. The past is time-major,
  (past_len, layers, rows, heads, head_dim), so that the runtime's preallocated cache passes a
  contiguous prefix and writes each step's new K/V in place.

The decoder re-states BLIP's text layers with the module's own weights instead of calling its
forward: transformers' cache objects do not trace, and the beams' broadcast over one cross-K/V copy
is not something the HF code does. Parity against the HF forward is checked at export.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..models.families.layers import (
    beam_context,
    beam_queries,
    cached_attention,
    shared_kv_attention,
    step_dims,
)
from .encdec import EncoderDecoderExporter, cross_names, decoder_dims


class BlipVisionGraph(nn.Module):
    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).last_hidden_state


class BlipCrossKVGraph(nn.Module):
    """image_embeds (B, N, Dv) -> cross_key_0..L-1, cross_value_0..L-1, each (B, H, N, hd).

    One output per layer, not a stacked tensor: the decoder would slice a stacked input per layer,
    and onnxruntime copies every slice (42 MB per step for BLIP-base)."""

    def __init__(self, text_lm: nn.Module):
        super().__init__()
        self.attn = nn.ModuleList(layer.crossattention.self for layer in text_lm.bert.encoder.layer)
        self.n_heads = text_lm.config.num_attention_heads

    def forward(self, image_embeds: torch.Tensor):
        b, n, _ = image_embeds.shape
        keys, values = [], []
        for a in self.attn:
            keys.append(a.key(image_embeds).view(b, n, self.n_heads, -1).transpose(1, 2))
            values.append(a.value(image_embeds).view(b, n, self.n_heads, -1).transpose(1, 2))
        return (*keys, *values)


class BlipDecoderGraph(nn.Module):
    """One decoder call over the tokens the cache has not seen.

    input_ids : (R, T) int64, R = batch * beams (batch-major)
    past_key, past_value : (P, L, R, H, hd), P may be 0
    cross_mask : (B, N) int64, 1 = attend; only with `cross_mask=True` (VQA: padded questions)
    cross : cross_key_0..L-1 then cross_value_0..L-1, each (B, H, N, hd), one copy per image
    returns logits (R, V) at the last position, new_key/new_value (T, L, R, H, hd)
    """

    def __init__(self, text_lm: nn.Module, cross_mask: bool = False):
        super().__init__()
        self.with_cross_mask = cross_mask
        cfg = text_lm.config
        self.embeddings = text_lm.bert.embeddings
        self.layers = text_lm.bert.encoder.layer
        self.head = text_lm.cls.predictions
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads

    def forward(self, input_ids, past_key, past_value, *cross):
        n_layers = len(self.layers)
        hidden_mask = None
        if self.with_cross_mask:
            hidden_mask = (cross[0] == 0)[:, None, None, None, :]  # (B, 1, 1, 1, N): padding never attended
            cross = cross[1:]
        dims = step_dims(input_ids, past_key, cross[0])
        t, past = dims.new, dims.past
        positions = torch.arange(t, device=input_ids.device) + past
        x = self.embeddings.word_embeddings(input_ids) + self.embeddings.position_embeddings(positions)[None]
        x = self.embeddings.LayerNorm(x)
        keys = torch.arange(t, device=input_ids.device)[None, :] + past
        future = torch.arange(past + t, device=input_ids.device)[None, :] > keys.transpose(0, 1)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = self._self_attention(layer.attention, x, past_key[:, i], past_value[:, i], future, dims)
            new_keys.append(k)
            new_values.append(v)
            x = self._cross_attention(layer.crossattention, x, cross[i], cross[n_layers + i], dims, hidden_mask)
            x = layer.output(layer.intermediate(x), x)
        h = self.head.transform(x[:, -1])
        # F.linear on a 2-D input exports as Gemm(transB=1): the embedding matrix is stored once.
        logits = F.linear(h, self.head.decoder.weight, self.head.decoder.bias)
        return logits, torch.stack(new_keys).permute(3, 0, 1, 2, 4), torch.stack(new_values).permute(3, 0, 1, 2, 4)

    def _heads(self, x):
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def _self_attention(self, attention, x, past_k, past_v, future, dims):
        a = attention.self
        q, k, v = self._heads(a.query(x)), self._heads(a.key(x)), self._heads(a.value(x))
        ctx = cached_attention(q, k, v, past_k, past_v, future, float("-inf"), dims,
                               divisor=math.sqrt(self.head_dim))
        ctx = ctx.transpose(1, 2)
        ctx = ctx.reshape(ctx.shape[0], ctx.shape[1], -1)  # its own dims: a constant shape (simplify.py)
        return attention.output(ctx, x), k, v

    def _cross_attention(self, attention, x, cross_k, cross_v, dims, hidden_mask=None):
        # (R, T, D) -> (B, H, beams, T, hd) against K/V (B, H, 1, N, hd): the beams of one image
        # share its K/V (see beam_queries).
        q = beam_queries(attention.self.query(x), self.n_heads, dims)
        ctx = shared_kv_attention(q, cross_k, cross_v, hidden_mask, float("-inf"), divisor=math.sqrt(self.head_dim))
        return attention.output(beam_context(ctx, dims), x)


class BlipCaptionExporter(EncoderDecoderExporter):
    """Graph specs, parity cases and manifest entries for `BlipForConditionalGeneration`."""

    task = "caption"

    def __init__(self, model):
        self.model = model
        self.text_lm = model.text_decoder
        self.text_cfg = model.config.text_config
        size = model.config.vision_config.image_size
        self.image_hw = (size, size) if isinstance(size, int) else tuple(size)
        self.vision = BlipVisionGraph(model.vision_model).eval()
        self.cross_kv = BlipCrossKVGraph(self.text_lm).eval()
        self.decoder = BlipDecoderGraph(self.text_lm).eval()
        self.dims = decoder_dims(self.text_cfg)
        self.vocab_size = self.text_cfg.vocab_size
        self.start_id = self.text_cfg.bos_token_id

    def reference_embeds(self, pixels):
        with torch.no_grad():
            return self.model.vision_model(pixel_values=pixels).last_hidden_state.numpy()

    def reference_cross_kv(self, embeds):
        with torch.no_grad():  # the key/value projections applied as HF's cross-attention applies them
            cross = self.cross_kv(torch.from_numpy(embeds))
        return {name: t.numpy() for name, t in zip(cross_names(self.dims["layers"]), cross)}

    def reference_logits(self, seq, embeds, beams):
        states = torch.from_numpy(embeds).repeat_interleave(beams, 0)
        return self.text_lm(input_ids=torch.from_numpy(seq), encoder_hidden_states=states).logits.numpy()

    def manifest_parts(self, tokenizer) -> dict:
        cfg = self.text_cfg
        return {
            "tasks": {"caption": {"modules": ["vision", "cross_kv", "decoder"]}},
            "module_extra": {"decoder": {"cache": self.dims, "role": "decoder"},
                             "cross_kv": {"role": "cross_kv"}, "vision": {"role": "image_encoder"}},
            "decoding": {
                "decoder_start_ids": [cfg.bos_token_id],
                "stop_ids": [cfg.sep_token_id],
                "pad_id": cfg.pad_token_id,
                # BLIP prompts ("a picture of") are tokenised without [CLS]/[SEP] after the start ids.
                "prompt_add_special_tokens": False,
            },
            "model": {"family": "blip", "architecture": "BlipForConditionalGeneration",
                      "image_size": list(self.image_hw), "vocab_size": cfg.vocab_size,
                      "max_positions": cfg.max_position_embeddings},
        }
