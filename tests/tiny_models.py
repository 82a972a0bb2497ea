"""Tiny randomly initialised Llama and OPT models, saved as ordinary Hugging Face folders with the embedded
model's tokenizer, so that `load_model(folder)`, `dynoracle run --model` and checkpoint tables read them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from pipeline.generation.models import load_tokenizer

LAYERS = 4


def save_tiny(kind: str, folder: Path, seed: int = 0, layers: int = LAYERS, extra_token: str | None = None) -> Path:
    """Write a random `kind` ("llama" or "opt") model speaking the embedded tokenizer's ids (plus
    `extra_token`, to make a tokenizer that differs). Weights are drawn 10x wider than Hugging Face's
    default so that every layer matters: at the default scale a tied random model echoes its input token
    whatever its layers hold, and two seeds would generate the same text."""
    tokenizer = load_tokenizer()
    if extra_token:
        tokenizer.add_tokens([extra_token])
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, **ids)
        model = LlamaForCausalLM(config)
    elif kind == "opt":
        config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                           max_position_embeddings=512, word_embed_proj_dim=32, dropout=0.0, init_std=0.2, **ids)
        model = OPTForCausalLM(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
