"""Tiny randomly initialised Llama and OPT models, saved as ordinary Hugging Face folders with the embedded
model's tokenizer, so that `load_model(folder)`, `dynoracle run --model` and checkpoint tables read them."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from pipeline.generation.models import LoadedModel, decoder_layers, load_tokenizer

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


def tiny_llama(num_layers: int, initializer_range: float = 0.02) -> LoadedModel:
    """An in-memory random Llama (the embedded model's architecture) in float32 with the embedded tokenizer."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=initializer_range)
    return LoadedModel(name="tiny-llama", model=LlamaForCausalLM(config).eval(), tokenizer=tokenizer, dtype="float32")


@contextmanager
def skipped_as_identity(lm: LoadedModel, kept: tuple[int, ...], prefill: str, prompt_length: int) -> Iterator[None]:
    """The identity-layer reference: every layer not in `kept` passes its input through (under the `full` prefill
    only at positions from `prompt_length` on: the prompt still runs every layer, as the shared prefill does)."""
    stack = decoder_layers(lm.model)
    for j, layer in enumerate(stack):
        if j in kept:
            continue
        if prefill == "full":
            def forward(hidden_states, *args, _original=layer.forward, **kwargs):
                out = _original(hidden_states, *args, **kwargs)
                in_prompt = torch.arange(hidden_states.shape[1]) < prompt_length
                return torch.where(in_prompt[None, :, None], out, hidden_states)
        else:
            def forward(hidden_states, *args, **kwargs):
                return hidden_states
        layer.forward = forward  # an instance attribute: shadows the class's forward until deleted
    try:
        yield
    finally:
        for layer in stack:
            layer.__dict__.pop("forward", None)
