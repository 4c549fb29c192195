"""A ViT-GPT2 captioner (`VisionEncoderDecoderModel`: ViT encoder, GPT-2 decoder with cross-attention)
as the three graphs the runtime runs, with the interface of the BLIP captioner (see blip.py):

- `vision`: pixel_values (batch, 3, H, W) -> image_embeds (batch, patches + 1, d_decoder): the ViT's
  last_hidden_state, through `enc_to_dec_proj` where the model has one, i.e. exactly the
  encoder_hidden_states the GPT-2 decoder attends to.
- `cross_kv`: image_embeds -> cross_key_i, cross_value_i per layer (batch, heads, patches + 1, head_dim):
  the key/value part of each block's cross-attention `c_attn`, once per image.
- `decoder`: ONE GPT-2 step graph with an explicit self-attention past (empty on the first call);
  the LM head is tied to `wte` and stored once.

GPT-2 uses `Conv1D` (weight (in, out)), a fused q/k/v `c_attn` in self-attention, and `q_attn` plus
a fused k/v `c_attn` in cross-attention; the graphs call those modules, so the weights are the
model's own. As for BLIP, the decoder restates the blocks instead of calling their forward (cache
objects do not trace), and parity with the HF forward is checked at export.
"""
from __future__ import annotations

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


class VedVisionGraph(nn.Module):
    """pixel_values (B, 3, H, W) -> image_embeds (B, N, D): what the decoder cross-attends to."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.encoder
        self.proj = getattr(model, "enc_to_dec_proj", None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(pixel_values=pixel_values).last_hidden_state
        return hidden if self.proj is None else self.proj(hidden)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(R, T, D) -> (R, H, T, D / H)"""
    return x.view(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


class Gpt2CrossKVGraph(nn.Module):
    """image_embeds (B, N, D) -> cross_key_0..L-1, cross_value_0..L-1, each (B, H, N, hd)."""

    def __init__(self, gpt2: nn.Module):
        super().__init__()
        self.attn = nn.ModuleList(block.crossattention for block in gpt2.transformer.h)
        self.n_heads = gpt2.config.n_head
        self.embed_dim = gpt2.config.n_embd

    def forward(self, image_embeds: torch.Tensor):
        keys, values = [], []
        for a in self.attn:
            k, v = a.c_attn(image_embeds).split(self.embed_dim, dim=2)
            keys.append(_heads(k, self.n_heads))
            values.append(_heads(v, self.n_heads))
        return (*keys, *values)


class Gpt2DecoderGraph(nn.Module):
    """One GPT-2 call over the tokens the cache has not seen.

    input_ids : (R, T) int64, R = batch * beams (batch-major)
    past_key, past_value : (P, L, R, H, hd), P may be 0
    cross : cross_key_0..L-1 then cross_value_0..L-1, each (B, H, N, hd), one copy per image
    returns logits (R, V) at the last position, new_key/new_value (T, L, R, H, hd)
    """

    def __init__(self, gpt2: nn.Module):
        super().__init__()
        self.transformer = gpt2.transformer
        self.n_heads = gpt2.config.n_head
        # GPT-2's head has no bias, but only a linear with a bias exports as Gemm(transB=1); without
        # one the exporter folds a transposed copy of wte into the graph (the matrix stored twice).
        self.register_buffer("head_bias", torch.zeros(gpt2.config.vocab_size), persistent=False)

    def forward(self, input_ids, past_key, past_value, *cross):
        tr = self.transformer
        n_layers = len(tr.h)
        dims = step_dims(input_ids, past_key, cross[0])
        t, past = dims.new, dims.past
        positions = torch.arange(t, device=input_ids.device) + past
        x = tr.wte(input_ids) + tr.wpe(positions)[None]
        keys = torch.arange(t, device=input_ids.device)[None, :] + past
        future = torch.arange(past + t, device=input_ids.device)[None, :] > keys.transpose(0, 1)
        new_keys, new_values = [], []
        for i, block in enumerate(tr.h):
            attn, k, v = self._self_attention(block.attn, block.ln_1(x), past_key[:, i], past_value[:, i], future,
                                              dims)
            x = x + attn
            new_keys.append(k)
            new_values.append(v)
            x = x + self._cross_attention(block.crossattention, block.ln_cross_attn(x), cross[i], cross[n_layers + i],
                                          dims)
            x = x + block.mlp(block.ln_2(x))
        h = tr.ln_f(x[:, -1])
        # F.linear with a bias on a 2-D input exports as Gemm(transB=1): wte is stored once.
        logits = F.linear(h, tr.wte.weight, self.head_bias)
        return logits, torch.stack(new_keys).permute(3, 0, 1, 2, 4), torch.stack(new_values).permute(3, 0, 1, 2, 4)

    def _self_attention(self, attn, x, past_k, past_v, future, dims):
        """x (R, T, D) after ln_1; past_k/past_v (P, R, H, hd) -> (output, k, v), k/v (R, H, T, hd)."""
        q, k, v = attn.c_attn(x).split(attn.embed_dim, dim=2)
        q, k, v = _heads(q, self.n_heads), _heads(k, self.n_heads), _heads(v, self.n_heads)
        ctx = cached_attention(q, k, v, past_k, past_v, future, float("-inf"), dims,
                               scale=attn.scaling).transpose(1, 2)
        return attn.c_proj(ctx.reshape(ctx.shape[0], ctx.shape[1], -1)), k, v  # own dims: a constant shape

    def _cross_attention(self, attn, x, cross_k, cross_v, dims):
        """x (R, T, D) after ln_cross_attn; the beams of one image share its cross_k/cross_v (B, H, N, hd)."""
        # (R, T, D) -> (B, H, beams, T, hd) against K/V (B, H, 1, N, hd)
        q = beam_queries(attn.q_attn(x), self.n_heads, dims)
        return attn.c_proj(beam_context(shared_kv_attention(q, cross_k, cross_v, scale=attn.scaling), dims))


def _check_layout(model) -> None:
    """Refuse what these graphs do not restate, with the reason."""
    from ..errors import UnsupportedModelError

    enc, dec = model.config.encoder, model.config.decoder
    if dec.model_type != "gpt2" or not getattr(dec, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"VisionEncoderDecoderModel with a {dec.model_type} decoder is not supported; valid: a GPT-2 decoder "
            "with add_cross_attention=True (the ViT-GPT2 layout)")
    if enc.model_type not in ("vit", "deit"):
        raise UnsupportedModelError(f"VisionEncoderDecoderModel with a {enc.model_type} encoder is not supported; "
                                    "valid: vit, deit")


class VisionEncoderDecoderExporter(EncoderDecoderExporter):
    """Graph specs, parity cases and manifest entries for a ViT-GPT2 `VisionEncoderDecoderModel`."""

    task = "caption"

    def __init__(self, model):
        _check_layout(model)
        self.model = model
        self.gpt2 = model.decoder
        self.dec_cfg = model.config.decoder
        size = model.config.encoder.image_size
        self.image_hw = (size, size) if isinstance(size, int) else tuple(size)
        self.vision = VedVisionGraph(model).eval()
        self.cross_kv = Gpt2CrossKVGraph(self.gpt2).eval()
        self.decoder = Gpt2DecoderGraph(self.gpt2).eval()
        self.dims = decoder_dims(self.dec_cfg)
        self.vocab_size = self.dec_cfg.vocab_size
        self.start_id = self._start_id()

    def reference_embeds(self, pixels):
        with torch.no_grad():
            ref = self.model.encoder(pixel_values=pixels).last_hidden_state
            proj = getattr(self.model, "enc_to_dec_proj", None)
            return (ref if proj is None else proj(ref)).numpy()

    def reference_cross_kv(self, embeds):
        return self._hf_cross_kv(embeds)

    def reference_logits(self, seq, embeds, beams):
        states = torch.from_numpy(embeds).repeat_interleave(beams, 0)
        return self.gpt2(input_ids=torch.from_numpy(seq), encoder_hidden_states=states).logits.numpy()

    def _hf_cross_kv(self, embeds) -> dict:
        """The cross-attention K/V that GPT-2's own forward puts in its EncoderDecoderCache."""
        start = torch.full((embeds.shape[0], 1), self._start_id(), dtype=torch.long)
        with torch.no_grad():
            out = self.gpt2(input_ids=start, encoder_hidden_states=torch.from_numpy(embeds), use_cache=True)
        layers = out.cache.cross_attention_cache.layers
        names = cross_names(self.dims["layers"])
        tensors = [layer.keys for layer in layers] + [layer.values for layer in layers]
        return {name: t.numpy() for name, t in zip(names, tensors)}

    # -- manifest ------------------------------------------------------------------------------

    def _start_id(self) -> int:
        """generate()'s decoder start: decoder_start_token_id, else bos_token_id (_prepare_special_tokens)."""
        from ..errors import ExportError

        gen = self.model.generation_config
        start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else gen.bos_token_id
        if start is None:
            raise ExportError("the model's generation config sets neither decoder_start_token_id nor "
                              "bos_token_id; generate() needs one to start the decoder")
        return int(start)

    def _stop_and_pad(self) -> tuple[list[int], int | None]:
        """generate()'s eos ids (an int or a list), and its pad id, which falls back to the first eos."""
        from ..errors import ExportError

        gen = self.model.generation_config
        eos = gen.eos_token_id
        stop = [] if eos is None else [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])]
        if not stop:
            raise ExportError("the model's generation config has no eos_token_id: captions would never end")
        pad = gen.pad_token_id if gen.pad_token_id is not None else stop[0]
        return stop, int(pad)

    def manifest_parts(self, tokenizer) -> dict:
        cfg = self.dec_cfg
        stop, pad = self._stop_and_pad()
        return {
            "tasks": {"caption": {"modules": ["vision", "cross_kv", "decoder"]}},
            "module_extra": {"decoder": {"cache": self.dims, "role": "decoder"},
                             "cross_kv": {"role": "cross_kv"}, "vision": {"role": "image_encoder"}},
            "decoding": {
                "decoder_start_ids": [self._start_id()],
                "stop_ids": stop,
                "pad_id": pad,
                # GPT-2's byte-level tokenizer adds no special tokens; a prompt follows the start id as is.
                "prompt_add_special_tokens": False,
            },
            "model": {"family": "vit-gpt2", "architecture": "VisionEncoderDecoderModel",
                      "encoder": self.model.config.encoder.model_type, "decoder": cfg.model_type,
                      "image_size": list(self.image_hw), "vocab_size": cfg.vocab_size,
                      "max_positions": cfg.n_positions},
        }
