"""`random:<shape>` models: the named shapes, seeded weights (every worker loads the same model), clear errors."""

from __future__ import annotations

import pytest
import torch

from pipeline.generation.models import load_model, load_tokenizer
from pipeline.generation.random_models import SHAPES, random_config


def test_same_name_same_weights_and_the_tokenizers_ids():
    first, second = load_model("random:tiny-llama", "float32"), load_model("random:tiny-llama", "float32")
    assert first.fingerprint() == second.fingerprint()
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    config = first.model.config
    assert (config.model_type, first.num_layers, config.hidden_size, config.num_key_value_heads) == ("llama", 6, 64, 2)
    assert config.vocab_size == len(first.tokenizer) and config.eos_token_id == first.tokenizer.eos_token_id
    assert load_model("random:tiny-llama", "bfloat16").model.dtype == torch.bfloat16


def test_opt_1_3b_has_the_study_models_shapes():
    config = random_config("random:opt-1.3b", load_tokenizer())
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.ffn_dim, config.vocab_size) == ("opt", 24, 2048, 32, 8192, 50272)
    assert set(SHAPES) == {"opt-1.3b", "tiny-opt", "tiny-llama"}


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="unknown random model shape 'opt-9b'; choose from opt-1.3b"):
        load_model("random:opt-9b")
