"""The engine on tiny random models of many architectures from transformers' causal-LM mapping.

Each model type of `pipeline.generation.architectures` is either checked against the identity-layer reference
(skipped layers computed and masked out) under both prefill policies, or refused up front with one line
saying why and what works instead; the README's list is the one `supported_markdown` makes.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from test_bad_jobs import TINY, refused_run, workdir  # noqa: F401 (workdir is a fixture)
from test_engine import _assert_engine_equals_masked
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from pipeline.generation.architectures import (
    CHECKED,
    FULL_PREFILL_REFUSED,
    REFUSED,
    architecture_problem,
    supported_markdown,
)
from pipeline.generation.configs import build_configs
from pipeline.generation.models import LoadedModel, load_tokenizer

VOCAB = 256  # ids the embedded tokenizer decodes; small, so the LM head costs nothing
# Tiny sizes under every name the configs use; each config takes the ones its constructor knows.
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, head_dim=8, max_position_embeddings=256, n_embd=32, n_layer=4, n_head=4,
             n_inner=64, ffn_dim=64, d_model=32, n_positions=256, word_embed_proj_dim=32, moe_intermediate_size=32,
             num_experts=4, num_local_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32,
             rotary_dim=8, partial_rotary_factor=0.5)
PROMPTS = [[5, 17, 30, 40, 23], [9, 88, 120]]  # two lengths: the shorter one is left-padded
CONFIG_IDS = ("uls-2", "ee-3")  # skips inside the stack and at its end


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer()
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    return tok


def tiny_config(model_type: str, tokenizer):
    cls = CONFIG_MAPPING[model_type]
    known = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    special = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return cls(**{k: v for k, v in {**SIZES, **special}.items() if k in known})


def test_the_tables_cover_at_least_20_causal_lm_architectures() -> None:
    types = [*CHECKED, *FULL_PREFILL_REFUSED, *REFUSED]
    assert len(types) == len(set(types)) >= 20
    assert set(types) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.parametrize("model_type", [*CHECKED, *FULL_PREFILL_REFUSED])
def test_engine_equals_identity_layer_reference(model_type: str, tokenizer) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tokenizer), dtype=torch.float32).eval()
    lm = LoadedModel(model_type, model, tokenizer, "float32")
    configs = [c for c in build_configs(lm.num_layers) if c.config_id in CONFIG_IDS]
    assert len(configs) == len(CONFIG_IDS)
    for prefill in ("full", "skip"):
        if prefill == "full" and model_type in FULL_PREFILL_REFUSED:
            assert architecture_problem(model.config, prefill) == (
                f"architecture {model_type} cannot share its prompt pass: {FULL_PREFILL_REFUSED[model_type]}; "
                'use prefill = "skip"')
            continue
        assert architecture_problem(model.config, prefill) is None
        _assert_engine_equals_masked(lm, PROMPTS, configs, prefill)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_architectures_say_why_and_what_works(model_type: str, tokenizer) -> None:
    config = tiny_config(model_type, tokenizer)
    for prefill in ("full", "skip"):
        assert architecture_problem(config, prefill) == f"architecture {model_type} is not supported: {REFUSED[model_type]}"


def test_a_refused_architecture_is_refused_before_ray(workdir: Path, tmp_path: Path, tokenizer) -> None:  # noqa: F811
    folder = tmp_path / "tiny-mamba"
    AutoModelForCausalLM.from_config(tiny_config("mamba", tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    refused_run([*TINY, "--model", str(folder)], workdir,
                f"{folder}: architecture mamba is not supported: {REFUSED['mamba']}")


def test_readme_lists_exactly_these_architectures() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert supported_markdown() in readme
