"""The hidden-state similarity shard task: teacher-forced passes of every configuration on the engine's routed
layers, compared with the full model token by token (definitions in `pipeline.analysis.similarity`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers.cache_utils import Cache

from pipeline.analysis.bootstrap import DEFAULT_RESAMPLES
from pipeline.analysis.similarity import SHARD_SCHEMA, folder_name, summarise, summary_path
from pipeline.data.adapters import Example
from pipeline.generation.configs import FULL_ID, LOOP, SkipConfig, build_configs
from pipeline.generation.engine import (
    _RoutedLayer,
    _shared_prefill,
    _SlotLayer,
    left_pad,
    program_membership,
    prompt_positions,
    wrapped_layers,
)
from pipeline.generation.models import LoadedModel, cache_argument
from pipeline.run.atomic import write_parquet
from pipeline.run.runner import run_task
from pipeline.run.shard_task import ShardTask
from pipeline.run.tasks import run_task_name

ROW_TOKENS = 1 << 15  # (row, position) pairs per forward: bounds the activations of one group of rows


def cosine(states: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last axis in float32, exactly 1 where the two states are equal bit for bit.

    states, reference: (..., D) -> (...). A zero vector against anything else gives 0.
    """
    a, b = states.float(), reference.float()
    sim = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where((states == reference).all(-1), torch.ones_like(sim), sim)


@torch.inference_mode()
def state_similarity(lm: LoadedModel, prompts: list[list[int]], responses: list[list[int]],
                     layer_sets: list[tuple[int, ...]], prefill: str = "full") -> tuple[np.ndarray, np.ndarray]:
    """Mean over each response's tokens of the cosine similarity of every layer set's states to the full model's.

    prompts: P token lists (each non-empty); responses: P token lists (teacher-forced after the prompt, each
    non-empty); layer_sets: U sorted layer tuples, each starting at 0. Returns (final (P, U), layers (P, U, L)):
    final = the final state after the final norm, layers[..., l] = the state after layer l.
    """
    if prefill not in ("full", "skip"):
        raise ValueError(f"unknown prefill policy {prefill!r}; choose from full, skip")
    if not prompts or len(prompts) != len(responses) or any(not p or not r for p, r in zip(prompts, responses)):
        raise ValueError("need one non-empty prompt and one non-empty response per sequence")
    model, device, num_layers = lm.model, lm.device, lm.num_layers
    full = tuple(range(num_layers))
    sets = list(dict.fromkeys([full, *layer_sets]))  # the full model's rows first: the others compare to them
    pad = lm.tokenizer.pad_token_id
    input_ids, attention_mask = left_pad(prompts, pad, device)
    mask = attention_mask if bool((attention_mask == 0).any()) else None
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    for i, ids in enumerate(responses):
        response_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    valid = torch.arange(width, device=device) < torch.tensor([len(r) for r in responses], device=device)[:, None]
    positions = prompt_positions(input_ids, mask)
    response_positions = positions[:, -1:] + 1 + torch.arange(width, device=device)

    final = np.empty((len(prompts), len(sets)))
    layers = np.empty((len(prompts), len(sets), num_layers))
    reference: list[torch.Tensor] = []  # the full model's states per layer, then its final state: (P, T, D)
    length = width + (input_ids.shape[1] if prefill == "skip" else 0)
    per_group = max(1, ROW_TOKENS // (len(prompts) * length))
    with wrapped_layers(model, _RoutedLayer) as wrappers:
        shared = _shared_prefill(model, wrappers, input_ids, mask) if prefill == "full" else None
        for start in range(0, len(sets), per_group):
            group = sets[start : start + per_group]
            states = _group_states(lm, wrappers, group, input_ids, attention_mask, positions, response_ids,
                                   response_positions, shared)
            for j, tensor in enumerate(states):
                tensor = tensor.view(len(group), len(prompts), width, -1)
                if start == 0:
                    reference.append(tensor[0])
                sim = cosine(tensor, reference[j][None])  # (G, P, T)
                mean = (sim * valid).sum(-1) / valid.sum(-1)  # (G, P)
                target = final if j == num_layers else layers[..., j]
                target[:, start : start + len(group)] = mean.T.double().cpu().numpy()
    index = [sets.index(s) for s in layer_sets]
    return final[:, index], layers[:, index]


def _group_states(lm: LoadedModel, wrappers: list[_RoutedLayer], group: list[tuple[int, ...]],
                  input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                  response_ids: torch.Tensor, response_positions: torch.Tensor, shared) -> list[torch.Tensor]:
    """One forward of every (layer set, prompt) row of a group over the responses: each layer's output and the
    final normed state at the response positions, each (rows, T, D), rows set-major."""
    model, device = lm.model, input_ids.device
    num_prompts, prompt_len = input_ids.shape
    width = response_ids.shape[1]
    prompt_of_row = torch.arange(num_prompts, device=device).repeat(len(group))
    set_of_row = torch.arange(len(group), device=device).repeat_interleave(num_prompts)
    membership = program_membership(group, tuple(range(len(wrappers))), device)[set_of_row]
    rows = prompt_of_row.numel()
    everyone = bool(membership.all())
    for j, wrapper in enumerate(wrappers):
        column = membership[:, j]
        wrapper.rows = None if everyone or bool(column.all()) else column.nonzero().squeeze(1)
        wrapper.executed = None
    row_mask = torch.cat([attention_mask[prompt_of_row], attention_mask.new_ones(rows, width)], 1)
    if shared is not None:  # prompts ran through every layer once; each row's response attends to that KV
        cache = Cache(layers=[_SlotLayer(prompt_len + width) for _ in wrappers])
        for j, (keys, values) in enumerate(shared.prompt_kv):
            kept = prompt_of_row[membership[:, j]]
            cache.layers[j].load(keys[kept].to(model.dtype), values[kept].to(model.dtype))
        ids, position_ids = response_ids[prompt_of_row], response_positions[prompt_of_row]
    else:  # the prompt runs through the kept layers too, in the same pass
        cache = None
        ids = torch.cat([input_ids, response_ids], 1)[prompt_of_row]
        position_ids = torch.cat([positions, response_positions], 1)[prompt_of_row]
    captured: list[torch.Tensor] = []
    hooks = [w.register_forward_hook(lambda _m, _a, out: captured.append(out[:, -width:])) for w in wrappers]
    try:
        decoder = model.get_decoder()
        out = decoder(input_ids=ids, attention_mask=row_mask, position_ids=position_ids,
                      use_cache=cache is not None, **cache_argument(decoder, cache))
    finally:
        for hook in hooks:
            hook.remove()
    return [*captured, out.last_hidden_state[:, -width:]]


@dataclass(frozen=True)
class SimilarityTask(ShardTask):
    """Hidden-state similarity of every configuration of a run to its full model, one shard of sequences at a time.

    `full_outputs` maps seq_id to the full model's output text when the response is the model's own output
    (None for the reference). Responses are cut to `max_tokens` tokens (the run's max_new_tokens).
    """

    configs: tuple[SkipConfig, ...]
    prefill: str
    response: str
    max_tokens: int
    batch_size: int
    full_outputs: dict[str, str] | None = None

    schema: ClassVar[pa.Schema] = SHARD_SCHEMA
    key_columns: ClassVar[tuple[str, ...]] = ("seq_id", "config_id")

    @property
    def folder(self) -> str:  # type: ignore[override]
        return folder_name(self.response)

    def expected_keys(self, examples: list[Example]) -> set[tuple]:
        return {(ex.seq_id, cfg.config_id) for ex in examples for cfg in self.configs}

    def response_ids(self, lm: LoadedModel, example: Example) -> list[int]:
        text = example.reference if self.full_outputs is None else self.full_outputs[example.seq_id]
        return lm.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_tokens]

    def run(self, lm: LoadedModel, shard: int, examples: list[Example],
            on_tokens: Callable[[int], None] | None = None) -> pa.Table:
        configs = list(self.configs)
        sets = list(dict.fromkeys(cfg.layers for cfg in configs))
        responses = [self.response_ids(lm, ex) for ex in examples]
        num_layers = lm.num_layers
        final = np.full((len(examples), len(sets)), np.nan)
        layers = np.full((len(examples), len(sets), num_layers), np.nan)
        usable = [i for i, r in enumerate(responses) if r]  # an empty response has no token to compare
        order = sorted(usable, key=lambda i: (examples[i].prompt_tokens + len(responses[i]), i))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            f, per_layer = state_similarity(lm, [list(examples[i].prompt_ids) for i in batch],
                                            [responses[i] for i in batch], sets, self.prefill)
            final[batch], layers[batch] = f, per_layer
        column = {s: u for u, s in enumerate(sets)}
        rows = [(i, ex, cfg) for i, ex in enumerate(examples) for cfg in configs]
        return pa.table({
            "seq_id": [ex.seq_id for _, ex, _ in rows],
            "shard": [shard] * len(rows),
            "config_id": [cfg.config_id for _, _, cfg in rows],
            "family": [cfg.family for _, _, cfg in rows],
            "cost": [cfg.cost for _, _, cfg in rows],
            "tokens": [len(responses[i]) for i, _, _ in rows],
            "final_similarity": pa.array([final[i, column[cfg.layers]] for i, _, cfg in rows], from_pandas=True),
            "layer_similarity": [None if not responses[i] else layers[i, column[cfg.layers]].tolist()
                                 for i, _, cfg in rows],
        }, schema=SHARD_SCHEMA)


def run_similarity(run_dir: str | Path, response: str = "reference", workers: int | None = None,
                   address: str | None = None, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """`dynoracle similarity`: the similarity task over every shard of a finished run (resumable, with the run's
    model, prefill and configurations), then its summary file. Returns counts, seconds and the summary's path.

    Raises ValueError for an unfinished run or an unknown response kind.
    """
    folder = folder_name(response)
    if resamples < 1:
        raise ValueError(f"bootstrap resamples must be >= 1, got {resamples}")

    def make_task(spec, record):
        if LOOP in spec.families:
            raise ValueError(f"{run_dir}: similarity compares per-layer states of layer subsets, and this run has "
                             "loop programs (a layer runs twice); run it on a run without the loop family")
        configs = spec.select_configs(build_configs(record["num_layers"], spec.families, spec.rls_seeds))
        outputs = None
        if response == "full" and run_task_name(record) != "generate":
            raise ValueError(f"{run_dir} is a multiple-choice run: it generated no outputs to teacher-force; "
                             "use --response reference (the right choice after the question)")
        if response == "full":
            full = pq.read_table(Path(run_dir) / "generations", columns=["seq_id", "config_id", "output"],
                                 filters=[("config_id", "=", FULL_ID)])
            outputs = dict(zip(full["seq_id"].to_pylist(), full["output"].to_pylist()))
        return SimilarityTask(tuple(configs), spec.prefill, response, spec.max_new_tokens, spec.batch_size, outputs)

    done = run_task(run_dir, make_task, address, workers)
    table = pq.read_table(Path(run_dir) / folder, schema=SHARD_SCHEMA)
    path = summary_path(run_dir, response)
    write_parquet(summarise(table, resamples, seed), path)
    return {"shards": done.shards, "computed": done.computed, "skipped": done.skipped, "seconds": done.seconds,
            "rows": table.num_rows, "summary": path}
