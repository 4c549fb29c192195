"""A random-weight ViT-GPT2 captioner (`VisionEncoderDecoderModel`) built from configs, for tests.

The layout is the one of ViT-GPT2 image captioners: a ViT encoder, a GPT-2 decoder with
cross-attention, the LM head tied to the token embedding, and `<|endoftext|>` as decoder start,
end and padding token at the last id. The tokenizer is a GPT-2-style byte-level BPE trained here on
a few caption words (no download). Nothing is fetched; the folder is what `save_pretrained` writes.
"""
from __future__ import annotations

import json
from pathlib import Path

from .tiny import WORDS

END = "<|endoftext|>"


def byte_level_tokenizer(merges: int = 64):
    """A GPT-2-style tokenizer: byte-level BPE over the 256 byte symbols plus `merges` merges learnt
    from caption-like text, then `<|endoftext|>` at the last id (as in GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + merges, initial_alphabet=alphabet,
                                  show_progress=False)
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab[END] = len(vocab)
    merge_pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GPT2Tokenizer(vocab=vocab, merges=merge_pairs)


def reinitialise(model, std: float, seed: int) -> None:
    """Redraw every weight matrix, embedding and Conv1D from N(0, std), biases from N(0, std / 10),
    and reset LayerNorms to (1, 0): random HF inits give flat logits that never finish early."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in norms:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std * 0.1)


def bias_towards(decoder, token_id: int, bias: float) -> None:
    """Add about `bias` to the logit of `token_id` at every position.

    The LM head is tied to `wte` and has no bias, so the bias goes into the final LayerNorm's bias
    along the token's embedding e: logits = wte @ h gain `bias * wte @ e / |e|^2`, which is `bias`
    for the token itself and small for the others (random embeddings are near orthogonal)."""
    import torch

    with torch.no_grad():
        e = decoder.transformer.wte.weight[token_id]
        decoder.transformer.ln_f.bias += bias * e / e.dot(e)


def save_vit_gpt2_caption(
    folder: str | Path,
    *,
    encoder: dict | None = None,
    decoder: dict | None = None,
    init_std: float = 0.5,
    stop_bias: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write a ViT-GPT2 captioning checkpoint folder (config, weights, tokenizer, processor config,
    generation config).

    `encoder`/`decoder` override `ViTConfig`/`GPT2Config` fields. The default is tiny (2 layers,
    32 px) with a ViT narrower than GPT-2, so the model carries `enc_to_dec_proj`.
    """
    import torch
    from transformers import (
        GenerationConfig,
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = byte_level_tokenizer()
    end = tok.convert_tokens_to_ids(END)
    tiny_vit = {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 29,
                "image_size": 32, "patch_size": 8}
    enc_cfg = ViTConfig(**(encoder or tiny_vit))
    dec_fields = decoder or {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 48, "n_positions": 64}
    dec_cfg = GPT2Config(**dec_fields, vocab_size=len(tok), bos_token_id=end, eos_token_id=end,
                         add_cross_attention=True, is_decoder=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc_cfg, dec_cfg)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = end
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config).eval()
    reinitialise(model, init_std, seed)
    if stop_bias:
        bias_towards(model.decoder, end, stop_bias)
    model.generation_config = GenerationConfig(decoder_start_token_id=end, bos_token_id=end, eos_token_id=end,
                                               pad_token_id=end)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    size = enc_cfg.image_size
    processor = {
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "ViTImageProcessor", "resample": 2, "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder
