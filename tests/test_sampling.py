"""Sampling in the engine: deterministic per seed and row, independent of batch composition (float32),
temperature 0 is greedy, and the draw follows the temperature / top-p distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.generation.configs import build_configs, full_config, sample_configs
from pipeline.generation.engine import generate
from pipeline.generation.models import load_model
from pipeline.generation.sampling import RowSampler, Sampling, row_seed

PROMPTS = [[1, 17, 940, 23, 5], [1, 300, 12], [1, 44, 45, 46, 47, 48, 49], [1, 9000, 31, 7]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(device: str):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend on a loaded machine
    yield load_model("random:tiny-llama", "float32", device)
    torch.set_num_threads(threads)


def _ids(generations) -> list[list[list[int]]]:
    return [[g.token_ids for g in per_prompt] for per_prompt in generations]


def _seeds(prompts, configs, seed=0) -> list[list[int]]:
    return [[row_seed(seed, f"p{i}", cfg.config_id) for cfg in configs] for i in range(len(prompts))]


@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_temperature_zero_is_greedy(tiny, prefill):
    configs = [*build_configs(tiny.num_layers, ("uls",)), *sample_configs(tiny.num_layers, 2)]
    greedy = generate(tiny, PROMPTS, configs, NEW_TOKENS, prefill=prefill, ignore_eos=True)
    zero = generate(tiny, PROMPTS, configs, NEW_TOKENS, prefill=prefill, ignore_eos=True, temperature=0.0,
                    top_p=0.5, seeds=_seeds(PROMPTS, configs))
    assert _ids(zero) == _ids(greedy)
    full = [g[0].token_ids for g in greedy]
    assert all(per_prompt[-1].token_ids == f for per_prompt, f in zip(greedy, full))  # greedy samples = full


@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_sampling_is_deterministic_per_seed_and_independent_of_the_batch(tiny, prefill):
    samples = sample_configs(tiny.num_layers, 3)
    seeds = _seeds(PROMPTS, samples)
    batch = generate(tiny, PROMPTS, samples, NEW_TOKENS, prefill=prefill, ignore_eos=True, temperature=1.0,
                     top_p=1.0, seeds=seeds)
    again = generate(tiny, PROMPTS, samples, NEW_TOKENS, prefill=prefill, ignore_eos=True, temperature=1.0,
                     top_p=1.0, seeds=seeds, max_rows=len(PROMPTS))  # other row groups, same rows
    assert _ids(again) == _ids(batch)
    for i, k in ((0, 2), (2, 0), (3, 1)):  # a row alone: the same tokens as inside the batch
        prompt, cfg = PROMPTS[i], samples[k]
        alone = generate(tiny, [prompt], [cfg], NEW_TOKENS, prefill=prefill, ignore_eos=True, temperature=1.0,
                         top_p=1.0, seeds=[[seeds[i][k]]])
        assert alone[0][0].token_ids == batch[i][k].token_ids
    outputs = {tuple(g.token_ids) for per_prompt in batch for g in per_prompt}
    assert len(outputs) > len(PROMPTS)  # the samples of a prompt differ: the seeds are used
    other = generate(tiny, PROMPTS, samples, NEW_TOKENS, prefill=prefill, ignore_eos=True, temperature=1.0,
                     top_p=1.0, seeds=_seeds(PROMPTS, samples, seed=1))
    assert _ids(other) != _ids(batch)


def test_sampling_ends_rows_at_eos_like_greedy(tiny):
    samples = sample_configs(tiny.num_layers, 4)
    out = generate(tiny, PROMPTS, samples, NEW_TOKENS, temperature=1.0, seeds=_seeds(PROMPTS, samples))
    eos = tiny.tokenizer.eos_token_id
    for per_prompt in out:
        for g in per_prompt:
            assert (g.finish_reason == "eos") == (g.token_ids[-1] == eos) and eos not in g.token_ids[:-1]
            assert g.layers_per_token == tiny.num_layers


def test_draws_follow_the_top_p_distribution():
    """An independent computation of the top-p distribution against the frequencies of 20,000 seeded draws."""
    logits = torch.tensor([2.0, 1.5, 0.3, 1.0, -1.0], dtype=torch.float64)
    temperature, top_p = 0.8, 0.8
    probs = np.exp(logits.numpy() / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    kept = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]  # fewest tokens reaching top_p
    expected = np.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    rows = 20000
    sampler = RowSampler(temperature, top_p, list(range(rows)))
    drawn = sampler.pick(logits.expand(rows, -1), torch.arange(rows)).numpy()
    freq = np.bincount(drawn, minlength=len(probs)) / rows
    assert set(np.flatnonzero(freq)) == set(kept.tolist())
    assert np.abs(freq - expected).max() < 4 * np.sqrt(0.25 / rows)  # 4 standard errors at worst
    tiny_p = RowSampler(1.0, 1e-6, [0, 1, 2]).pick(logits.expand(3, -1), torch.arange(3))
    assert tiny_p.tolist() == [0, 0, 0]  # top-p near 0 keeps only the most probable token


def test_top_k_candidates_equal_a_stable_sort_of_the_whole_vocabulary():
    """The sampler sorts only the top tokens; a plain stable sort of all of them, drawn with the same uniforms,
    picks the same tokens (ties included: logits rounded to create many)."""
    logits = (torch.randn(32, 5000, generator=torch.Generator().manual_seed(0)) * 4).round()
    temperature, top_p, seeds = 0.7, 0.95, list(range(100, 132))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(before >= top_p, 0.0)
    cumulative = probs.cumsum(-1)
    uniforms = torch.tensor([np.random.default_rng(s).random() for s in seeds], dtype=torch.float64)
    at = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1])[:, None], right=True)
    expected = order.gather(-1, at).squeeze(-1)
    drawn = RowSampler(temperature, top_p, seeds).pick(logits, torch.arange(32))
    assert drawn.tolist() == expected.tolist()


def test_row_seeds_and_settings():
    assert row_seed(0, "a", "sample-0") == row_seed(0, "a", "sample-0")
    assert len({row_seed(s, q, c) for s in (0, 1) for q in ("a", "b") for c in ("sample-0", "sample-1")}) == 8
    assert 0 <= row_seed(3, "x", "sample-7") < 2**63
    for bad, message in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"samples": -2}, "samples"),
                         ({"seed": True}, "seed")):
        with pytest.raises(ValueError, match=message):
            Sampling(**bad)
    assert [cfg.cost for cfg in sample_configs(6, 2)] == [6, 6] and full_config(6).layers == sample_configs(6, 1)[0].layers
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate_args = dict(temperature=1.0, seeds=[[1]])
        generate(None, [[1], [2]], [full_config(2)], 1, **generate_args)  # checked before the model is touched


def test_the_job_carries_the_sample_family_in_its_identity(tmp_path):
    from pipeline.run.job import load_job

    plain = load_job(dataset="alpaca", overrides={"sampling": {"samples": 0}})
    assert "sampling" not in plain.identity()  # runs without samples keep their identity
    job = load_job(dataset="alpaca", overrides={"sampling": {"samples": 3, "temperature": 0.5}})
    assert job.identity()["sampling"] == {"samples": 3, "temperature": 0.5, "top_p": 0.9, "seed": 0}
    ids = [cfg.config_id for cfg in job.configurations(30)]
    assert ids[-3:] == ["sample-0", "sample-1", "sample-2"] and len(ids) == 88 + 3
    bad = tmp_path / "bad.toml"
    bad.write_text('dataset = "alpaca"\n[sampling]\ntemp = 1\n')
    with pytest.raises(ValueError, match="unknown sampling field temp"):
        load_job(bad)
