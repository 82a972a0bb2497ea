"""Teacher-forced log-likelihoods of continuations after a context, for every layer set in one routed pass.

The multiple-choice task (`pipeline.generation.choice_task`) asks, per (question, configuration, choice), for
the summed log-probability of the choice's tokens after its context, as lm-evaluation-harness's
`loglikelihood` requests do. Here that runs on the engine's routed layers (`pipeline.generation.engine`):
every (layer set, context) is a row of one batch, and each decoder layer runs only on the rows that keep it.

Sharing, all exact:
- One row per (layer set, context), not per choice: the context is followed by every continuation of that
  context packed one after another (without their last token, which predicts nothing), and a 4-D mask lets
  each continuation token see the context and the earlier tokens of its own continuation only. Each packed
  token carries the position it would have right after the context, so every log-probability is the one
  of a separate (context + continuation) sequence.
- Under the `full` prefill the contexts run once through all layers (the first continuation token's
  log-probability is the full model's for every layer set, as a generation's first token is); the packed
  continuations then attend to that KV at each kept layer. Under `skip` the context runs through the kept
  layers in the same pass.
- Layer sets that execute the same layers before layer j feed layer j the same states: it runs once per
  distinct (context, layers executed so far) and the result is copied (early exit at c is a prefix of
  every longer early exit and of `full`, so that whole family costs one full pass plus its heads).
- Only the positions that predict a continuation token go through the LM head.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import Cache

from pipeline.generation.engine import (
    PREFILL_POLICIES,
    _RoutedLayer,
    _SlotLayer,
    left_pad,
    prompt_positions,
    wrapped_layers,
)
from pipeline.generation.models import LoadedModel

ROW_TOKENS = 1 << 15  # (row, position) pairs per forward: bounds the activations of one group of rows
HEAD_POSITIONS = 1024  # positions per LM-head chunk: bounds the (positions, vocabulary) logits


class _SharedPrefixLayer(_RoutedLayer):
    """A routed layer that runs once per distinct input among its rows: `rows` are the representatives, and
    after the layer each row of `copy_to` takes the output of its representative `copy_from`."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__(layer)
        self.copy_to: torch.Tensor | None = None
        self.copy_from: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = super().forward(hidden_states, *args, **kwargs)
        if self.copy_to is None:
            return out
        return out.index_copy(0, self.copy_to, out.index_select(0, self.copy_from))


def _representatives(layer_sets: list[tuple[int, ...]], num_layers: int) -> np.ndarray:
    """rep[u, j]: the first set executing layer j after the same earlier layers as set u (-1: u skips j).

    Sets with the same layers before j hold the same states at j's input, so j's output is computed once.
    """
    rep = np.full((len(layer_sets), num_layers), -1, dtype=np.int64)
    first: dict[tuple[int, ...], int] = {}
    for u, layers in enumerate(layer_sets):
        for i, j in enumerate(layers):
            rep[u, j] = first.setdefault(layers[: i + 1], u)
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
                         layer_sets: list[tuple[int, ...]], prefill: str = "skip",
                         row_tokens: int = ROW_TOKENS) -> list[np.ndarray]:
    """Summed log-probability of each continuation after its context, under every layer set.

    groups: G (context token ids, continuations' token ids), every list non-empty; layer_sets: U sorted
    layer tuples starting at 0. Returns per group a (U, n_continuations) float64 array, in nats.
    Raises ValueError for an unknown prefill policy, an empty context or continuation, or a set that does
    not fit the model.
    """
    if prefill not in PREFILL_POLICIES:
        raise ValueError(f"unknown prefill policy {prefill!r}; choose from {', '.join(PREFILL_POLICIES)}")
    if not groups or any(not ctx or not conts or any(not c for c in conts) for ctx, conts in groups):
        raise ValueError("every context and every continuation needs at least one token")
    model, device, num_layers = lm.model, lm.device, lm.num_layers
    if any(not s or s[0] != 0 or max(s) >= num_layers for s in layer_sets):
        raise ValueError(f"every layer set must start at layer 0 and fit the {num_layers}-layer model")
    sets = sorted(set(layer_sets))  # lexicographic: sets sharing a prefix sit together, in one row group
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    context_ids, context_mask = left_pad([ctx for ctx, _ in groups], pad, device)
    positions = prompt_positions(context_ids, context_mask)
    ids, offset, owner, (t_group, t_column, t_token) = _packed(groups, pad, device)
    width, packed = context_ids.shape[1], ids.shape[1]
    packed_positions = context_mask.sum(1, keepdim=True) + offset
    mask = _mask(context_mask, owner, offset, model.dtype)

    num_groups = len(groups)
    scores = torch.empty((len(sets), t_token.numel()), dtype=torch.float32, device=device)
    length = packed + (width if prefill == "skip" else 0)
    per_chunk = max(1, row_tokens // (num_groups * length))
    with wrapped_layers(model, _SharedPrefixLayer) as wrappers:
        shared = None
        if prefill == "full":  # contexts once through every layer: their KV and the first token's log-probability
            for wrapper in wrappers:
                wrapper.rows = wrapper.executed = wrapper.copy_to = wrapper.copy_from = None
            cache = Cache(layers=[_SlotLayer(width) for _ in wrappers])
            out = model.get_decoder()(input_ids=context_ids, attention_mask=mask[:, :, :width, :width],
                                      position_ids=positions, past_key_values=cache, use_cache=True)
            first = t_column < 0
            first_scores = _token_logprobs(lm, out.last_hidden_state[t_group[first], -1], t_token[first])
            shared = [(layer.keys, layer.values) for layer in cache.layers]
        scored = t_column >= 0 if shared is not None else torch.ones_like(t_column, dtype=torch.bool)
        columns = t_column[scored] if shared is not None else torch.where(t_column < 0, width - 1, width + t_column)
        for start in range(0, len(sets), per_chunk):
            chunk = sets[start : start + per_chunk]
            if shared is not None:
                scores[start : start + len(chunk), ~scored] = first_scores
                if not bool(scored.any()):  # single-token continuations: the full model's prefill decides them all
                    continue
            hidden = _chunk_states(model, wrappers, chunk, num_layers, context_ids, positions, ids, packed_positions,
                                   mask, shared)
            rows = torch.arange(len(chunk), device=device)[:, None] * num_groups + t_group[scored][None, :]  # (S, M)
            picked = hidden[rows, columns[None, :].expand_as(rows)]  # (S, M, D)
            chunk_scores = _token_logprobs(lm, picked.reshape(-1, picked.shape[-1]),
                                           t_token[scored].repeat(len(chunk))).view(len(chunk), -1)
            scores[start : start + len(chunk), scored] = chunk_scores

    sizes = [len(c) for _, conts in groups for c in conts]
    choice_of_target = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                               torch.tensor(sizes, device=device))
    totals = torch.zeros((len(sets), len(sizes)), dtype=torch.float64, device=device)
    totals = totals.index_add_(1, choice_of_target, scores.double())[[sets.index(s) for s in layer_sets]].cpu().numpy()
    out, start = [], 0
    for _, conts in groups:
        out.append(totals[:, start : start + len(conts)])
        start += len(conts)
    return out


def _chunk_states(model: torch.nn.Module, wrappers: list[_SharedPrefixLayer], chunk: list[tuple[int, ...]],
                  num_layers: int, context_ids: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor,
                  packed_positions: torch.Tensor, mask: torch.Tensor, shared) -> torch.Tensor:
    """One forward of every (layer set, context) row of a chunk, set-major: the final normed states
    (rows, C + K, D) under `skip`, (rows, K, D) under `full` (the packed part only)."""
    device = context_ids.device
    num_groups, width = context_ids.shape
    group_of_row = torch.arange(num_groups, device=device).repeat(len(chunk))
    rep = _representatives(chunk, num_layers)
    spread = np.arange(num_groups)
    computed = []
    for j, wrapper in enumerate(wrappers):
        runs = np.flatnonzero(rep[:, j] >= 0)
        reps = runs[rep[runs, j] == runs]
        copies = runs[rep[runs, j] != runs]
        rep_rows = (reps[:, None] * num_groups + spread).ravel()
        computed.append(rep_rows)
        wrapper.executed = None
        wrapper.rows = None if len(reps) == len(chunk) else torch.as_tensor(rep_rows, device=device)
        if len(copies):
            wrapper.copy_to = torch.as_tensor((copies[:, None] * num_groups + spread).ravel(), device=device)
            wrapper.copy_from = torch.as_tensor((rep[copies, j][:, None] * num_groups + spread).ravel(), device=device)
        else:
            wrapper.copy_to = wrapper.copy_from = None
    if shared is not None:  # each row's continuations attend to its context's full-model KV at every kept layer
        cache = Cache(layers=[_SlotLayer(width + ids.shape[1]) for _ in wrappers])
        for j, (keys, values) in enumerate(shared):
            kept = group_of_row[torch.as_tensor(computed[j], device=device)]
            if kept.numel():
                cache.layers[j].load(keys[kept], values[kept])
        out = model.get_decoder()(input_ids=ids[group_of_row], attention_mask=mask[group_of_row, :, width:],
                                  position_ids=packed_positions[group_of_row], past_key_values=cache, use_cache=True)
    else:  # the context runs through the kept layers too, in the same pass
        out = model.get_decoder()(input_ids=torch.cat([context_ids, ids], 1)[group_of_row],
                                  attention_mask=mask[group_of_row],
                                  position_ids=torch.cat([positions, packed_positions], 1)[group_of_row],
                                  use_cache=False)
    return out.last_hidden_state
