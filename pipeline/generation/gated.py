"""Per-token gated decoding: a decision per (row, token, layer) from a gate on the layer's input hidden state.

The source study (Glavas et al., 2024, figure 1b) trains a gate per layer l >= 1 that decides, at every
generated token, from h^(l-1), whether layer l runs. This module decodes with any such gate, on the
engine's primitives: the shared prefill (the prompt once through every layer, its KV one copy per prompt;
the first token is the full model's, as under the engine's `full` policy) and the shared-prompt attention
interface. At each decode step and layer the gate is called on the live rows' input states; what a skipped
token leaves in that layer's KV cache is one of two documented semantics:

- `kv = "compute"`: the layer still writes the token's K/V, computed from its input state, and later tokens
  attend to it. This is what the study's masked execution does (every layer runs on every token, a skipped
  token's output is replaced by its input). It is implemented that way here: every live row runs the layer
  and the skipped rows keep their input, so its wall time is the masked way's; its cost counts only the
  layers the gate ran.
- `kv = "none"`: the token leaves no entry; later tokens never see it. The rows that run the layer are
  gathered per step and only they run it, as the engine's routed layers do.

Cost of a row = decoder layers the gate ran per decode token (layer 0 always runs; the first token, the
prefill's, is not a decision and is not counted), so a gate that runs a fixed layer set at every token costs
exactly that configuration's nominal cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from pipeline.generation.engine import (
    SHARED_PROMPT_ATTENTION,
    Generation,
    _forward,
    _RoutedLayer,
    _shared_prefill,
    _take_rows,
    attention_implementation,
    eos_ids,
    left_pad,
    prompt_positions,
    wrapped_layers,
)
from pipeline.generation.models import LoadedModel
from pipeline.generation.sampling import pick_tokens

KV_MODES = ("compute", "none")

Gate = Callable[[int, torch.Tensor], torch.Tensor]
"""gate(layer, hidden) -> run: layer index l >= 1, hidden (R, D) the rows' input states to layer l, run (R,) bool."""


@dataclass
class GatedGeneration(Generation):
    """A gated output; `decode_cost` = mean layers run per decode token (NaN for a one-token output)."""

    decode_cost: float = math.nan


class _GatedKV(DynamicLayer):
    """One layer's cache for gated decoding: the prompt's KV shared per prompt, each row's generated KV, and
    which generated slots hold an entry (`kv = "none"` leaves a skipped token's slot empty).

    `active` (indices into the live rows) names the rows that call the layer at this step."""

    def __init__(self, prompt_keys: torch.Tensor, prompt_values: torch.Tensor, prompt_bias: torch.Tensor | None,
                 prompt_of_row: torch.Tensor, capacity: int):
        super().__init__()
        self.prompt_keys, self.prompt_values = prompt_keys, prompt_values  # (P, Hkv, Lp, D) float32
        self.prompt_bias = prompt_bias  # (P, 1, 1, Lp) float32 or None
        self.prompt_of_row = prompt_of_row
        self.capacity = capacity
        self.slot = 0  # the generated slot written at this step
        self.active = torch.arange(prompt_of_row.numel(), device=prompt_of_row.device)
        self.gen_keys: torch.Tensor | None = None  # (R, Hkv, capacity, D) float32
        self.gen_values: torch.Tensor | None = None
        self.filled = torch.zeros((prompt_of_row.numel(), capacity), dtype=torch.bool, device=prompt_of_row.device)
        self.dtype, self.device, self.is_initialized = torch.float32, prompt_keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.gen_keys is None:
            shape = (self.prompt_of_row.numel(), key_states.shape[1], self.capacity, key_states.shape[-1])
            self.gen_keys = key_states.new_zeros(shape, dtype=torch.float32)
            self.gen_values = value_states.new_zeros(shape, dtype=torch.float32)
        self.gen_keys[self.active, :, self.slot] = key_states[:, :, -1].float()
        self.gen_values[self.active, :, self.slot] = value_states[:, :, -1].float()
        self.filled[self.active, self.slot] = True
        return key_states, value_states

    def keep_rows(self, mask: torch.Tensor) -> None:
        self.prompt_of_row, self.filled = self.prompt_of_row[mask], self.filled[mask]
        if self.gen_keys is not None:
            self.gen_keys, self.gen_values = self.gen_keys[mask], self.gen_values[mask]

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[-2] + self.slot

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the active rows' new token over their prompt and their filled generated slots.

        query (A, H, 1, D) -> (A, 1, H, D), in float32 as the engine's shared-prompt attention."""
        rows, prompts = self.active, self.prompt_of_row[self.active]
        end = self.slot + 1
        keys = torch.cat([self.prompt_keys[prompts], self.gen_keys[rows, :, :end]], 2)  # (A, Hkv, Lp + end, D)
        values = torch.cat([self.prompt_values[prompts], self.gen_values[rows, :, :end]], 2)
        gen_bias = torch.zeros(self.filled[rows, :end].shape, dtype=torch.float32, device=query.device)
        gen_bias.masked_fill_(~self.filled[rows, :end], float("-inf"))
        prompt_bias = (self.prompt_bias[prompts] if self.prompt_bias is not None
                       else gen_bias.new_zeros(len(rows), 1, 1, self.prompt_keys.shape[-2]))
        bias = torch.cat([prompt_bias, gen_bias[:, None, None, :]], -1)
        count, heads, _, dim = query.shape
        group = heads // keys.shape[1]
        q = query.float().view(count, keys.shape[1], group, dim) * scaling
        weights = torch.softmax(q @ keys.transpose(-1, -2) + bias, -1)  # (A, Hkv, G, S)
        return (weights @ values).to(query.dtype).view(count, 1, heads, dim)


class _GatedLayer(nn.Module):
    """A decoder layer run per row as the gate decides, on the input state of the token being decoded."""

    def __init__(self, layer: nn.Module, index: int, decoder: "_GatedDecoder"):
        super().__init__()
        self.layer, self.index, self.decoder = layer, index, decoder

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        d = self.decoder
        kv = d.cache.layers[self.index]
        batch = hidden_states.shape[0]
        if self.index == 0:
            run = torch.ones(batch, dtype=torch.bool, device=hidden_states.device)
        else:
            run = d.gate(self.index, hidden_states[:, -1]).to(torch.bool).reshape(batch)
        d.executed += run
        if d.kv == "compute":
            kv.active = torch.arange(batch, device=hidden_states.device)
            out = self.layer(hidden_states, *args, **kwargs)
            return torch.where(run[:, None, None], out, hidden_states)
        rows = run.nonzero().squeeze(1)
        if rows.numel() == 0:
            return hidden_states
        kv.active = rows
        if rows.numel() == batch:
            return self.layer(hidden_states, *args, **kwargs)
        picked = self.layer(hidden_states.index_select(0, rows), *(_take_rows(a, rows, batch) for a in args),
                            **{k: _take_rows(v, rows, batch) for k, v in kwargs.items()})
        return hidden_states.index_copy(0, rows, picked)


class _GatedDecoder:
    """What the gated layers share during one decode: the gate, the KV semantics, the cache, the counters."""

    def __init__(self, gate: Gate, kv: str):
        self.gate, self.kv = gate, kv
        self.cache: Cache | None = None
        self.executed: torch.Tensor | None = None  # (R,) layers run at this step


@torch.inference_mode()
def gated_generate(lm: LoadedModel, prompts: list[list[int]], gate: Gate, max_new_tokens: int, kv: str = "compute",
                   ignore_eos: bool = False) -> list[GatedGeneration]:
    """Greedy-decode each prompt with per-token layer decisions from `gate`; one output per prompt.

    The prompt runs once through every layer (the engine's `full` prefill), which gives the first token;
    every later token asks `gate(l, h)` for each layer l >= 1 (layer 0 always runs). Raises ValueError on an
    unknown `kv` (see the module docstring), a non-positive `max_new_tokens` or an empty prompt.
    """
    if kv not in KV_MODES:
        raise ValueError(f"unknown kv semantics {kv!r}; choose from {', '.join(KV_MODES)}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model, device, num_layers = lm.model, lm.device, lm.num_layers
    input_ids, attention_mask = left_pad(prompts, lm.tokenizer.pad_token_id, device)
    mask = attention_mask if bool((attention_mask == 0).any()) else None
    with wrapped_layers(model, _RoutedLayer) as routed:
        shared = _shared_prefill(model, routed, input_ids, mask)
    num_rows = len(prompts)
    prompt_of_row = torch.arange(num_rows, device=device)
    decoder = _GatedDecoder(gate, kv)
    decoder.cache = Cache(layers=[_GatedKV(k, v, shared.padding_bias, prompt_of_row, max_new_tokens)
                                  for k, v in shared.prompt_kv])
    stop_ids = None if ignore_eos else eos_ids(lm)
    ids = torch.arange(num_rows, device=device)  # the live rows' original numbers
    positions = prompt_positions(input_ids, mask)[:, -1]
    next_tokens = pick_tokens(shared.first_logits, ids, None)
    tokens = torch.full((num_rows, max_new_tokens), -1, dtype=torch.long, device=device)
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
    layers_run = torch.zeros(num_rows, dtype=torch.long, device=device)
    finished_eos = torch.zeros(num_rows, dtype=torch.bool, device=device)
    index = iter(range(num_layers))
    with wrapped_layers(model, lambda layer: _GatedLayer(layer, next(index), decoder)), \
            attention_implementation(model, SHARED_PROMPT_ATTENTION):
        for step in range(max_new_tokens):
            if step > 0:
                for layer in decoder.cache.layers:
                    layer.slot = step - 1
                decoder.executed = torch.zeros(len(ids), dtype=torch.long, device=device)
                positions = positions + 1
                next_tokens = pick_tokens(_forward(model, next_tokens[:, None], None, positions[:, None],
                                                   decoder.cache, prompt_cache=decoder.cache), ids, None)
                layers_run[ids] += decoder.executed
            tokens[ids, step] = next_tokens
            lengths[ids] = step + 1
            if stop_ids is not None:
                done = torch.isin(next_tokens, stop_ids)
                if bool(done.any()):
                    finished_eos[ids[done]] = True
                    keep = ~done
                    if not bool(keep.any()):
                        break
                    for layer in decoder.cache.layers:
                        layer.keep_rows(keep)
                    ids, positions, next_tokens = ids[keep], positions[keep], next_tokens[keep]
    outputs = []
    for r in range(num_rows):
        row = tokens[r, : lengths[r]].tolist()
        decoded = len(row) - 1
        outputs.append(GatedGeneration(
            token_ids=row, text=lm.tokenizer.decode(row, skip_special_tokens=True),
            finish_reason="eos" if bool(finished_eos[r]) else "length",
            layers_per_token=(num_layers + float(layers_run[r])) / len(row),
            decode_cost=float(layers_run[r]) / decoded if decoded else math.nan,
        ))
    return outputs
