"""Benchmark: a batch of mixed layer programs (repeats, reorderings) against a batch of plain subsets of
exactly the same costs, on the engine, per executed layer.

Both batches decode the same prompts with EOS ignored in one routed batch each; the programs are random
walks of the search's moves (`pipeline.search.policy.mutate`) from the full model, and each subset is a
random-skip (RLS) subset of the same length as one program, so both batches execute the same number of
layers. Two shapes:
- `cross` (`engine.generate`, a run's shape): every prompt under every one of `--programs` configurations,
  for each count of prompts in `--prompts` (rows per program);
- `pairs` (`engine.generate_pairs`, the search's shape): each prompt under its own `--programs` candidates,
  every row a different program.
A program batch runs a longer schedule of slots (`engine.layer_schedule`) with fewer rows in the extra
slots; a slot's call costs nearly the same for few rows as for tens (the layer's weights are read and
its kernels launched whatever the rows), so the ratio falls as rows per slot grow. The two batches
alternate `--repeats` times; the figure is the median of the paired ratios of time per executed layer
(the target is at most 1.15 on this CPU), with each arm's minimum time beside it.

    python benchmarks/programs.py [--model embedded:smollm2-135m-instruct] [--dtype auto] [--prompts 4,16,64]
                                  [--programs 16] [--pairs-prompts 64] [--new-tokens 16] [--prefill full]
                                  [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from pipeline.generation.configs import CUSTOM, SkipConfig, rls_layers
from pipeline.generation.engine import generate, generate_pairs, layer_schedule
from pipeline.generation.models import EMBEDDED_MODEL, load_model
from pipeline.search.policy import mutate

WORDS = ["brick", "river", "violin", "ladder", "cloud", "lamp", "spoon", "map"]


def matched_batches(num_layers: int, count: int, seed: int = 0) -> tuple[list[SkipConfig], list[SkipConfig]]:
    """`count` non-increasing programs of costs spread over L/3..L, and `count` subsets of the same costs."""
    rng = np.random.default_rng(seed)
    programs, subsets = [], []
    for k, cost in enumerate(np.linspace(num_layers // 3, num_layers, count).astype(int)):
        program = mutate(tuple(range(num_layers)), int(cost), num_layers, rng)
        while all(a < b for a, b in zip(program, program[1:])):  # keep only true programs (a repeat or a reorder)
            program = mutate(tuple(range(num_layers)), int(cost), num_layers, rng)
        programs.append(SkipConfig(f"program-{k}", CUSTOM, len(program), program))
        layers = rls_layers(num_layers, int(cost), seed * 100_000 + k) if cost < num_layers else tuple(range(num_layers))
        subsets.append(SkipConfig(f"subset-{k}", CUSTOM, len(layers), layers))
    return programs, subsets


def paired(arms: dict, run, repeats: int) -> dict:
    """Alternate the arms `repeats` times (a burst of load on a shared machine hits both); per arm its
    minimum seconds and executed layer-tokens, and the median paired ratio of time per executed layer."""
    seconds = {name: [] for name in arms}
    executed = {}
    for r in range(repeats):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            start = time.perf_counter()
            gens = run(arms[name])
            seconds[name].append(time.perf_counter() - start)
            executed[name] = int(round(sum(g.layers_per_token * g.gen_tokens for g in gens)))
    per_layer = {name: [s / executed[name] for s in seconds[name]] for name in arms}
    ratios = [p / s for p, s in zip(per_layer["programs"], per_layer["subsets"])]
    out = {f"{name}_{key}": value for name in arms
           for key, value in (("seconds_min", round(min(seconds[name]), 3)), ("executed_layers", executed[name]))}
    out["ratio_per_executed_layer"] = round(statistics.median(ratios), 3)
    out["ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", default="4,16,64", help="comma-separated prompt counts for the cross shape")
    parser.add_argument("--programs", type=int, default=16)
    parser.add_argument("--pairs-prompts", type=int, default=64, help="prompts of the pairs shape (0: skip it)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill", default="full")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    lm = load_model(args.model, args.dtype, "cpu")
    L = lm.num_layers

    def prompts(count: int) -> list[list[int]]:
        return [lm.tokenizer(f"Question {i}: name three uses of a {WORDS[i % len(WORDS)]}.")["input_ids"]
                for i in range(count)]

    def decode(batch, configs):
        return [g for row in generate(lm, batch, configs, args.new_tokens, prefill=args.prefill, ignore_eos=True)
                for g in row]

    programs, subsets = matched_batches(L, args.programs)
    figures = {"model": lm.name, "dtype": lm.dtype, "layers": L, "programs": args.programs,
               "new_tokens": args.new_tokens, "prefill": args.prefill, "repeats": args.repeats,
               "cross_schedule_slots": len(layer_schedule([c.layers for c in programs], L)), "cross": {}}
    decode(prompts(2), subsets[:2])  # warm-up
    for count in (int(x) for x in args.prompts.split(",") if x.strip()):
        batch = prompts(count)
        name = f"{count} prompts x {args.programs} = {count * args.programs} rows"
        figures["cross"][name] = paired({"subsets": subsets, "programs": programs},
                                        lambda configs: decode(batch, configs), args.repeats)
        print(json.dumps({name: figures["cross"][name]}), flush=True)  # progress: each size as it finishes
    if args.pairs_prompts:
        batch = prompts(args.pairs_prompts)
        arms = {"subsets": [], "programs": []}
        for i in range(len(batch)):
            own_programs, own_subsets = matched_batches(L, args.programs, seed=i + 1)
            arms["programs"] += [(i, c) for c in own_programs]
            arms["subsets"] += [(i, c) for c in own_subsets]
        figures["pairs_schedule_slots"] = len(layer_schedule([c.layers for _, c in arms["programs"]], L))
        figures[f"pairs: {len(batch)} prompts x {args.programs} own programs"] = paired(
            arms, lambda pairs: generate_pairs(lm, batch, pairs, args.new_tokens, prefill=args.prefill,
                                               ignore_eos=True), args.repeats)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
