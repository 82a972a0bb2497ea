"""Generation engine: every skip configuration of a prompt batch decoded together, with real skipping.

One decode step runs the model's own forward over a *row* per (prompt, configuration). Each decoder
layer is wrapped so that it gathers only the rows whose configuration keeps it, runs the original
layer on them, and scatters the result back; the other rows pass through unchanged (identity). So a
configuration costs exactly its kept layers, every configuration shares the one set of weights, and
layer j runs once per step on one large batch instead of once per configuration on a small one.
Each layer's KV cache holds only its own rows. Rows that emit EOS are dropped from every tensor.

Prefill policy `full` (the study's): the prompt runs once through all layers; its first token goes to
every configuration, and its KV stays one copy per prompt that every row of that prompt attends to
(`_SharedPromptLayer`): only generated tokens' KV is kept per row. Policy `skip`: the prompt runs
through each configuration's kept layers, in the same routed batch, with per-row KV (`_SlotLayer`).

Layer programs (configs.py: a layer skipped, repeated or out of order). A batch whose programs are all
increasing runs the model's own stack of L layers as above. Otherwise the batch runs a *schedule*: a
common supersequence of its programs (`layer_schedule`), installed as a temporary stack of routed slots
(`program_stack`), slot s wrapping physical layer schedule[s]; each row executes the slots its program
embeds into, so a repeated layer runs twice and rows with different programs share each layer's weights.
Every slot has its own KV cache layer (the attention modules see the slot's index while it runs). The
prefill policies on programs:
- `skip`: the prompt runs through the program itself, each execution of a layer caching its own prompt KV.
- `full`: the prompt runs once through the full model (layers 0..L-1 in order), which makes the first
  token; every execution of layer j in a program attends to layer j's prompt KV from that pass, plus its
  own generated tokens' KV. A repeated layer's two executions share the prompt part, not the generated one.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

from pipeline.generation.configs import SkipConfig, check_program, is_subset
from pipeline.generation.models import LoadedModel, cache_argument, decoder_layers
from pipeline.generation.sampling import RowSampler, pick_tokens

PREFILL_POLICIES = ("full", "skip")
DEFAULT_MAX_ROWS = 2048
SHARED_PROMPT_ATTENTION = "dynoracle_shared_prompt"


@dataclass
class Generation:
    """One (prompt, configuration) output."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" or "length"
    layers_per_token: float  # decoder layers actually executed per generated token

    @property
    def gen_tokens(self) -> int:
        return len(self.token_ids)


class _SlotLayer(DynamicLayer):
    """A layer's KV cache in a buffer sized for the whole generation: a step writes its slot, never re-copies."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._keys is None:
            self.load(key_states, value_states)
            return self.keys, self.values
        end = self.length + key_states.shape[-2]
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Start the layer from its first states (a prompt pass), in a buffer with room for the whole generation."""
        self._keys = keys.new_empty(*keys.shape[:2], self.capacity, keys.shape[-1])
        self._values = values.new_empty(*values.shape[:2], self.capacity, values.shape[-1])
        self.length = keys.shape[-2]
        self._keys[:, :, : self.length] = keys
        self._values[:, :, : self.length] = values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._expose()

    def keep_rows(self, mask: torch.Tensor) -> None:
        if self._keys is not None:
            self._keys, self._values = self._keys[mask], self._values[mask]
            self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length


class _SharedPromptLayer(DynamicLayer):
    """A kept layer's KV cache under the `full` prefill: the prompt part is the shared prefill's, one copy per
    prompt; only the generated tokens' KV is per row.

    Every configuration of a prompt attends to the same prompt KV, so the queries of all its rows are
    grouped into one matrix per prompt and KV head: one matmul against the prompt instead of a pass over
    a private copy per row (15x less KV memory and traffic over a ULS sweep). The generated part is per
    row; the two softmax partials are merged exactly (log-sum-exp). Attention math runs in float32, as
    the SDPA kernels accumulate it. Generated KV is stored in `kv_dtype`.
    """

    def __init__(self, prompt_keys: torch.Tensor, prompt_values: torch.Tensor, prompt_bias: torch.Tensor | None,
                 prompt_of_row: torch.Tensor, capacity: int, kv_dtype: torch.dtype):
        super().__init__()
        # A slot that few rows run (a repeat in a search's batch, where every row has its own program) attends to
        # their prompts' KV only: copied once here when they are at most half the prompts, never on row drops.
        present = torch.unique(prompt_of_row)
        if 2 * present.numel() <= prompt_keys.shape[0]:
            prompt_keys, prompt_values = prompt_keys[present], prompt_values[present]
            prompt_bias = None if prompt_bias is None else prompt_bias[present]
        else:
            present = torch.arange(prompt_keys.shape[0], device=prompt_keys.device)
        self.prompt_ids = present  # (P',) ascending: the prompts whose KV this layer holds
        self.prompt_keys = prompt_keys  # (P', Hkv, Lp, D) float32
        self.prompt_values = prompt_values
        self.prompt_bias = prompt_bias  # (P', 1, 1, Lp) float32, -inf on left padding; None without padding
        self.capacity = capacity
        self.kv_dtype = kv_dtype
        self.length = 0
        self.gen_keys: torch.Tensor | None = None  # (R, Hkv, capacity, D)
        self.gen_values: torch.Tensor | None = None
        self.dtype, self.device, self.is_initialized = kv_dtype, prompt_keys.device, True
        self._set_rows(prompt_of_row)

    def _set_rows(self, prompt_of_row: torch.Tensor) -> None:
        """Index the rows by held prompt: `slots[p, s]` is the s-th row of prompt `prompt_ids[p]` (padding: one
        past the end)."""
        self.prompt_of_row = prompt_of_row
        local = torch.searchsorted(self.prompt_ids, prompt_of_row)
        rows, prompts = local.numel(), self.prompt_keys.shape[0]
        counts = torch.bincount(local, minlength=prompts)
        order = torch.argsort(local, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(rows, device=order.device) - (counts.cumsum(0) - counts)[local[order]]
        self.per_prompt = int(counts.max()) if rows else 0
        self.slots = torch.full((prompts, self.per_prompt), rows, dtype=torch.long, device=order.device)
        self.slots[local, rank] = torch.arange(rows, device=order.device)
        self.slot_of_row = local * self.per_prompt + rank

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.gen_keys is None:
            shape = (*key_states.shape[:2], self.capacity, key_states.shape[-1])
            self.gen_keys = key_states.new_zeros(shape, dtype=self.kv_dtype)
            self.gen_values = value_states.new_zeros(shape, dtype=self.kv_dtype)
        end = self.length + key_states.shape[-2]
        self.gen_keys[:, :, self.length : end] = key_states
        self.gen_values[:, :, self.length : end] = value_states
        self.length = end
        return key_states, value_states  # the shared-prompt attention reads this layer, not these

    def keep_rows(self, mask: torch.Tensor) -> None:
        if self.gen_keys is not None:
            self.gen_keys, self.gen_values = self.gen_keys[mask], self.gen_values[mask]
        self._set_rows(self.prompt_of_row[mask])

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[-2] + self.length

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of one new token per row over its prompt and its own generated tokens.

        query (R, H, 1, D) -> output (R, 1, H, D), H = Hkv * G query heads (head h*G+g reads KV head h).
        """
        rows, heads, _, dim = query.shape
        kv_heads = self.prompt_keys.shape[1]
        q = query.float().view(rows, kv_heads, heads // kv_heads, dim) * scaling
        out = self._own_attention(q, *self._prompt_attention(q))
        return out.to(query.dtype).view(rows, 1, heads, dim)

    def _prompt_attention(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt part: all rows of a prompt as one (per_prompt * G, D) query block per KV head.

        q (R, Hkv, G, D) scaled float32 -> per row (R, Hkv, G, *): the softmax-weighted values (D), the
        weights' sum (1) and the scores' maximum (1) over the prompt.
        """
        rows, kv_heads, group, dim = q.shape
        prompts, per_prompt = self.prompt_keys.shape[0], self.per_prompt
        grouped = torch.cat([q, q.new_zeros(1, kv_heads, group, dim)])[self.slots]  # (P, S, Hkv, G, D)
        grouped = grouped.permute(0, 2, 1, 3, 4).reshape(prompts, kv_heads, per_prompt * group, dim)
        scores = grouped @ self.prompt_keys.transpose(-1, -2)  # (P, Hkv, S*G, Lp)
        if self.prompt_bias is not None:
            scores += self.prompt_bias
        prompt_max = scores.amax(-1, keepdim=True)
        weights = torch.exp_(scores.sub_(prompt_max))
        partial = torch.cat([weights @ self.prompt_values, weights.sum(-1, keepdim=True), prompt_max], -1)
        partial = (partial.view(prompts, kv_heads, per_prompt, group, dim + 2).permute(0, 2, 1, 3, 4)
                   .reshape(prompts * per_prompt, kv_heads, group, dim + 2)[self.slot_of_row])  # (R, Hkv, G, D+2)
        return partial[..., :dim], partial[..., dim : dim + 1], partial[..., dim + 1 :]

    def _own_attention(self, q: torch.Tensor, prompt_out: torch.Tensor, prompt_sum: torch.Tensor,
                       prompt_max: torch.Tensor) -> torch.Tensor:
        """The generated part: each row's own tokens, merged with the prompt part by their running maxima.

        q (R, Hkv, G, D) and the prompt part of `_prompt_attention` -> the attention output (R, Hkv, G, D) float32.
        """
        gen_keys, gen_values = (t[:, :, : self.length].float() for t in (self.gen_keys, self.gen_values))
        gen_scores = q @ gen_keys.transpose(-1, -2)  # (R, Hkv, G, T)
        top = torch.maximum(prompt_max, gen_scores.amax(-1, keepdim=True))
        gen_weights = torch.exp_(gen_scores.sub_(top))
        prompt_scale = torch.exp(prompt_max - top)
        out = prompt_out * prompt_scale + gen_weights @ gen_values
        out /= prompt_sum * prompt_scale + gen_weights.sum(-1, keepdim=True)
        return out


def shared_prompt_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            prompt_cache: Cache | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention interface for decode steps under the `full` prefill (registered as SHARED_PROMPT_ATTENTION).

    Hugging Face attention modules call it with their `layer_idx`; the cache passed as `prompt_cache`
    holds that layer's shared prompt KV and the rows' generated KV.
    """
    if prompt_cache is None or query.shape[2] != 1:
        raise ValueError("shared-prompt attention serves one-token decode steps with a prompt_cache")
    layer = prompt_cache.layers[module.layer_idx]
    window = kwargs.get("sliding_window")
    unsupported = [name for name in ("softcap", "s_aux") if kwargs.get(name) is not None]
    if window is not None and window < layer.get_seq_length():
        unsupported.append("sliding_window")
    if unsupported:
        raise NotImplementedError(f"the engine's shared-prompt attention has no {unsupported[0]}; use prefill='skip'")
    return layer.attend(query, scaling if scaling is not None else query.shape[-1] ** -0.5), None


AttentionInterface.register(SHARED_PROMPT_ATTENTION, shared_prompt_attention)


class _RoutedLayer(nn.Module):
    """Runs the wrapped decoder layer on the rows that keep it; the others pass through as identity.

    `rows` is None when every row keeps the layer. Batch-shaped arguments (mask, positions, rotary
    tables) are sliced to the same rows, whatever the architecture calls them. `slot`, for a slot of a
    program schedule, is the cache index the layer's attention uses while this wrapper runs it.
    """

    def __init__(self, layer: nn.Module, slot: int | None = None):
        super().__init__()
        self.layer = layer
        self.rows: torch.Tensor | None = None
        self.executed: torch.Tensor | None = None  # per-row counter of layers run, shared by all wrappers
        self.slot = slot
        self._indexed = [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]

    def _call(self, *args, **kwargs):
        if self.slot is None:
            return self.layer(*args, **kwargs)
        physical = [m.layer_idx for m in self._indexed]
        for module in self._indexed:
            module.layer_idx = self.slot
        try:
            return self.layer(*args, **kwargs)
        finally:
            for module, index in zip(self._indexed, physical):
                module.layer_idx = index

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        rows = self.rows
        if rows is None:
            if self.executed is not None:
                self.executed += 1
            return self._call(hidden_states, *args, **kwargs)
        if rows.numel() == 0:
            return hidden_states
        if self.executed is not None:
            self.executed[rows] += 1
        batch = hidden_states.shape[0]
        picked = _take_rows(hidden_states, rows, batch)
        args = tuple(_take_rows(a, rows, batch) for a in args)
        kwargs = {k: _take_rows(v, rows, batch) for k, v in kwargs.items()}
        out = self._call(picked, *args, **kwargs)
        return hidden_states.index_copy(0, rows, out)


def _take_rows(value, rows: torch.Tensor, batch: int):
    """Slice a per-row argument; leave broadcast (batch 1), 1-D and non-tensor arguments as they are."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch and batch > 1:
        return value.index_select(0, rows)
    if isinstance(value, tuple):
        return tuple(_take_rows(v, rows, batch) for v in value)
    return value


@contextmanager
def wrapped_layers(model: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> Iterator[list[nn.Module]]:
    """Temporarily replace every decoder layer of `model` by `wrap(layer)` (same modules, no weight copies)."""
    stack = decoder_layers(model)
    originals = list(stack)
    wrappers = [wrap(layer) for layer in originals]
    for i, wrapper in enumerate(wrappers):
        stack[i] = wrapper
    try:
        yield wrappers
    finally:
        for i, layer in enumerate(originals):
            stack[i] = layer


def layer_schedule(programs: list[tuple[int, ...]], num_layers: int) -> tuple[int, ...]:
    """The physical layer run at each slot of a batch: 0..L-1 when every program is increasing (today's
    routed stack), else a common supersequence of the programs.

    Every slot is one call of a layer on the rows that run it, and a call's fixed part dominates small batches
    (on this project's CPU 2.4 ms for 4 rows against 3.7 ms for 64), so the schedule should be short. Programs are
    mostly increasing runs with a few back-steps (a repeat, a swap), so the merge starts from the depth order
    of every layer used and folds the programs in, longest first, by the exact two-sequence
    shortest-common-supersequence recurrence: each increasing run then lines up with the depth order and
    every back-step adds about one slot (each program adds at most its length minus its longest strictly
    increasing subsequence), where folding them in given order could stack misaligned runs (63 slots instead
    of 44 on the programs benchmark; over random batches of search moves 2.3 slots shorter on average,
    longer in about 1 in 9). A heuristic: the shortest common supersequence of many sequences is NP-hard.
    Slots that no program's leftmost embedding uses are dropped.
    """
    programs = [tuple(p) for p in programs]
    if all(is_subset(p) for p in programs):
        return tuple(range(num_layers))
    schedule = tuple(sorted(set().union(*programs)))
    for program in sorted(set(programs), key=lambda p: (-len(p), p)):
        schedule = _supersequence(schedule, program)
    used = program_membership(programs, schedule, torch.device("cpu")).any(0).tolist()
    return tuple(layer for layer, keep in zip(schedule, used) if keep)


def _supersequence(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """A shortest common supersequence of two sequences (dynamic programming over suffixes)."""
    n, m = len(a), len(b)
    length = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n, -1, -1):
        for j in range(m, -1, -1):
            if i == n or j == m:
                length[i][j] = (n - i) + (m - j)
            elif a[i] == b[j]:
                length[i][j] = 1 + length[i + 1][j + 1]
            else:
                length[i][j] = 1 + min(length[i + 1][j], length[i][j + 1])
    out, i, j = [], 0, 0
    while i < n or j < m:
        take_a = i < n and (j == m or a[i] == b[j] or length[i + 1][j] <= length[i][j + 1])
        take_b = j < m and (i == n or a[i] == b[j] or not take_a)
        out.append(a[i] if take_a else b[j])
        i, j = i + take_a, j + take_b
    return tuple(out)


def program_membership(programs: list[tuple[int, ...]], schedule: tuple[int, ...],
                       device: torch.device) -> torch.Tensor:
    """(U, S) bool: program u runs slot s, each program embedded leftmost into the schedule, in order."""
    member = torch.zeros((len(programs), len(schedule)), dtype=torch.bool, device=device)
    for u, program in enumerate(programs):
        s = 0
        for layer in program:
            while schedule[s] != layer:
                s += 1
            member[u, s] = True
            s += 1
    return member


@contextmanager
def program_stack(model: nn.Module, wrappers: list[_RoutedLayer], schedule: tuple[int, ...],
                  slot_type: type[_RoutedLayer] = _RoutedLayer) -> Iterator[list[_RoutedLayer]]:
    """Run `model` through the slots of `schedule` (one routed wrapper of `slot_type` per slot over the physical
    layers of `wrappers`) instead of its L layers, until the block exits; the identity schedule yields `wrappers`.

    The decoder's layer list and its config's depth are swapped for the schedule's (`swapped_stack`) and
    restored after; no weight is copied.
    """
    if schedule == tuple(range(len(wrappers))):
        yield wrappers
        return
    slots = [slot_type(wrappers[j].layer, slot=s) for s, j in enumerate(schedule)]
    with swapped_stack(model, slots, schedule):
        yield slots


@contextmanager
def swapped_stack(model: nn.Module, modules: list[nn.Module], schedule: tuple[int, ...]) -> Iterator[None]:
    """Temporarily make `modules` (module s runs physical layer schedule[s]) the decoder's layer list, with the
    config's depth and per-layer `layer_types` to match; restored on exit."""
    decoder, stack = model.get_decoder(), decoder_layers(model)
    name = next(n for n, child in decoder.named_children() if child is stack)
    config = model.config.get_text_config()
    depth, types = config.num_hidden_layers, getattr(config, "layer_types", None)
    setattr(decoder, name, nn.ModuleList(modules))
    config.num_hidden_layers = len(modules)
    if types is not None:
        config.layer_types = [types[j] for j in schedule]
    try:
        yield
    finally:
        setattr(decoder, name, stack)
        config.num_hidden_layers = depth
        if types is not None:
            config.layer_types = types


class _Rows:
    """The live rows of one routed batch: which configuration each row runs, its prompt, its masks."""

    def __init__(self, membership: torch.Tensor, prompt_of_row: torch.Tensor, attention_mask: torch.Tensor | None,
                 positions: torch.Tensor, cache: Cache):
        self.membership = membership  # (R, S) bool: row r executes slot j (slot j = layer j without a program)
        self.prompt_of_row = prompt_of_row
        self.ids = torch.arange(membership.shape[0], device=membership.device)  # original row numbers
        self.attention_mask = attention_mask  # (R, width) with padding, for per-row (`skip`) caches; else None
        self.positions = positions  # (R,) position of the last token fed
        self.cache = cache  # one layer per slot, holding the rows that run it
        self.layer_rows = _rows_per_layer(membership)

    def route(self, wrappers: list[_RoutedLayer], executed: torch.Tensor) -> None:
        for wrapper, rows in zip(wrappers, self.layer_rows):
            wrapper.rows, wrapper.executed = rows, executed

    def keep(self, keep: torch.Tensor) -> None:
        """Drop finished rows from every per-row tensor and from each layer's cache."""
        for j, layer in enumerate(self.cache.layers):
            layer.keep_rows(keep[self.membership[:, j]])
        self.membership = self.membership[keep]
        self.layer_rows = _rows_per_layer(self.membership)
        self.prompt_of_row = self.prompt_of_row[keep]
        self.ids = self.ids[keep]
        self.positions = self.positions[keep]
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[keep]


def _rows_per_layer(membership: torch.Tensor) -> list[torch.Tensor | None]:
    """The rows that run each layer, ascending (None: every row), from one `nonzero` over the whole (R, L)
    membership: computed when the rows change (start, EOS drops), so a decode step routes its layers
    without a host-device sync per layer."""
    counts = membership.sum(0).tolist()
    rows = membership.t().nonzero()[:, 1].contiguous()  # layer-major: each layer's rows in ascending order
    return [None if n == membership.shape[0] else part for n, part in zip(counts, rows.split(counts))]


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask


def prompt_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Positions as Hugging Face `generate` makes them for (left-padded) prompts."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def eos_ids(lm: LoadedModel) -> torch.Tensor | None:
    """The ids that end a sequence; None for a model without EOS (it generates to the token limit)."""
    eos = lm.model.generation_config.eos_token_id
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    ids = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    return torch.tensor(ids, dtype=torch.long, device=lm.device) if ids else None


def _forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             position_ids: torch.Tensor, cache: Cache, **attention_kwargs) -> torch.Tensor:
    """One model forward; returns the last position's logits of each row (R, V)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **cache_argument(model, cache), **attention_kwargs)
    return out.logits[:, -1, :]


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily switch the model's attention interface (Hugging Face's `set_attn_implementation`)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompts: list[list[int]],
    configs: list[SkipConfig],
    max_new_tokens: int,
    prefill: str = "full",
    ignore_eos: bool = False,
    max_rows: int = DEFAULT_MAX_ROWS,
    on_group_done: Callable[[int], None] | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: list[list[int]] | None = None,
) -> list[list[Generation]]:
    """Decode every prompt under every configuration; result[i][k] is prompt i under configs[k].

    Greedy by default (temperature 0), when configurations with the same program are decoded once. With
    temperature > 0 every (prompt, configuration) row samples (`pipeline.generation.sampling`: temperature,
    top-p, `seeds[i][k]` the seed of prompt i under configs[k]) and is its own row. Rows are processed in
    groups of at most `max_rows`; `on_group_done(tokens)` reports progress. `stop` (e.g.
    `stops.StopStrings`) ends rows early besides EOS: live rows' tokens (R, T) -> (R,) bool.
    """
    sampled = temperature > 0
    if sampled and (seeds is None or len(seeds) != len(prompts) or any(len(s) != len(configs) for s in seeds)):
        raise ValueError("sampling needs one seed per prompt and configuration (seeds[i][k])")
    # A unit is decoded once for every prompt: a distinct program, or under sampling each configuration.
    units = list(range(len(configs))) if sampled else list(dict.fromkeys(cfg.layers for cfg in configs))
    per_group = max(1, max_rows // max(1, len(prompts)))
    groups, row_seeds = [], []
    for start in range(0, len(units), per_group):
        group = units[start : start + per_group]
        programs = [configs[k].layers for k in group] if sampled else group
        groups.append((programs, [u for u in range(len(group)) for _ in prompts], list(range(len(prompts))) * len(group)))
        row_seeds.append([seeds[i][k] for k in group for i in range(len(prompts))] if sampled else None)
    samplers = [None if s is None else RowSampler(temperature, top_p, s) for s in row_seeds]
    outputs = _decode(lm, prompts, configs, groups, max_new_tokens, prefill, ignore_eos, on_group_done, stop,
                      samplers)
    results = {unit: out[u * len(prompts) : (u + 1) * len(prompts)]
               for start, out in zip(range(0, len(units), per_group), outputs)
               for u, unit in enumerate(units[start : start + per_group])}
    return [[results[k if sampled else cfg.layers][i] for k, cfg in enumerate(configs)] for i in range(len(prompts))]


@torch.inference_mode()
def generate_pairs(
    lm: LoadedModel,
    prompts: list[list[int]],
    pairs: list[tuple[int, SkipConfig]],
    max_new_tokens: int,
    prefill: str = "full",
    ignore_eos: bool = False,
    max_rows: int = DEFAULT_MAX_ROWS,
    on_group_done: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Greedy-decode chosen (prompt index, configuration) pairs, not the cross product: result[r] is pair r.

    Per-sequence search needs this: every sequence has its own candidates, decoded together in one routed
    batch (groups of at most `max_rows` rows, in order). Equal to `generate` on each pair alone.
    """
    groups = []
    for start in range(0, len(pairs), max(1, max_rows)):
        chunk = pairs[start : start + max(1, max_rows)]
        group = list(dict.fromkeys(cfg.layers for _, cfg in chunk))
        index = {program: u for u, program in enumerate(group)}
        groups.append((group, [index[cfg.layers] for _, cfg in chunk], [i for i, _ in chunk]))
    outputs = _decode(lm, prompts, [cfg for _, cfg in pairs], groups, max_new_tokens, prefill, ignore_eos,
                      on_group_done)
    return [gen for out in outputs for gen in out]


def _decode(lm: LoadedModel, prompts: list[list[int]], configs: list[SkipConfig],
            groups: list[tuple[list[tuple[int, ...]], list[int], list[int]]], max_new_tokens: int, prefill: str,
            ignore_eos: bool, on_group_done: Callable[[int], None] | None,
            stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
            samplers: list[RowSampler | None] | None = None) -> list[list[Generation]]:
    """Check the arguments, then decode each group (programs, program of each row, prompt of each row) in one
    routed batch after one shared prefill; returns each group's generations in row order. `samplers[g]`
    samples group g's rows (None: greedy)."""
    if prefill not in PREFILL_POLICIES:
        raise ValueError(f"unknown prefill policy {prefill!r}; choose from {', '.join(PREFILL_POLICIES)}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    num_layers = lm.num_layers
    for cfg in configs:
        try:
            check_program(cfg.config_id, list(cfg.layers), num_layers)
        except ValueError as exc:
            raise ValueError(f"{cfg.config_id} does not fit a {num_layers}-layer model ({exc})") from None

    device, model = lm.device, lm.model
    input_ids, attention_mask = left_pad(prompts, lm.tokenizer.pad_token_id, device)
    mask = attention_mask if bool((attention_mask == 0).any()) else None  # as generate: no padding, no mask
    capacity = input_ids.shape[1] + max_new_tokens
    stop_ids = None if ignore_eos else eos_ids(lm)
    samplers = samplers or [None] * len(groups)
    outputs = []
    with wrapped_layers(model, _RoutedLayer) as wrappers:
        shared = _shared_prefill(model, wrappers, input_ids, mask) if prefill == "full" else None
        with attention_implementation(model, SHARED_PROMPT_ATTENTION) if shared else nullcontext():
            for (programs, set_of_row, prompt_of_row), sampler in zip(groups, samplers):
                schedule = layer_schedule(programs, num_layers)
                with program_stack(model, wrappers, schedule) as slots:
                    out = _decode_group(lm, slots, schedule, program_membership(programs, schedule, device),
                                        torch.tensor(set_of_row, dtype=torch.long, device=device),
                                        torch.tensor(prompt_of_row, dtype=torch.long, device=device),
                                        input_ids, mask, shared, capacity, max_new_tokens, stop_ids, sampler, stop)
                outputs.append(out)
                if on_group_done is not None:
                    on_group_done(sum(g.gen_tokens for g in out))
    return outputs


@dataclass
class _SharedPrefill:
    """The prompt pass through all layers, done once: first-token logits, every layer's prompt KV, the padding."""

    first_logits: torch.Tensor  # (P, V): each prompt's first token is picked from them, per row
    prompt_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (P, Hkv, width, D) in float32
    padding_bias: torch.Tensor | None  # (P, 1, 1, width) float32: -inf on left padding; None without padding


def _shared_prefill(model: nn.Module, wrappers: list[_RoutedLayer], input_ids: torch.Tensor,
                    mask: torch.Tensor | None) -> _SharedPrefill:
    for wrapper in wrappers:
        wrapper.rows, wrapper.executed = None, None
    cache = Cache(layers=[_SlotLayer(input_ids.shape[1]) for _ in wrappers])
    first = _forward(model, input_ids, mask, prompt_positions(input_ids, mask), cache)
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(mask == 0, float("-inf"))
        bias = bias[:, None, None, :]
    return _SharedPrefill(first, [(layer.keys.float(), layer.values.float()) for layer in cache.layers], bias)


def _decode_group(lm: LoadedModel, wrappers: list[_RoutedLayer], schedule: tuple[int, ...],
                  set_member: torch.Tensor, set_of_row: torch.Tensor, prompt_of_row: torch.Tensor,
                  input_ids: torch.Tensor, mask: torch.Tensor | None, shared: _SharedPrefill | None,
                  capacity: int, max_new_tokens: int, stop_ids: torch.Tensor | None,
                  sampler: RowSampler | None = None,
                  stop: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[Generation]:
    """Decode one group of rows (row r: program set_of_row[r] on prompt prompt_of_row[r]) through the slots of
    `schedule` (`wrappers`, one per slot; `set_member` (U, S): the slots each program runs); outputs per row.
    `sampler` samples the rows' tokens (None: greedy); `stop` ends rows early besides EOS."""
    device = input_ids.device
    membership = set_member[set_of_row]
    num_rows = set_of_row.numel()
    start_positions = prompt_positions(input_ids, mask)[prompt_of_row]
    executed = torch.zeros(num_rows, dtype=torch.long, device=device)

    if shared is not None:
        # Generated KV in float32 on CPUs, where converting it at every step costs more than its memory;
        # accelerators keep the model's dtype (memory is their limit, conversion is cheap).
        kv_dtype = torch.float32 if device.type == "cpu" else lm.model.dtype
        cache = Cache(layers=[
            _SharedPromptLayer(*shared.prompt_kv[j], shared.padding_bias, prompt_of_row[membership[:, s]],
                               max_new_tokens, kv_dtype)
            for s, j in enumerate(schedule)
        ])
        rows = _Rows(membership, prompt_of_row, None, start_positions[:, -1], cache)
        attention_kwargs = {"prompt_cache": cache}
        if sampler is None:  # greedy: one pick per prompt, not a (rows x vocabulary) copy
            next_tokens = pick_tokens(shared.first_logits, rows.ids, None)[prompt_of_row]
        else:
            next_tokens = pick_tokens(shared.first_logits[prompt_of_row], rows.ids, sampler)
        layers_run = torch.full((num_rows,), len(shared.prompt_kv), dtype=torch.long, device=device)
    else:
        row_mask = mask[prompt_of_row] if mask is not None else None
        cache = Cache(layers=[_SlotLayer(capacity) for _ in schedule])
        rows = _Rows(membership, prompt_of_row, row_mask, start_positions[:, -1], cache)
        attention_kwargs = {}
        rows.route(wrappers, executed)
        next_tokens = pick_tokens(_forward(lm.model, input_ids[prompt_of_row], row_mask, start_positions, rows.cache),
                                  rows.ids, sampler)
        layers_run = executed.clone()

    tokens = torch.full((num_rows, max_new_tokens), -1, dtype=torch.long, device=device)
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
    finished_eos = torch.zeros(num_rows, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if step > 0:
            executed.zero_()
            rows.route(wrappers, executed)
            rows.positions = rows.positions + 1
            if rows.attention_mask is not None:
                rows.attention_mask = torch.cat([rows.attention_mask, rows.attention_mask.new_ones(len(rows.ids), 1)], 1)
            next_tokens = pick_tokens(_forward(lm.model, next_tokens[:, None], rows.attention_mask,
                                               rows.positions[:, None], rows.cache, **attention_kwargs),
                                      rows.ids, sampler)
            layers_run[rows.ids] += executed[: len(rows.ids)]
        tokens[rows.ids, step] = next_tokens
        lengths[rows.ids] = step + 1
        if stop_ids is not None or stop is not None:
            done = (torch.isin(next_tokens, stop_ids) if stop_ids is not None
                    else torch.zeros_like(next_tokens, dtype=torch.bool))
            if stop is not None:
                done |= stop(tokens[rows.ids, : step + 1])
            if bool(done.any()):
                finished_eos[rows.ids[done]] = True
                keep = ~done
                if not bool(keep.any()):
                    break
                rows.keep(keep)
                next_tokens = next_tokens[keep]
                executed = executed[: int(keep.sum())]

    tokenizer = lm.tokenizer
    outputs = []
    for r in range(num_rows):
        ids = tokens[r, : lengths[r]].tolist()
        outputs.append(Generation(
            token_ids=ids,
            text=tokenizer.decode(ids, skip_special_tokens=True),
            finish_reason="eos" if bool(finished_eos[r]) else "length",
            layers_per_token=float(layers_run[r]) / len(ids),
        ))
    return outputs
