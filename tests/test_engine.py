"""The engine against Hugging Face `generate` and against the masked (identity-layer) reference, in float32.

The exactness checks run on `--device` (default cpu; `benchmarks/gpu.sh` runs them with `--device cuda`):
the embedded model where its package is installed, and tiny random Llama and OPT models everywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from pipeline.generation.configs import build_configs, configs_by_id, full_config
from pipeline.generation.engine import _SharedPromptLayer, generate, left_pad
from pipeline.generation.models import LoadedModel, decoder_layers, embedded_gguf_path, load_model, load_tokenizer
from pipeline.generation.reference import masked_generate

NEW_TOKENS = 6
TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def _data_dir() -> Path:
    return Path(os.environ.get("DYNORACLE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def smol(device: str) -> LoadedModel:
    try:
        embedded_gguf_path()
    except FileNotFoundError as exc:  # e.g. on a GPU machine that received the tokenizer alone
        pytest.skip(str(exc))
    return load_model(dtype="float32", device=device)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Eight real Alpaca prompts, all of different token lengths, so one batch needs left padding."""
    tokenizer = load_tokenizer()
    chosen: dict[int, list[int]] = {}
    for line in (_data_dir() / "alpaca" / "alpaca_sample.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["input"]:
            continue
        ids = tokenizer(TEMPLATE.format(**row))["input_ids"]
        chosen.setdefault(len(ids), ids)
        if len(chosen) == 8:
            break
    return list(chosen.values())


@pytest.fixture(scope="module")
def tiny_opt(device: str) -> LoadedModel:
    """A small randomly initialised OPT (the study's architecture) speaking the embedded tokenizer's ids."""
    return load_model("random:tiny-opt", "float32", device)


@pytest.fixture(scope="module")
def tiny_llama(device: str) -> LoadedModel:
    """A small randomly initialised Llama (grouped-query attention, rotary positions)."""
    return load_model("random:tiny-llama", "float32", device)


def _hf_generate(lm: LoadedModel, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Hugging Face greedy `generate`, each row cut after its first EOS (the rest is padding)."""
    input_ids, attention_mask = left_pad(prompts, lm.tokenizer.pad_token_id, lm.device)
    out = lm.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                            max_new_tokens=new_tokens, pad_token_id=lm.tokenizer.pad_token_id)
    eos = lm.model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out[:, input_ids.shape[1]:].tolist():
        ends = [i for i, t in enumerate(row) if t in stops]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows


@pytest.mark.parametrize("model_fixture", ["smol", "tiny_llama", "tiny_opt"])
def test_full_configuration_equals_hf_generate(model_fixture, prompts, request):
    lm = request.getfixturevalue(model_fixture)
    assert len({len(p) for p in prompts}) == 8
    expected = _hf_generate(lm, prompts, NEW_TOKENS)
    for prefill in ("full", "skip"):
        got = generate(lm, prompts, [full_config(lm.num_layers)], NEW_TOKENS, prefill=prefill)
        assert [row[0].token_ids for row in got] == expected


SKIP_IDS = ["uls-5", "uls-12", "uls-20", "uls-29", "ee-3", "ee-18", "rls-7-s0", "rls-22-s1"]


def _assert_engine_equals_masked(lm: LoadedModel, prompts: list[list[int]], configs: list, prefill: str,
                                 use_cache: bool = True) -> None:
    """All configurations decoded together by the engine == each one alone in the masked reference."""
    got = generate(lm, prompts, configs, NEW_TOKENS, prefill=prefill)
    for k, cfg in enumerate(configs):
        expected = masked_generate(lm, prompts, cfg, NEW_TOKENS, prefill=prefill, use_cache=use_cache)
        assert [row[k].token_ids for row in got] == expected, cfg.config_id


@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_skipping_equals_identity_layer_reference(smol, prompts, prefill):
    configs = [configs_by_id(build_configs(smol.num_layers, rls_seeds=(0, 1)))[i] for i in SKIP_IDS]
    _assert_engine_equals_masked(smol, prompts, configs, prefill)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_opt"])
@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_skipping_on_tiny_models_equals_reference(model_fixture, prompts, prefill, request):
    lm = request.getfixturevalue(model_fixture)
    configs = [c for c in build_configs(lm.num_layers) if c.budget in (2, 4)]
    _assert_engine_equals_masked(lm, prompts, configs, prefill)


@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_cached_decoding_equals_uncached_recomputation(smol, prompts, prefill):
    configs = [configs_by_id(build_configs(smol.num_layers))[i] for i in ("uls-9", "ee-14", "rls-25-s0")]
    _assert_engine_equals_masked(smol, prompts[:4], configs, prefill, use_cache=False)


def test_finished_rows_stop_costing_compute(smol, prompts):
    """Make one row's second token an EOS: later steps run on a smaller batch and other rows are unchanged."""
    configs = [full_config(smol.num_layers), configs_by_id(build_configs(smol.num_layers))["uls-15"]]
    before = generate(smol, prompts, configs, NEW_TOKENS, ignore_eos=True)
    stopper = before[0][0].token_ids[1]
    generation_config = smol.model.generation_config
    original_eos = generation_config.eos_token_id
    batch_sizes: list[int] = []
    hook = smol.model.get_input_embeddings().register_forward_hook(
        lambda _module, args, _out: batch_sizes.append(args[0].shape[0]))
    try:
        generation_config.eos_token_id = [stopper]
        after = generate(smol, prompts, configs, NEW_TOKENS)
    finally:
        hook.remove()
        generation_config.eos_token_id = original_eos
    assert after[0][0].token_ids == before[0][0].token_ids[:2]
    assert after[0][0].finish_reason == "eos"
    # One forward per step: the shared prefill on the prompts, then decode steps on the rows still live.
    finished_at = [g.gen_tokens - 1 for row in after for g in row if g.finish_reason == "eos"]
    rows = len(prompts) * len(configs)
    expected = [len(prompts)] + [rows - sum(1 for f in finished_at if f < step) for step in range(1, NEW_TOKENS)]
    assert batch_sizes == expected
    assert expected[-1] < rows
    for i, row in enumerate(after):
        for k, g in enumerate(row):
            full_row = before[i][k].token_ids
            cut = full_row.index(stopper) + 1 if stopper in full_row else len(full_row)
            assert g.token_ids == full_row[:cut]
            assert g.finish_reason == ("eos" if stopper in full_row else "length")


@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_layers_per_token_counts_executed_layers(smol, prompts, prefill):
    configs = [configs_by_id(build_configs(smol.num_layers))[i] for i in ("uls-4", "ee-11")]
    got = generate(smol, prompts[:2], configs, NEW_TOKENS, prefill=prefill, ignore_eos=True)
    L = smol.num_layers
    for row in got:
        for cfg, g in zip(configs, row):
            first = L if prefill == "full" else cfg.cost  # the prompt pass makes the first token
            assert g.gen_tokens == NEW_TOKENS
            assert g.layers_per_token == pytest.approx((first + cfg.cost * (NEW_TOKENS - 1)) / NEW_TOKENS)


def test_layers_are_restored_and_errors_are_clear(smol, prompts):
    stack = decoder_layers(smol.model)
    originals = list(stack)
    attention = smol.model.config._attn_implementation
    generate(smol, prompts[:1], [full_config(smol.num_layers)], 2)
    assert list(decoder_layers(smol.model)) == originals
    assert smol.model.config._attn_implementation == attention
    with pytest.raises(ValueError, match="prefill"):
        generate(smol, prompts[:1], [full_config(smol.num_layers)], 1, prefill="half")
    with pytest.raises(ValueError, match="does not fit"):
        generate(smol, prompts[:1], [full_config(smol.num_layers + 1)], 1)
    assert list(decoder_layers(smol.model)) == originals


def test_shared_prompt_attention_equals_attention_over_per_row_copies():
    """Rows of a prompt share its KV; with ragged rows per prompt, left padding and dropped rows, the result is
    the attention of each row over its own copy of prompt + generated KV."""
    torch.manual_seed(0)
    prompts, kv_heads, group, dim, prompt_len, steps = 3, 2, 3, 8, 7, 4
    keys, values = torch.randn(2, prompts, kv_heads, prompt_len, dim)
    mask = torch.ones(prompts, prompt_len, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    bias = torch.zeros(prompts, 1, 1, prompt_len).masked_fill_(~mask[:, None, None, :], float("-inf"))
    prompt_of_row = torch.tensor([0, 1, 2, 0, 2, 0])
    layer = _SharedPromptLayer(keys, values, bias, prompt_of_row, capacity=steps, kv_dtype=torch.float32)
    gen_keys, gen_values = torch.randn(2, len(prompt_of_row), kv_heads, steps, dim)
    for t in range(steps):
        layer.update(gen_keys[:, :, t : t + 1], gen_values[:, :, t : t + 1])

    def expected(rows: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        owner = prompt_of_row[rows]
        k = torch.cat([keys[owner], gen_keys[rows]], 2).repeat_interleave(group, 1)
        v = torch.cat([values[owner], gen_values[rows]], 2).repeat_interleave(group, 1)
        allowed = torch.cat([mask[owner], torch.ones(len(rows), steps, dtype=torch.bool)], 1)[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=allowed, scale=0.3)
        return out.transpose(1, 2)

    query = torch.randn(len(prompt_of_row), kv_heads * group, 1, dim)
    torch.testing.assert_close(layer.attend(query, 0.3), expected(torch.arange(6), query), atol=1e-5, rtol=1e-5)
    keep = torch.tensor([True, False, True, False, True, True])  # prompt 1 loses its only row
    layer.keep_rows(keep)
    assert layer.get_seq_length() == prompt_len + steps
    rows = keep.nonzero().squeeze(1)
    torch.testing.assert_close(layer.attend(query[rows], 0.3), expected(rows, query[rows]), atol=1e-5, rtol=1e-5)


def test_sliding_window_shorter_than_the_context_is_refused_under_full_prefill(smol, prompts):
    """The shared-prompt attention has no sliding window: a window the context outgrows must fail, not be ignored."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(smol.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    lm = LoadedModel(name="tiny-mistral", model=MistralForCausalLM(config).eval(), tokenizer=smol.tokenizer,
                     dtype="float32")
    with pytest.raises(NotImplementedError, match="sliding_window.*prefill='skip'"):
        generate(lm, prompts[:2], [full_config(2)], 3)
    assert generate(lm, prompts[:2], [full_config(2)], 3, prefill="skip", ignore_eos=True)[0][0].gen_tokens == 3
