"""Teacher-forced log-likelihoods of continuations after a context, for every layer program in one routed pass.

The multiple-choice task (`pipeline.generation.choice_task`) asks, per (question, configuration, choice), for
the summed log-probability of the choice's tokens after its context, as lm-evaluation-harness's
`loglikelihood` requests do. Here that runs on the engine's routed layers (`pipeline.generation.engine`):
every (program, context) is a row of one batch, and each decoder layer runs only on the rows that keep it.
`continuation_logliks` scores every program on every context (a run's configurations), `pair_logliks` chosen
(context, program) pairs (a search's candidates).

Programs (`configs.check_program`: a layer skipped, repeated or out of order) run as the engine's decode runs
them: a chunk of rows that are all subsets uses the model's own L-layer stack; a chunk holding another program
runs a schedule of routed slots (`engine.layer_schedule`, `program_stack`), each row executing the slots its
program embeds into, each slot with its own KV cache layer. A run's configurations (`continuation_logliks`)
chunk their subsets apart from other programs, so adding a program to a job leaves the subsets' rows as they
were; a search's candidates (`pair_logliks`) share chunks whatever their kind: the schedule starts from the
depth order of the layers used, so each subset rides along in slots the programs' pass runs anyway (plus any
layer only subsets use), where a chunk of its own would run all L layers again (a search round of
`benchmarks/programs.py`: 7% faster).

Sharing, all exact:
- One row per (program, context), not per choice: the context is followed by every continuation of that
  context packed one after another (without their last token, which predicts nothing), and a 4-D mask lets
  each continuation token see the context and the earlier tokens of its own continuation only. Each packed
  token carries the position it would have right after the context, so every log-probability is the one
  of a separate (context + continuation) sequence.
- Under the `full` prefill the contexts run once through all layers (the first continuation token's
  log-probability is the full model's for every program, as a generation's first token is); the packed
  continuations then attend, at each execution of layer j, to layer j's context KV from that pass (a
  repeated layer's executions share the context part only). Under `skip` the context runs through the
  program itself in the same pass.
- Rows on the same context that execute the same layers, in the same order, before a slot feed it the same
  states: it runs once per distinct (context, executions so far) and the result is copied (early exit at c is
  a prefix of every longer early exit and of `full`, so that whole family costs one full pass plus its heads).
- Only the positions that predict a continuation token go through the LM head.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import Cache

from pipeline.generation.configs import check_program, is_subset
from pipeline.generation.engine import (
    PREFILL_POLICIES,
    _RoutedLayer,
    _SlotLayer,
    layer_schedule,
    left_pad,
    program_membership,
    program_stack,
    prompt_positions,
    wrapped_layers,
)
from pipeline.generation.models import LoadedModel

ROW_TOKENS = 1 << 15  # (row, position) pairs per forward: bounds the activations of one group of rows
HEAD_POSITIONS = 1024  # positions per LM-head chunk: bounds the (positions, vocabulary) logits


class _SharedPrefixLayer(_RoutedLayer):
    """A routed layer that runs once per distinct input among its rows: `rows` are the representatives, and
    after the layer each row of `copy_to` takes the output of its representative `copy_from`."""

    def __init__(self, layer: torch.nn.Module, slot: int | None = None):
        super().__init__(layer, slot)
        self.copy_to: torch.Tensor | None = None
        self.copy_from: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = super().forward(hidden_states, *args, **kwargs)
        if self.copy_to is None:
            return out
        return out.index_copy(0, self.copy_to, out.index_select(0, self.copy_from))


def _representatives(programs: list[tuple[int, ...]], contexts: list[int], schedule: tuple[int, ...]) -> np.ndarray:
    """rep[r, s]: the first row executing slot s of `schedule` on the same context after the same earlier layers
    as row r (-1: r skips s). Row r runs `programs[r]` on context `contexts[r]`, each program embedded leftmost
    into the schedule (`engine.program_membership`), so equal prefixes sit at equal slots.

    Rows with the same context and the same executions before slot s hold the same states at its input (under
    either prefill), so s runs once for them and the result is copied.
    """
    distinct = list(dict.fromkeys(programs))
    member = program_membership(distinct, schedule, torch.device("cpu"))
    slots = {p: member[u].nonzero()[:, 0].tolist() for u, p in enumerate(distinct)}
    rep = np.full((len(programs), len(schedule)), -1, dtype=np.int64)
    first: dict[tuple[int, tuple[int, ...]], int] = {}
    for r, (program, context) in enumerate(zip(programs, contexts)):
        for i, s in enumerate(slots[program]):
            rep[r, s] = first.setdefault((context, program[: i + 1]), r)
    return rep


def _packed(groups: list[tuple[list[int], list[list[int]]]], pad: int, device: torch.device):
    """The continuations of each context packed into one row (their last tokens dropped).

    Returns ids (G, K), offset (G, K) = the token's index within its continuation, owner (G, K) = which
    continuation (-1 on padding), and for every continuation token to score (in group, continuation,
    token order): its group, its packed column predicting it (-1: the context's last token), its token id.
    """
    width = max(1, max(sum(len(c) - 1 for c in conts) for _, conts in groups))
    ids = torch.full((len(groups), width), pad, dtype=torch.long)
    offset = torch.zeros((len(groups), width), dtype=torch.long)
    owner = torch.full((len(groups), width), -1, dtype=torch.long)
    target_group, target_column, target_token = [], [], []
    for g, (_, conts) in enumerate(groups):
        column = 0
        for t, cont in enumerate(conts):
            n = len(cont) - 1
            ids[g, column : column + n] = torch.tensor(cont[:-1], dtype=torch.long)
            offset[g, column : column + n] = torch.arange(n)
            owner[g, column : column + n] = t
            for k, token in enumerate(cont):
                target_group.append(g)
                target_column.append(-1 if k == 0 else column + k - 1)
                target_token.append(token)
            column += n
    targets = tuple(torch.tensor(v, dtype=torch.long, device=device)
                    for v in (target_group, target_column, target_token))
    return ids.to(device), offset.to(device), owner.to(device), targets


def _mask(context_mask: torch.Tensor, owner: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask (G, 1, C + K, C + K) over [left-padded context | packed continuations].

    Context tokens: causal over the real context tokens. Packed tokens: every real context token, and the
    tokens of their own continuation up to themselves. Padding queries see themselves only (no empty row).
    """
    groups, width = context_mask.shape
    packed = owner.shape[1]
    real = context_mask.bool()
    size = width + packed
    allowed = torch.zeros((groups, size, size), dtype=torch.bool, device=real.device)
    causal = torch.ones((width, width), dtype=torch.bool, device=real.device).tril()
    allowed[:, :width, :width] = causal & real[:, None, :] & real[:, :, None]
    live = owner >= 0
    allowed[:, width:, :width] = real[:, None, :] & live[:, :, None]
    same = (owner[:, :, None] == owner[:, None, :]) & (offset[:, None, :] <= offset[:, :, None]) & live[:, None, :]
    allowed[:, width:, width:] = same & live[:, :, None]
    allowed |= torch.eye(size, dtype=torch.bool, device=real.device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=real.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _token_logprobs(lm: LoadedModel, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token | state) in float32 for (M, D) final (normed) states and (M,) tokens, in LM-head chunks."""
    head = lm.model.get_output_embeddings()
    out = torch.empty(tokens.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, tokens.shape[0], HEAD_POSITIONS):
        logits = head(hidden[start : start + HEAD_POSITIONS]).float()
        chosen = logits.gather(1, tokens[start : start + HEAD_POSITIONS, None])[:, 0]
        out[start : start + HEAD_POSITIONS] = chosen - torch.logsumexp(logits, -1)
    return out


@torch.inference_mode()
def continuation_logliks(lm: LoadedModel, groups: list[tuple[list[int], list[list[int]]]],
                         programs: list[tuple[int, ...]], prefill: str = "skip",
                         row_tokens: int = ROW_TOKENS) -> list[np.ndarray]:
    """Summed log-probability of each continuation after its context, under every program (cross product).

    groups: G (context token ids, continuations' token ids), every list non-empty; programs: U layer programs
    (`configs.check_program`: subsets, repeats, reorderings). Returns per group a (U, n_continuations) float64
    array, in nats. Raises ValueError for an unknown prefill policy, an empty context or continuation, or a
    program that does not fit the model.
    """
    distinct = sorted(set(programs), key=lambda p: (not is_subset(p), p))  # subsets first, shared prefixes together
    rows = [(g, p) for p in distinct for g in range(len(groups))]
    values = _row_logliks(lm, groups, rows, prefill, row_tokens, len(groups), subsets_apart=True)
    where = {p: u for u, p in enumerate(distinct)}
    out = [np.empty((len(distinct), len(conts))) for _, conts in groups]
    for (g, p), value in zip(rows, values):
        out[g][where[p]] = value
    return [o[[where[p] for p in programs]] for o in out]


@torch.inference_mode()
def pair_logliks(lm: LoadedModel, groups: list[tuple[list[int], list[list[int]]]],
                 pairs: list[tuple[int, tuple[int, ...]]], prefill: str = "skip",
                 row_tokens: int = ROW_TOKENS) -> list[np.ndarray]:
    """Summed log-probability of each continuation of chosen (group index, program) pairs, not the cross
    product: result[r] is the (n_continuations of its group,) float64 array of pair r, in nats. Per-sequence
    search needs this (every question its own programs, all scored in one routed batch); equal to
    `continuation_logliks` of each pair alone. Raises ValueError as `continuation_logliks`."""
    order = sorted(range(len(pairs)), key=lambda r: (pairs[r][1], pairs[r][0]))  # shared prefixes together
    values = _row_logliks(lm, groups, [pairs[r] for r in order], prefill, row_tokens, 1, subsets_apart=False)
    out: list[np.ndarray] = [np.empty(0)] * len(pairs)
    for r, value in zip(order, values):
        out[r] = value
    return out


def _row_logliks(lm: LoadedModel, groups: list[tuple[list[int], list[list[int]]]],
                 rows: list[tuple[int, tuple[int, ...]]], prefill: str, row_tokens: int, unit: int,
                 subsets_apart: bool) -> list[np.ndarray]:
    """Per (group, program) row, its group's continuations' summed log-probabilities (float64, nats). Rows go
    through the model in chunks of a multiple of `unit` rows bounded by `row_tokens`; a chunk of subsets runs
    the model's own L-layer stack, a chunk holding another program a schedule of slots (`engine.program_stack`).
    `subsets_apart`: `rows` lists the subsets first and no chunk mixes them with other programs."""
    if prefill not in PREFILL_POLICIES:
        raise ValueError(f"unknown prefill policy {prefill!r}; choose from {', '.join(PREFILL_POLICIES)}")
    if not groups or any(not ctx or not conts or any(not c for c in conts) for ctx, conts in groups):
        raise ValueError("every context and every continuation needs at least one token")
    model, device, num_layers = lm.model, lm.device, lm.num_layers
    for program in dict.fromkeys(p for _, p in rows):
        try:
            check_program("of a log-likelihood row", list(program), num_layers)
        except ValueError as exc:
            raise ValueError(f"program {list(program)} does not fit the {num_layers}-layer model ({exc})") from None
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    context_ids, context_mask = left_pad([ctx for ctx, _ in groups], pad, device)
    positions = prompt_positions(context_ids, context_mask)
    ids, offset, owner, (t_group, t_column, t_token) = _packed(groups, pad, device)
    width, packed = context_ids.shape[1], ids.shape[1]
    packed_positions = context_mask.sum(1, keepdim=True) + offset
    mask = _mask(context_mask, owner, offset, model.dtype)
    # Targets are group-major: group g's are target_start[g] .. + target_count[g], its continuations likewise.
    target_count = torch.bincount(t_group, minlength=len(groups)).cpu()
    target_start = target_count.cumsum(0) - target_count
    sizes = [len(c) for _, conts in groups for c in conts]
    cont_of_target = np.repeat(np.arange(len(sizes)), sizes)
    cont_start = np.cumsum([0] + [len(conts) for _, conts in groups])

    length = packed + (width if prefill == "skip" else 0)
    per_chunk = max(1, row_tokens // (unit * length)) * unit
    split = sum(is_subset(p) for _, p in rows) if subsets_apart else len(rows)  # chunks never straddle it
    chunks = [rows[a : min(a + per_chunk, end)] for begin, end in ((0, split), (split, len(rows)))
              for a in range(begin, end, per_chunk)]
    out: list[np.ndarray] = []
    with wrapped_layers(model, _SharedPrefixLayer) as wrappers:
        shared, first_scores = None, None
        if prefill == "full":  # contexts once through every layer: their KV and the first token's log-probability
            for wrapper in wrappers:
                wrapper.rows = wrapper.executed = wrapper.copy_to = wrapper.copy_from = None
            cache = Cache(layers=[_SlotLayer(width) for _ in wrappers])
            decoded = model.get_decoder()(input_ids=context_ids, attention_mask=mask[:, :, :width, :width],
                                          position_ids=positions, past_key_values=cache, use_cache=True)
            first = t_column < 0
            first_scores = torch.zeros(t_token.shape, dtype=torch.float32, device=device)
            first_scores[first] = _token_logprobs(lm, decoded.last_hidden_state[t_group[first], -1], t_token[first])
            shared = [(layer.keys, layer.values) for layer in cache.layers]
        columns = t_column if shared is not None else torch.where(t_column < 0, width - 1, width + t_column)
        for chunk in chunks:
            contexts = torch.tensor([g for g, _ in chunk], dtype=torch.long)
            row_of_target = torch.repeat_interleave(torch.arange(len(chunk)), target_count[contexts])
            target = torch.cat([torch.arange(target_start[g], target_start[g] + target_count[g]) for g, _ in chunk])
            row_of_target, target = row_of_target.to(device), target.to(device)
            scores = first_scores[target] if shared is not None else torch.zeros(target.shape, device=device)
            scored = columns[target] >= 0
            if bool(scored.any()):  # else single-token continuations: the full model's prefill decides them all
                schedule = layer_schedule(list(dict.fromkeys(p for _, p in chunk)), num_layers)
                with program_stack(model, wrappers, schedule, _SharedPrefixLayer) as slots:
                    hidden = _chunk_states(model, slots, schedule, chunk, context_ids, positions, ids,
                                           packed_positions, mask, shared)
                picked = hidden[row_of_target[scored], columns[target[scored]]]
                scores[scored] = _token_logprobs(lm, picked, t_token[target[scored]])
            target_np, row_np = target.cpu().numpy(), row_of_target.cpu().numpy()
            group_np = contexts.numpy()[row_np]
            widest = int(max(cont_start[g + 1] - cont_start[g] for g, _ in chunk))
            cell = row_np * widest + cont_of_target[target_np] - cont_start[group_np]
            totals = np.bincount(cell, weights=scores.double().cpu().numpy(), minlength=len(chunk) * widest)
            totals = totals.reshape(len(chunk), widest)
            out += [totals[i, : cont_start[g + 1] - cont_start[g]] for i, (g, _) in enumerate(chunk)]
    return out


def _chunk_states(model: torch.nn.Module, slots: list[_SharedPrefixLayer], schedule: tuple[int, ...],
                  chunk: list[tuple[int, tuple[int, ...]]], context_ids: torch.Tensor, positions: torch.Tensor,
                  ids: torch.Tensor, packed_positions: torch.Tensor, mask: torch.Tensor, shared) -> torch.Tensor:
    """One forward of every (context, program) row of a chunk through the slots of `schedule` (slot s runs
    physical layer schedule[s]): the final normed states (rows, C + K, D) under `skip`, (rows, K, D) under
    `full` (the packed part only)."""
    device = context_ids.device
    width = context_ids.shape[1]
    group_of_row = torch.tensor([g for g, _ in chunk], dtype=torch.long, device=device)
    rep = _representatives([p for _, p in chunk], [g for g, _ in chunk], schedule)
    computed = []
    for s, slot in enumerate(slots):
        runs = np.flatnonzero(rep[:, s] >= 0)
        reps = runs[rep[runs, s] == runs]
        copies = runs[rep[runs, s] != runs]
        computed.append(reps)
        slot.executed = None
        slot.rows = None if len(reps) == len(chunk) else torch.as_tensor(reps, device=device)
        if len(copies):
            slot.copy_to = torch.as_tensor(copies, device=device)
            slot.copy_from = torch.as_tensor(rep[copies, s], device=device)
        else:
            slot.copy_to = slot.copy_from = None
    if shared is not None:  # each execution of layer j attends to its context's full-model KV at layer j
        cache = Cache(layers=[_SlotLayer(width + ids.shape[1]) for _ in slots])
        for s, j in enumerate(schedule):
            kept = group_of_row[torch.as_tensor(computed[s], device=device)]
            if kept.numel():
                keys, values = shared[j]
                cache.layers[s].load(keys[kept], values[kept])
        out = model.get_decoder()(input_ids=ids[group_of_row], attention_mask=mask[group_of_row, :, width:],
                                  position_ids=packed_positions[group_of_row], past_key_values=cache, use_cache=True)
    else:  # the context runs through the program too, in the same pass
        out = model.get_decoder()(input_ids=torch.cat([context_ids, ids], 1)[group_of_row],
                                  attention_mask=mask[group_of_row],
                                  position_ids=torch.cat([positions, packed_positions], 1)[group_of_row],
                                  use_cache=False)
    return out.last_hidden_state
