"""Benchmark: batches of layer programs against batches of subsets of the same costs, time per executed layer.

A batch of mixed programs (repeats, reorderings) against a batch of plain subsets of exactly the same
costs, on the engine.

Both batches decode the same prompts with EOS ignored in one routed batch each; the programs are random
walks of the search's moves (`pipeline.search.policy.mutate`) from the full model, and each subset is a
random-skip (RLS) subset of the same length as one program, so both batches execute the same number of
layers. Two shapes:
- `cross` (`engine.generate`, a run's shape): every prompt under every one of `--programs` configurations,
  for each count of prompts in `--prompts` (rows per program);
- `pairs` (`engine.generate_pairs`): each prompt under its own `--programs` random walks, every row a
  different program (a stress case: 1,000 distinct programs, most with several back-steps);
- `round` (what `dynoracle search` batches): `--round-sequences` sequences (a shard) x both arms x the
  width, the children `policy.propose` makes from the enumerated configurations (scored at random in
  place of a run's scores) over the 2 rounds of a budget-8 / width-4 search (the studies' settings;
  `dynoracle search` defaults to budget 16, 4 rounds), each round one batch, scored as the two evaluators
  score: decoded (`generate_pairs`) and multiple choice by log-likelihood (`choice_task.pair_choice_logliks`,
  `skip` prefill, as the ARC-Easy study) on the first questions of `--round-dataset` (its lm-eval split,
  read as `dynoracle run` reads it: the data directory, else the hub; skipped with a line when neither
  has it). The subsets arm gives every child an RLS subset of its cost. Scoring runs a layer once per
  distinct (context, layers so far) in a pass, so the two arms' work differs by their shared prefixes: the
  multiple-choice figure divides by the real (unpadded) tokens of the rows each layer runs on, as the
  engine shares them while a pass of 8 questions fits one chunk (`loglik.ROW_TOKENS`).
A program batch runs a longer schedule of slots (`engine.layer_schedule`) with fewer rows in the extra
slots; a slot's call costs nearly the same for few rows as for tens (the layer's weights are read and
its kernels launched whatever the rows), so the ratio falls as rows per slot grow. The two batches
alternate `--repeats` times; the figure is the median of the paired ratios of time per executed layer
(the target is at most 1.15 on this CPU), with each arm's minimum time beside it.

    python benchmarks/programs.py [--model embedded:smollm2-135m-instruct] [--dtype auto] [--prompts 4,16,64]
                                  [--programs 16] [--pairs-prompts 64] [--new-tokens 16] [--prefill full]
                                  [--round-sequences 10] [--round-dataset arc_easy] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from pipeline.data.adapters import CHOICE_DATASETS, DataError, DatasetSpec, load_examples
from pipeline.data.choice_tasks import CHOICE_TASKS
from pipeline.generation.choice_task import context_groups, pair_choice_logliks
from pipeline.generation.configs import CUSTOM, SkipConfig, build_configs, rls_layers
from pipeline.generation.engine import generate, generate_pairs, layer_schedule
from pipeline.generation.models import EMBEDDED_MODEL, load_model
from pipeline.search.policy import ARMS, SearchSpec, mutate, propose, slot_costs, slot_id

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
        layers = subset_of_cost(num_layers, int(cost), seed * 100_000 + k)
        subsets.append(SkipConfig(f"subset-{k}", CUSTOM, len(layers), layers))
    return programs, subsets


def subset_of_cost(num_layers: int, cost: int, seed: int) -> tuple[int, ...]:
    return rls_layers(num_layers, cost, seed) if cost < num_layers else tuple(range(num_layers))


def search_rounds(num_layers: int, sequences: int, seed: int = 0) -> list[tuple[list, list]]:
    """Per round of a budget-8, width-4 search over `sequences` sequences: (programs, subsets), each a list of
    (sequence, SkipConfig), every sequence's children for both arms as `pipeline.search.task` batches them
    (parents: the 88 enumerated configurations, scored at random in place of a run's scores, and the
    children evaluated in earlier rounds), and per child an RLS subset of the same cost."""
    spec, rng = SearchSpec(budget=8, width=4, cost_cap=num_layers, seed=seed), np.random.default_rng(seed)
    costs, enumerated = slot_costs(spec), [c.layers for c in build_configs(num_layers)]
    scored = {i: [(p, float(rng.random())) for p in enumerated] for i in range(sequences)}
    evaluated = {(i, arm): [] for i in range(sequences) for arm in ARMS}
    rounds = []
    for r in range(spec.rounds):
        slots = range(r * spec.width, (r + 1) * spec.width)
        programs, subsets = [], []
        for i in range(sequences):
            for arm in ARMS:
                children = propose(spec, arm, f"seq-{i}", r, [costs[j] for j in slots], num_layers, scored[i],
                                   evaluated[i, arm])
                for j, child in zip(slots, children):
                    evaluated[i, arm].append((child, float(rng.random())))
                    programs.append((i, SkipConfig(slot_id(arm, j), CUSTOM, len(child), child)))
                    layers = subset_of_cost(num_layers, len(child), 1_000 * i + 10 * j + ARMS.index(arm))
                    subsets.append((i, SkipConfig(f"subset-{arm}-{j}", CUSTOM, len(layers), layers)))
        rounds.append((programs, subsets))
    return rounds


def paired(arms: dict, run, repeats: int, executed: dict[str, int] | None = None) -> dict:
    """Alternate the arms `repeats` times (a burst of load on a shared machine hits both); per arm its
    minimum seconds and executed layer-tokens (`executed[name]`, else what `run(arm)` returns), and the
    median paired ratio of time per executed layer."""
    seconds = {name: [] for name in arms}
    executed = dict(executed or {})
    for r in range(repeats):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            start = time.perf_counter()
            returned = run(arms[name])
            seconds[name].append(time.perf_counter() - start)
            executed.setdefault(name, returned)
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
    parser.add_argument("--round-sequences", type=int, default=10,
                        help="sequences of a search round (a study shard; 0: skip the round shape)")
    parser.add_argument("--round-dataset", default="arc_easy", choices=CHOICE_DATASETS,
                        help="the multiple-choice benchmark of the round shape (its lm-eval split)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill", default="full")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name, least in (("programs", 1), ("pairs_prompts", 0), ("round_sequences", 0), ("new_tokens", 1),
                        ("repeats", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")

    lm = load_model(args.model, args.dtype, "cpu")
    L = lm.num_layers

    def prompts(count: int) -> list[list[int]]:
        return [lm.tokenizer(f"Question {i}: name three uses of a {WORDS[i % len(WORDS)]}.")["input_ids"]
                for i in range(count)]

    def executed(gens) -> int:
        return int(round(sum(g.layers_per_token * g.gen_tokens for g in gens)))

    def decode(batch, configs):
        return executed([g for row in generate(lm, batch, configs, args.new_tokens, prefill=args.prefill,
                                               ignore_eos=True) for g in row])

    def decode_pairs(batch, pairs):
        return executed(generate_pairs(lm, batch, pairs, args.new_tokens, prefill=args.prefill, ignore_eos=True))

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
        name = f"pairs: {len(batch)} prompts x {args.programs} own programs"
        figures[name] = paired(arms, lambda pairs: decode_pairs(batch, pairs), args.repeats)
        print(json.dumps({name: figures[name]}), flush=True)
    if args.round_sequences:
        rounds = search_rounds(L, args.round_sequences)
        arms = {"programs": [p for p, _ in rounds], "subsets": [s for _, s in rounds]}
        figures["round_schedule_slots"] = [len(layer_schedule([c.layers for _, c in p], L)) for p, _ in rounds]
        batch = prompts(args.round_sequences)
        name = f"round, decoded: {args.round_sequences} sequences x 2 arms x 4 children, {len(rounds)} rounds"
        figures[name] = paired(arms, lambda per_round: sum(decode_pairs(batch, pairs) for pairs in per_round),
                               args.repeats)
        print(json.dumps({name: figures[name]}), flush=True)
        try:
            spec = DatasetSpec(args.round_dataset, split=CHOICE_TASKS[args.round_dataset].split,
                               limit=args.round_sequences)
            questions = load_examples(spec, lm.tokenizer)
        except (DataError, OSError) as exc:
            print(f"round, multiple choice: skipped ({exc})")
            questions = []
        if questions:
            contexts = [context_groups(q) for q in questions]

            def layer_tokens(per_round) -> int:
                """The layer-tokens scoring the rounds executes. Scoring shares exactly (`loglik`): within a pass
                of `batch_size` questions a layer runs once per distinct (context, layers run so far), on the
                context and its packed continuations, so that is what is counted."""
                total = 0
                for pairs in per_round:
                    runs = {(i, g, c.layers[: k + 1]) for i, c in pairs for g in range(len(contexts[i]))
                            for k in range(len(c.layers))}
                    total += sum(len(ctx) + sum(len(t) - 1 for t in conts)
                                 for i, g, _ in runs for ctx, conts, _ in [contexts[i][g]])
                return total

            def score(per_round) -> None:
                for pairs in per_round:
                    pair_choice_logliks(lm, questions, pairs, "skip", batch_size=8)

            name = f"round, multiple choice ({args.round_dataset}, skip prefill): same shape"
            figures[name] = paired(arms, score, args.repeats,
                                   executed={arm: layer_tokens(per_round) for arm, per_round in arms.items()})
            print(json.dumps({name: figures[name]}), flush=True)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
