"""Randomly initialised models of named shapes: a model's cost without its weights.

A GPU machine that can download nothing still needs the source study's model size to measure the
engine, and the tests need small models of other architectures than the embedded one. So a model name
`random:<shape>` builds a Hugging Face model from a config written here, with seeded random weights
(the same on every worker) and the embedded tokenizer's ids. Its outputs are meaningless text; its
shapes, FLOPs and memory are those of the named model. Shapes of OPT-1.3B from its published config
(facebook/opt-1.3b, the size of the study's OPT-IML-1.3B).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, PretrainedConfig, PreTrainedTokenizerBase

RANDOM_PREFIX = "random:"
SEED = 0

SHAPES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "opt-1.3b": (OPTConfig, dict(vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                                 num_attention_heads=32, word_embed_proj_dim=2048, max_position_embeddings=2048)),
    "tiny-opt": (OPTConfig, dict(hidden_size=64, ffn_dim=128, num_hidden_layers=6, num_attention_heads=4,
                                 word_embed_proj_dim=64, max_position_embeddings=512)),
    "tiny-llama": (LlamaConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
}


def is_random(name: str) -> bool:
    return name.startswith(RANDOM_PREFIX)


def random_config(name: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The config of `random:<shape>`; a shape without its own vocabulary takes the tokenizer's.

    Raises ValueError for an unknown shape.
    """
    shape = name[len(RANDOM_PREFIX):]
    if shape not in SHAPES:
        raise ValueError(f"unknown random model shape {shape!r}; choose from {', '.join(SHAPES)}")
    config_class, fields = SHAPES[shape]
    fields = {"vocab_size": len(tokenizer), **fields}
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id  # as load_model pads
    return config_class(**fields, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)


def build_random_model(name: str, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype,
                       device: str | None) -> torch.nn.Module:
    """`random:<shape>` with weights drawn from seed 0, built directly on `device` (a 1.3B model: ~2 s on a GPU).

    Weights are drawn in float32 and then cast, so every dtype holds the same model, rounded.
    """
    config = random_config(name, tokenizer)
    torch.manual_seed(SEED)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype)
