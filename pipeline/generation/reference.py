"""Slow, obviously-correct decoders that the engine is checked and benchmarked against.

- `masked_generate`: the study's way. Every layer is computed for every token and a skipped layer's
  output is thrown away (identity), with or without a KV cache. With `use_cache=False` every step
  recomputes the whole sequence, gating layers per position (prompt positions under prefill `full`
  run all layers), which is the definition of a configuration with no caching involved.
- `gated_reference_generate`: per-token gates (`pipeline.generation.gated`) with no cache, each step the
  whole sequence with per-position gating and, under `kv = "none"`, the skipped tokens' keys masked out.
- `program_generate`: a layer program (repeats, reorderings) run literally, without a KV cache: every
  step recomputes the whole sequence through a stack holding the program's layers in order (a repeated
  layer appears twice). Under prefill `full` the prompt positions' input to every execution of layer j
  is the full model's input to layer j, and the first token is the full model's: the engine's definition.
- `program_loglik`: a continuation's summed log-probability after a context under a layer program, run
  literally as `program_generate` runs it (the check of `loglik`'s programs).
- `subset_generate`: the plain way. A deep copy of the model holding only the kept layers, decoded
  with Hugging Face `generate` (prefill `skip` semantics).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import DynamicCache

from pipeline.generation.configs import SkipConfig
from pipeline.generation.engine import eos_ids, left_pad, prompt_positions, swapped_stack, wrapped_layers
from pipeline.generation.models import LoadedModel, cache_argument, decoder_layers


class _MaskedLayer(nn.Module):
    """Computes the wrapped layer, then keeps its output only where `keep` (per row and position) is set."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.keep: torch.Tensor | bool = True

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        if self.keep is True:
            return out
        if self.keep is False:
            return hidden_states
        return torch.where(self.keep[..., None], out, hidden_states)


@torch.inference_mode()
def masked_generate(lm: LoadedModel, prompts: list[list[int]], config: SkipConfig, max_new_tokens: int,
                    prefill: str = "full", use_cache: bool = True, ignore_eos: bool = False) -> list[list[int]]:
    """Greedy tokens per prompt (through its first EOS) with skipped layers computed and masked out.

    A skipped layer is identity for generated positions, and for prompt positions too unless prefill is
    `full`. With `use_cache=False` each step re-runs the whole sequence from scratch.
    """
    model, device = lm.model, lm.device
    input_ids, attention_mask = left_pad(prompts, lm.tokenizer.pad_token_id, device)
    mask = attention_mask if bool((attention_mask == 0).any()) else None
    positions = prompt_positions(input_ids, mask)
    num_prompts, prompt_len = input_ids.shape
    kept = set(config.layers)
    cache = DynamicCache(config=model.config) if use_cache else None
    generated = input_ids.new_empty(num_prompts, 0)
    with wrapped_layers(model, _MaskedLayer) as wrappers:
        for step in range(max_new_tokens):
            if use_cache and step > 0:
                ids, first_index = generated[:, -1:], prompt_len + step - 1
            else:
                ids, first_index = torch.cat([input_ids, generated], 1), 0
            pos = torch.cat([positions, positions[:, -1:] + torch.arange(1, step + 1, device=device)], 1)
            in_prompt = torch.arange(first_index, first_index + ids.shape[1], device=device) < prompt_len
            for j, wrapper in enumerate(wrappers):
                wrapper.keep = True if j in kept else (in_prompt.expand_as(ids) if prefill == "full" else False)
            step_mask = None if mask is None else torch.cat([mask, mask.new_ones(num_prompts, step)], 1)
            out = model(input_ids=ids, attention_mask=step_mask, position_ids=pos[:, -ids.shape[1]:],
                        use_cache=use_cache, logits_to_keep=1, **cache_argument(model, cache))
            generated = torch.cat([generated, out.logits[:, -1, :].argmax(-1, keepdim=True)], 1)
    return _cut_at_eos(lm, generated, ignore_eos)


class _ProgramLayer(nn.Module):
    """One execution of a layer in a program; under prefill `full`, its prompt positions' input is replaced
    by the full model's input to that layer (`prompt_input`, (P, width, hidden))."""

    def __init__(self, layer: nn.Module, prompt_input: torch.Tensor | None):
        super().__init__()
        self.layer, self.prompt_input = layer, prompt_input

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.prompt_input is not None:
            width = self.prompt_input.shape[1]
            hidden_states = torch.cat([self.prompt_input, hidden_states[:, width:]], 1)
        return self.layer(hidden_states, *args, **kwargs)


def _cut_at_eos(lm: LoadedModel, generated: torch.Tensor, ignore_eos: bool) -> list[list[int]]:
    stops = eos_ids(lm)
    stop_list = [] if stops is None else stops.tolist()
    tokens = []
    for row in generated.tolist():
        ends = [i for i, t in enumerate(row) if t in stop_list]
        tokens.append(row if ignore_eos or not ends else row[: ends[0] + 1])
    return tokens


def _full_model_inputs(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None,
                       positions: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The full model's logits (P, T, V) over the prompt, and its input to every layer (P, T, hidden)."""
    stack = decoder_layers(model)
    inputs: list[torch.Tensor] = [input_ids.new_empty(0)] * len(stack)
    hooks = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs, j=j: inputs.__setitem__(j, (args[0] if args else kwargs["hidden_states"])),
        with_kwargs=True) for j, layer in enumerate(stack)]
    try:
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, inputs


@torch.inference_mode()
def program_generate(lm: LoadedModel, prompts: list[list[int]], program: tuple[int, ...], max_new_tokens: int,
                     prefill: str = "full", ignore_eos: bool = False) -> list[list[int]]:
    """Greedy tokens per prompt (through its first EOS) of a layer program run literally with no KV cache."""
    model, device = lm.model, lm.device
    input_ids, attention_mask = left_pad(prompts, lm.tokenizer.pad_token_id, device)
    mask = attention_mask if bool((attention_mask == 0).any()) else None
    positions = prompt_positions(input_ids, mask)
    stack = decoder_layers(model)
    prompt_inputs: list[torch.Tensor | None] = [None] * len(stack)
    if prefill == "full":
        first, prompt_inputs = _full_model_inputs(model, input_ids, mask, positions)
        first = first[:, -1:]
    modules = [_ProgramLayer(stack[j], prompt_inputs[j]) for j in program]
    generated = input_ids.new_empty(len(prompts), 0)
    for step in range(max_new_tokens):
        if prefill == "full" and step == 0:
            logits = first
        else:
            ids = torch.cat([input_ids, generated], 1)
            pos = torch.cat([positions, positions[:, -1:] + torch.arange(1, step + 1, device=device)], 1)
            step_mask = None if mask is None else torch.cat([mask, mask.new_ones(len(prompts), step)], 1)
            with swapped_stack(model, modules, program):
                logits = model(input_ids=ids, attention_mask=step_mask, position_ids=pos, use_cache=False,
                               logits_to_keep=1).logits
        generated = torch.cat([generated, logits[:, -1, :].argmax(-1, keepdim=True)], 1)
    return _cut_at_eos(lm, generated, ignore_eos)


@torch.inference_mode()
def program_loglik(lm: LoadedModel, context: list[int], continuation: list[int], program: tuple[int, ...],
                   prefill: str = "full") -> float:
    """Summed log-probability (nats, float64) of `continuation` after `context` under a layer program run
    literally: one forward, no cache and no batching, of context + continuation through a stack holding the
    program's layers in order. Under prefill `full` the context positions' input to every execution of layer j
    is the full model's input to layer j, and the first continuation token's log-probability is the full
    model's (the engine's definition, as `program_generate`)."""
    model, stack = lm.model, decoder_layers(lm.model)
    ids = torch.tensor([context + continuation[:-1]], dtype=torch.long, device=lm.device)
    positions = prompt_positions(ids, None)
    context_inputs: list[torch.Tensor | None] = [None] * len(stack)
    if prefill == "full":
        full_logits, inputs = _full_model_inputs(model, ids[:, : len(context)], None, positions[:, : len(context)])
        context_inputs = inputs
    modules = [_ProgramLayer(stack[j], context_inputs[j]) for j in program]
    with swapped_stack(model, modules, program):
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0].float()
    if prefill == "full":
        logits[len(context) - 1] = full_logits[0, -1].float()
    logprobs = torch.log_softmax(logits[len(context) - 1 :], -1)
    return float(logprobs[torch.arange(len(continuation)), torch.tensor(continuation)].double().sum())


@torch.inference_mode()
def subset_generate(lm: LoadedModel, prompts: list[list[int]], config: SkipConfig, max_new_tokens: int,
                    ignore_eos: bool = False) -> torch.Tensor:
    """Hugging Face `generate` on a deep copy of the model that holds only the kept layers."""
    model = copy.deepcopy(lm.model)
    stack = decoder_layers(model)
    kept = nn.ModuleList([stack[j] for j in config.layers])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    parent = model.get_decoder()
    for name, child in parent.named_children():
        if child is stack:
            setattr(parent, name, kept)
    model.config.num_hidden_layers = len(kept)
    input_ids, attention_mask = left_pad(prompts, lm.tokenizer.pad_token_id, lm.device)
    kwargs = {"min_new_tokens": max_new_tokens} if ignore_eos else {}
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=lm.tokenizer.pad_token_id, **kwargs)


class _GatedReferenceLayer(nn.Module):
    """The whole sequence through the layer with no cache; positions from `start` on (the generated tokens) keep
    their input where the gate says skip. With `kv = "none"` no position attends to a token that skipped the
    layer (its key is masked out); with `compute` every earlier token is visible (plain causal attention)."""

    def __init__(self, layer: nn.Module, index: int, gate, kv: str):
        super().__init__()
        self.layer, self.index, self.gate, self.kv = layer, index, gate, kv
        self.start = 0
        self.ran: torch.Tensor | None = None  # (T,) bool after a forward

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        length = hidden_states.shape[1]
        run = torch.ones(length, dtype=torch.bool, device=hidden_states.device)
        if self.index > 0 and length > self.start:
            run[self.start :] = self.gate(self.index, hidden_states[0, self.start :]).to(torch.bool)
        self.ran = run
        causal = torch.ones(length, length, dtype=torch.bool, device=run.device).tril()
        visible = causal & run[None, :] if self.kv == "none" else causal
        bias = torch.zeros(visible.shape, dtype=hidden_states.dtype, device=run.device)
        kwargs["attention_mask"] = bias.masked_fill_(~visible, torch.finfo(bias.dtype).min)[None, None]
        out = self.layer(hidden_states, *args, **kwargs)
        return torch.where(run[None, :, None], out, hidden_states)


@torch.inference_mode()
def gated_reference_generate(lm: LoadedModel, prompt: list[int], gate, max_new_tokens: int,
                             kv: str = "compute") -> tuple[list[int], float]:
    """Per-token gated greedy decoding with no cache, for one prompt: every step re-runs the whole sequence in
    eager attention, the prompt through every layer and each generated token through the layers `gate(l, h)`
    lets it run (h its input state to layer l). Returns the tokens (through the first EOS) and the mean number of
    layers run per decode token (the first token, the prompt's, not counted; NaN when there is no other)."""
    from pipeline.generation.engine import attention_implementation

    model, device = lm.model, lm.device
    stops = eos_ids(lm)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    tokens, layers_run = [], 0
    index = iter(range(lm.num_layers))
    with wrapped_layers(model, lambda layer: _GatedReferenceLayer(layer, next(index), gate, kv)) as wrappers, \
            attention_implementation(model, "eager"):
        for wrapper in wrappers:
            wrapper.start = len(prompt)
        for step in range(max_new_tokens):
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())
            if step > 0:
                layers_run += sum(int(w.ran[-1]) for w in wrappers)
            tokens.append(token)
            if stops is not None and token in stops.tolist():
                break
            ids = torch.cat([ids, ids.new_tensor([[token]])], 1)
    return tokens, (layers_run / (len(tokens) - 1) if len(tokens) > 1 else float("nan"))
