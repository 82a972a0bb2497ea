"""Hidden-state similarity to the full model: the study's evidence that layer skipping keeps the model's states
closer to the full model's than early exit does (Glavas et al. 2024, figures 1a, 4 and 5).

For each sequence of a finished run and each configuration, one teacher-forced pass over the prompt and a
response (the dataset's reference, as the study did, or the full model's own output from the run), under
the run's prefill policy. For every response token it computes the cosine similarity to the full model's
state at the same token of
- the final hidden state: the LM head's input, after the final norm, for every configuration alike; early
  exit's final state is the state after its last layer *with* the final norm applied (the study's code
  compares early exit's state without the norm against the full model's with it; here both have it);
- the hidden state after each layer l (0-based), carried through unchanged where l is skipped.

The pass runs on the engine's layer-skipping machinery: every configuration of a batch of prompts is a
row of one batch, and each decoder layer runs only on the rows that keep it (`pipeline.engine`). Under
the `full` prefill the prompts run once through all layers (the engine's shared prefill) and every row's
response attends to its prompt's full-model KV; under `skip` the whole sequence runs through the kept layers.
Configurations with the same layers are computed once.

Output: the shard task `SimilarityTask` writes one row per (sequence, configuration) into
`similarity-<response>/shard=NNNNN.parquet`; `summarise` reduces those rows to
`similarity-<response>.parquet`: per configuration and layer (layer L is the final state), the mean over
tokens and sequences with a paired-bootstrap percentile interval over sequences (`pipeline.bootstrap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch
from transformers.cache_utils import Cache

from pipeline.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, resample_indices
from pipeline.configs import FULL_ID, SkipConfig
from pipeline.data import Example
from pipeline.engine import (_membership, _RoutedLayer, _shared_prefill, _SlotLayer, left_pad, prompt_positions,
                             wrapped_layers)
from pipeline.executor import ShardTask
from pipeline.models import LoadedModel

RESPONSES = ("reference", "full")
ROW_TOKENS = 1 << 15  # (row, position) pairs per forward: bounds the activations of one group of rows

SHARD_SCHEMA = pa.schema([
    ("seq_id", pa.string()),
    ("shard", pa.int32()),
    ("config_id", pa.string()),
    ("family", pa.string()),
    ("cost", pa.int16()),
    ("tokens", pa.int32()),  # response tokens compared; 0 leaves the similarities null
    ("final_similarity", pa.float64()),  # mean over the tokens of the final (normed) state's cosine similarity
    ("layer_similarity", pa.list_(pa.float64())),  # (L,) the same after each layer
])
SUMMARY_SCHEMA = pa.schema([
    ("config_id", pa.string()),
    ("family", pa.string()),
    ("cost", pa.int16()),
    ("layer", pa.int16()),  # 0..L-1: after that layer; L: the final state, after the final norm
    ("similarity", pa.float64()),  # mean over every response token of every sequence
    ("lo", pa.float64()),
    ("hi", pa.float64()),
])


def folder_name(response: str) -> str:
    """The run folder's subfolder of shard files (and stem of the summary file) for a response kind."""
    if response not in RESPONSES:
        raise ValueError(f"unknown response {response!r}; choose from {', '.join(RESPONSES)}")
    return f"similarity-{response}"


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
    membership = _membership(group, len(wrappers), device)[set_of_row]
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
        out = model.get_decoder()(input_ids=ids, attention_mask=row_mask, position_ids=position_ids,
                                  past_key_values=cache, use_cache=cache is not None)
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

    def run(self, lm: LoadedModel, shard: int, examples: list[Example]) -> pa.Table:
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


def summarise(table: pa.Table, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
              level: float = DEFAULT_LEVEL) -> pa.Table:
    """Per configuration and layer (layer L = the final state): the token-weighted mean over all sequences of
    the per-sequence means, with a paired bootstrap percentile interval over sequences (same resamples for
    every configuration and layer). table: the shard rows (SHARD_SCHEMA), every sequence x configuration.
    """
    frame = table.select(["seq_id", "config_id", "family", "cost", "tokens", "final_similarity",
                          "layer_similarity"]).to_pandas()
    seq_codes, seq_ids = frame["seq_id"].factorize(sort=True)
    configs = frame.drop_duplicates("config_id")[["config_id", "family", "cost"]]
    configs = configs.assign(rank=configs["config_id"] != FULL_ID).sort_values(["rank", "family", "cost", "config_id"])
    cfg_codes = frame["config_id"].map({c: k for k, c in enumerate(configs["config_id"])}).to_numpy()
    num_layers = max(len(v) for v in frame["layer_similarity"] if v is not None)
    n, k = len(seq_ids), len(configs)
    weight = np.zeros((n, k))
    sums = np.zeros((n, k, num_layers + 1))  # token-weighted sums of the per-sequence means
    tokens = frame["tokens"].to_numpy(dtype=np.float64)
    values = np.zeros((len(frame), num_layers + 1))
    usable = tokens > 0
    values[usable, :num_layers] = np.stack([v for v, u in zip(frame["layer_similarity"], usable) if u]) if usable.any() else 0
    values[usable, num_layers] = frame["final_similarity"].to_numpy(dtype=np.float64)[usable]
    weight[seq_codes, cfg_codes] = tokens
    sums[seq_codes, cfg_codes] = values * tokens[:, None]
    mean = sums.sum(0) / weight.sum(0)[:, None]  # (K, L + 1)
    counts = _resample_counts(n, resamples, seed)  # (R, N)
    draws = np.einsum("rn,nkl->rkl", counts, sums) / (counts @ weight)[..., None]
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [tail, 1.0 - tail], axis=0)
    layer = np.tile(np.arange(num_layers + 1), k)
    return pa.table({
        "config_id": np.repeat(configs["config_id"].to_numpy(), num_layers + 1),
        "family": np.repeat(configs["family"].to_numpy(), num_layers + 1),
        "cost": np.repeat(configs["cost"].to_numpy(), num_layers + 1),
        "layer": layer,
        "similarity": mean.ravel(),
        "lo": lo.ravel(),
        "hi": hi.ravel(),
    }, schema=SUMMARY_SCHEMA)


def _resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(R, N) how often each sequence appears in each resample of `resample_indices` (the same draws)."""
    indices = resample_indices(n, resamples, seed)
    offsets = indices + np.arange(resamples)[:, None] * n
    return np.bincount(offsets.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)
