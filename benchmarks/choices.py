"""Benchmark of the multiple-choice task: scored tokens per second of the engine (`loglik.continuation_logliks`:
every configuration in one routed pass, contexts shared, layers run once per distinct prefix) against a plain
Hugging Face forward per configuration on a deep copy of its kept layers (each choice its own padded
sequence, the same questions, the same batch). Prints both rates, the speed-up and the largest difference
between the two log-likelihoods.

    python benchmarks/choices.py [--dataset arc_easy] [--limit 8] [--families uls,ee,rls] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

from pipeline.data.adapters import DatasetSpec, load_examples
from pipeline.generation.configs import build_configs
from pipeline.generation.loglik import continuation_logliks
from pipeline.generation.models import decoder_layers, load_model


def kept_copy(model: nn.Module, kept: tuple[int, ...]) -> nn.Module:
    """The decoder with a deep copy of only its kept layers (embeddings and final norm shared)."""
    decoder = copy.copy(model.get_decoder())
    decoder._modules = dict(decoder._modules)
    decoder.layers = nn.ModuleList(copy.deepcopy(decoder_layers(model)[j]) for j in kept)
    return decoder


@torch.inference_mode()
def plain_logliks(model: nn.Module, decoder: nn.Module, pairs: list[tuple[list[int], list[int]]], pad: int) -> np.ndarray:
    """Summed log-probability of each continuation after its context: one right-padded row per pair."""
    width = max(len(c) + len(t) for c, t in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (c, t) in enumerate(pairs):
        ids[i, : len(c) + len(t)] = torch.tensor(c + t)
        mask[i, : len(c) + len(t)] = 1
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    out = np.empty(len(pairs))
    for i, (c, t) in enumerate(pairs):
        logits = model.get_output_embeddings()(hidden[i, len(c) - 1 : len(c) + len(t) - 1]).float()
        out[i] = float(torch.log_softmax(logits, -1)[torch.arange(len(t)), torch.tensor(t)].double().sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="arc_easy")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=8, help="questions, all in one batch")
    parser.add_argument("--families", default="uls,ee,rls")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(dtype=args.dtype, device="cpu")
    examples = load_examples(DatasetSpec(args.dataset, split=args.split, limit=args.limit), lm.tokenizer)
    sets = list(dict.fromkeys(c.layers for c in build_configs(lm.num_layers, tuple(args.families.split(",")), (0,))))
    pairs = [(list(ctx), list(cont)) for ex in examples for ctx, cont in ex.requests]
    by_context: dict[tuple, list[list[int]]] = {}
    for ctx, cont in pairs:
        by_context.setdefault(tuple(ctx), []).append(cont)
    groups = [(list(ctx), conts) for ctx, conts in by_context.items()]
    scored = len(sets) * sum(len(t) for _, t in pairs)

    start = time.perf_counter()
    engine = continuation_logliks(lm, groups, sets, "skip")
    engine_s = time.perf_counter() - start
    engine_flat = np.concatenate([g for g in engine], axis=1)  # (U, pairs in context-group order)
    order = [(tuple(ctx), j) for ctx, conts in groups for j in range(len(conts))]

    start = time.perf_counter()
    plain = np.stack([plain_logliks(lm.model, kept_copy(lm.model, s), pairs, lm.tokenizer.pad_token_id) for s in sets])
    plain_s = time.perf_counter() - start
    index = {}
    for p, (ctx, _) in enumerate(pairs):
        index.setdefault(tuple(ctx), []).append(p)
    plain_flat = plain[:, [index[ctx][j] for ctx, j in order]]
    print(f"{args.dataset}: {len(examples)} questions, {len(pairs)} choices, {len(sets)} layer sets, {args.dtype}, "
          f"{args.threads} thread(s); {scored} scored tokens")
    print(f"  engine (one routed pass, shared contexts and prefixes): {engine_s:8.1f} s  {scored / engine_s:8.1f} tok/s")
    print(f"  plain HF forward per configuration on a copy of its layers: {plain_s:8.1f} s  {scored / plain_s:8.1f} tok/s")
    diff = np.abs(engine_flat - plain_flat)
    print(f"  speed-up {plain_s / engine_s:.2f}x; |log-likelihood difference| median {np.median(diff):.2e}, "
          f"largest {diff.max():.2e} nats (float32 agrees to 1e-5: tests/test_loglik.py; bfloat16 rounds differently "
          "in different batch shapes)")


if __name__ == "__main__":
    main()
