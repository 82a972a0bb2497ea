"""The per-token oracle's shard task (`dynoracle token-oracle`): teacher-forced passes over a finished run's full-model
outputs, every configuration of the run at every token with the full model's states for earlier tokens
(definition in `pipeline.analysis.token_oracle`).

Per batch of sequences: one full-model pass over prompt + output gives every layer's K/V and the full model's
greedy token at each position; then every configuration runs once over the output positions on the engine's
routed layers, each position's query attending to the full model's K/V of the earlier positions and to its own
K/V at its own position (`full_prefix_attention`). Rows: `token-oracle/shard=NNNNN.parquet`, one per (sequence,
token, family); summary `token-oracle.parquet` (per family: mean cost per token with its bootstrap interval)
and `token-oracle-positions.parquet` (per family and position bucket).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache

from pipeline.analysis.bootstrap import DEFAULT_RESAMPLES
from pipeline.analysis.token_oracle import FOLDER, POSITIONS, SHARD_SCHEMA, SUMMARY, by_position, cheapest_matching, summarise
from pipeline.data.adapters import Example
from pipeline.generation.configs import FULL_ID, LOOP, SkipConfig, build_configs
from pipeline.generation.engine import (
    _RoutedLayer,
    attention_implementation,
    left_pad,
    program_membership,
    prompt_positions,
    wrapped_layers,
)
from pipeline.generation.models import LoadedModel, load_tokenizer
from pipeline.run.atomic import write_parquet
from pipeline.run.runner import run_task
from pipeline.run.shard_task import ShardTask

FULL_PREFIX_ATTENTION = "dynoracle_full_prefix"
ROW_TOKENS = 1 << 13  # (row, position) pairs per forward: bounds activations and the LM head's logits



class _FullPrefix:
    """Per layer, the full model's K/V over the padded sequence, and which prompt each routed row reads."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], bias: torch.Tensor, start: int,
                 rows_of_layer: list[torch.Tensor]):
        self.kv = kv  # per layer (P, Hkv, S, D) float32
        self.bias = bias  # (P, 1, T, S): 0 where position start + t may read key s (s < start + t, not padding)
        self.start = start  # padded index of the first output position
        self.rows_of_layer = rows_of_layer  # per layer: prompt index of each row that runs it

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """query (R, H, T, D), key/value (R, Hkv, T, D) the rows' own -> (R, T, H, D)."""
        prompts = self.rows_of_layer[layer]
        keys, values = (t[prompts] for t in self.kv[layer])
        rows, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        q = query.float().view(rows, kv_heads, heads // kv_heads, length, dim) * scaling
        prefix = torch.einsum("rkgtd,rksd->rkgts", q, keys) + self.bias[prompts][:, :, None]
        own = torch.einsum("rkgtd,rktd->rkgt", q, key.float())[..., None]
        weights = torch.softmax(torch.cat([prefix, own], -1), -1)
        out = (torch.einsum("rkgts,rksd->rkgtd", weights[..., :-1], values)
               + weights[..., -1:] * value.float()[:, :, None])
        return out.reshape(rows, heads, length, dim).transpose(1, 2).to(query.dtype)


def full_prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          full_prefix: _FullPrefix | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention interface of the per-token oracle's configuration passes (registered as FULL_PREFIX_ATTENTION)."""
    if full_prefix is None:
        raise ValueError("full-prefix attention needs the full model's K/V (full_prefix)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return full_prefix.attend(module.layer_idx, query, key, value, scale), None


AttentionInterface.register(FULL_PREFIX_ATTENTION, full_prefix_attention)


def _greedy(lm: LoadedModel, states: torch.Tensor) -> torch.Tensor:
    """Greedy tokens of final (normed) states (N, D), the LM head applied in chunks."""
    head = lm.model.get_output_embeddings()
    return torch.cat([head(chunk).argmax(-1) for chunk in states.split(1024)])


@torch.inference_mode()
def token_matches(lm: LoadedModel, prompts: list[list[int]], outputs: list[list[int]],
                  layer_sets: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets (P, T), matches (P, U, T)) for output tokens 1..T of each sequence (T = longest output - 1).

    targets[i, t] is the full model's greedy token after prompt + outputs[i][: t + 1] (teacher-forced);
    matches[i, u, t] says layer set u gives the same token there with the full model's states for every earlier
    position. Positions past a sequence's end are False / -1. Every output needs at least two tokens.
    """
    model, device = lm.model, lm.device
    if any(len(o) < 2 for o in outputs):
        raise ValueError("every output needs at least two tokens (its first is the prefill's)")
    input_ids, attention_mask = left_pad(prompts, lm.tokenizer.pad_token_id, device)
    num_prompts, width = input_ids.shape
    length = max(len(o) for o in outputs) - 1
    fed = torch.full((num_prompts, length), lm.tokenizer.pad_token_id, dtype=torch.long, device=device)
    valid = torch.zeros((num_prompts, length), dtype=torch.bool, device=device)
    for i, out in enumerate(outputs):
        fed[i, : len(out) - 1] = torch.tensor(out[:-1])  # r_1 .. r_{n-1}, each predicting the next
        valid[i, : len(out) - 1] = True
    positions = torch.cat([prompt_positions(input_ids, attention_mask),
                           prompt_positions(input_ids, attention_mask)[:, -1:] + 1 + torch.arange(length, device=device)], 1)
    mask = torch.cat([attention_mask, valid.long()], 1)
    cache = DynamicCache(config=model.config)
    full = model.get_decoder()(input_ids=torch.cat([input_ids, fed], 1), attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=True).last_hidden_state[:, width:]
    targets = _greedy(lm, full.reshape(-1, full.shape[-1])).view(num_prompts, length)
    kv = [(layer.keys.float(), layer.values.float()) for layer in cache.layers]
    total = width + length
    earlier = torch.arange(total, device=device)[None, :] < (width + torch.arange(length, device=device))[:, None]
    visible = earlier[None] & mask.bool()[:, None, :]  # (P, T, S)
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=device).masked_fill_(~visible, float("-inf"))[:, None]

    matches = torch.zeros((num_prompts, len(layer_sets), length), dtype=torch.bool, device=device)
    per_group = max(1, ROW_TOKENS // (num_prompts * length))
    with wrapped_layers(model, _RoutedLayer) as wrappers, attention_implementation(model, FULL_PREFIX_ATTENTION):
        for start in range(0, len(layer_sets), per_group):
            group = layer_sets[start : start + per_group]
            prompt_of_row = torch.arange(num_prompts, device=device).repeat(len(group))
            membership = program_membership(group, tuple(range(len(wrappers))), device)[torch.arange(len(group), device=device)
                                                                     .repeat_interleave(num_prompts)]
            for j, wrapper in enumerate(wrappers):
                column = membership[:, j]
                wrapper.rows = None if bool(column.all()) else column.nonzero().squeeze(1)
                wrapper.executed = None
            prefix = _FullPrefix(kv, bias, width, [prompt_of_row[membership[:, j]] for j in range(len(wrappers))])
            states = model.get_decoder()(input_ids=fed[prompt_of_row], position_ids=positions[prompt_of_row, width:],
                                         use_cache=False, full_prefix=prefix).last_hidden_state
            tokens = _greedy(lm, states.reshape(-1, states.shape[-1])).view(len(group), num_prompts, length)
            matches[:, start : start + len(group)] = (tokens == targets[None]).transpose(0, 1) & valid[:, None]
    return targets.masked_fill(~valid, -1), matches


@dataclass(frozen=True)
class TokenOracleTask(ShardTask):
    """The per-token oracle over one shard of a run's sequences; `outputs` maps seq_id to the full model's output
    token ids (re-encoded from the run's text, cut to max_new_tokens)."""

    configs: tuple[SkipConfig, ...]
    outputs: dict[str, tuple[int, ...]]
    batch_size: int

    folder: ClassVar[str] = FOLDER
    schema: ClassVar[pa.Schema] = SHARD_SCHEMA
    key_columns: ClassVar[tuple[str, ...]] = ("seq_id", "position", "family")

    @property
    def families(self) -> list[str]:
        return sorted({c.family for c in self.configs if c.config_id != FULL_ID})

    def expected_keys(self, examples: list[Example]) -> set[tuple]:
        return {(ex.seq_id, t, f) for ex in examples for t in range(1, len(self.outputs[ex.seq_id]))
                for f in self.families}

    def run(self, lm: LoadedModel, shard: int, examples: list[Example],
            on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        configs = [c for c in self.configs if c.config_id != FULL_ID]
        sets = list(dict.fromkeys(c.layers for c in configs))
        column = [sets.index(c.layers) for c in configs]
        costs = np.array([c.cost for c in configs])
        families = np.array([c.family for c in configs])
        usable = [ex for ex in examples if len(self.outputs[ex.seq_id]) >= 2]
        usable.sort(key=lambda ex: (ex.prompt_tokens, ex.seq_id))
        records: list[tuple] = []
        for start in range(0, len(usable), self.batch_size):
            batch = usable[start : start + self.batch_size]
            outputs = [list(self.outputs[ex.seq_id]) for ex in batch]
            targets, matches = token_matches(lm, [list(ex.prompt_ids) for ex in batch], outputs, sets)
            for i, ex in enumerate(batch):
                n = len(outputs[i]) - 1
                per_config = matches[i][column][:, :n].T.cpu().numpy()  # (n, K)
                cheapest = cheapest_matching(per_config, costs, families, self.families, lm.num_layers)
                for t in range(n):
                    for f, family in enumerate(self.families):
                        cost = int(cheapest[t, f])
                        chosen = [c.config_id for k, c in enumerate(configs)
                                  if c.family == family and c.cost == cost and per_config[t, k]]
                        records.append((ex.seq_id, shard, t + 1, int(targets[i, t]), family, cost,
                                        chosen[0] if chosen else FULL_ID, lm.num_layers))
        return pa.Table.from_pylist([dict(zip(SHARD_SCHEMA.names, r)) for r in records], schema=SHARD_SCHEMA)


def run_token_oracle(run_dir: str | Path, workers: int | None = None, address: str | None = None,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """`dynoracle token-oracle`: the task over every shard of a finished run (resumable, the run's model and
    configurations), then the two summary files. Returns counts, seconds and the summary frame."""
    root = Path(run_dir)

    def make_task(spec, record):
        if LOOP in spec.families:
            raise ValueError(f"{run_dir}: the per-token oracle compares layer subsets, and this run has loop "
                             "programs (a layer runs twice); run it on a run without the loop family")
        configs = spec.select_configs(build_configs(record["num_layers"], spec.families, spec.rls_seeds))
        tokenizer = load_tokenizer(spec.model, spec.trust_remote_code)
        full = pq.read_table(root / "generations", columns=["seq_id", "output"], filters=[("config_id", "=", FULL_ID)])
        outputs = {seq: tuple(tokenizer(text, add_special_tokens=False)["input_ids"][: spec.max_new_tokens])
                   for seq, text in zip(full["seq_id"].to_pylist(), full["output"].to_pylist())}
        return TokenOracleTask(tuple(configs), outputs, spec.batch_size)

    done = run_task(root, make_task, address, workers)
    tokens = pq.read_table(root / FOLDER, schema=SHARD_SCHEMA).to_pandas()
    summary = summarise(tokens, resamples, seed)
    write_parquet(pa.Table.from_pandas(summary, preserve_index=False), root / SUMMARY)
    write_parquet(pa.Table.from_pandas(by_position(tokens), preserve_index=False), root / POSITIONS)
    return {"shards": done.shards, "computed": done.computed, "skipped": done.skipped, "seconds": done.seconds,
            "tokens": len(tokens), "summary": summary}
