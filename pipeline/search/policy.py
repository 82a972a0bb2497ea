"""The per-sequence search policy over layer programs: proposals from scores, pure (no model, no files).

A budgeted local search warm-started from the enumerated configurations, with the per-layer moves of
Dr.LLM and CoLa (skip a layer, run a skipped one, repeat one, swap two neighbours). Chosen over their
MCTS because a budget of tens of evaluations per sequence is too small for a tree to leave its root, while
the run's enumerated rows (88 configurations already scored per sequence) give every sequence a good
start for free; the search spends its budget only on programs it has not seen.

Each sequence gets `budget` evaluations per arm in rounds of `width`. Evaluation slot j (config id
`search-j`, `random-j`) has a fixed cost `slot_costs(...)[j]`, the same for every sequence and both arms,
so a run's rows stay a dense (sequence x configuration) matrix with one cost per configuration, and the
null has exactly the search's cost distribution and budget.
- `search` arm: the parent of a slot of cost c is the best-scoring program the sequence has evaluated so
  far (enumerated and searched) among those within NEAR layers of c; the child is a random walk of moves
  from it to cost c (`mutate`), not yet evaluated.
- `random` arm (the null): the same moves from a parent drawn uniformly from the sequence's enumerated
  configurations within NEAR layers of c, blind to every score.
Random draws come from generators seeded by (seed, sequence, round, arm): deterministic for a seed.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np

ARMS = ("search", "random")
NEAR = 2  # a parent's cost may differ from its child's by this many layers (the moves bridge the gap)


@dataclass(frozen=True)
class SearchSpec:
    """budget: programs evaluated per sequence and arm; width: per round; cost_cap: the longest program
    (layers per token); seed: of every draw; metric: the score column the search maximises (None: the run's
    task's default, resolved by `pipeline.search.run.prepare_search`: rougeL, or prob_gold for multiple choice)."""

    budget: int = 16
    width: int = 4
    cost_cap: int = 30
    seed: int = 0
    metric: str | None = None

    def __post_init__(self) -> None:
        for key in ("budget", "width", "cost_cap"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"search {key} must be a positive integer, got {value!r}")
        if self.width > self.budget:
            raise ValueError(f"search width ({self.width}) must not exceed the budget ({self.budget})")

    @property
    def rounds(self) -> int:
        return -(-self.budget // self.width)

    def to_dict(self) -> dict:
        return asdict(self)


def slot_id(arm: str, slot: int) -> str:
    return f"{arm}-{slot:03d}"


def slot_costs(spec: SearchSpec) -> list[int]:
    """The cost of each evaluation slot: `budget` integers spread evenly over 1..cost_cap, in an order drawn
    from the seed so that every round spans cheap and dear programs."""
    spread = np.rint(np.linspace(1, spec.cost_cap, spec.budget)).astype(int) if spec.budget > 1 \
        else np.array([spec.cost_cap])
    order = np.random.default_rng([spec.seed, 7]).permutation(spec.budget)
    return [int(c) for c in spread[order]]


def rng_for(spec: SearchSpec, seq_id: str, round_index: int, arm: str) -> np.random.Generator:
    return np.random.default_rng([spec.seed, zlib.crc32(seq_id.encode()), round_index, ARMS.index(arm)])


def mutate(parent: tuple[int, ...], cost: int, num_layers: int, rng: np.random.Generator) -> tuple[int, ...]:
    """A child of `parent` of exactly `cost` layers: shrink by skipping a position, grow by running a layer
    the parent skips (at its place in depth order) or repeating a position, then one more move that keeps
    the cost (swap two neighbours, or skip one and run another) with probability 1/2. Layer 0 stays in."""
    program = list(parent)

    def skip() -> None:
        removable = [k for k, j in enumerate(program) if j != 0 or program.count(0) > 1]
        del program[int(rng.choice(removable))]

    def grow() -> None:
        missing = sorted(set(range(num_layers)) - set(program))
        if missing and rng.random() < 0.5:
            layer = int(rng.choice(missing))
            at = next((k for k, j in enumerate(program) if j > layer), len(program))
            program.insert(at, layer)
        else:
            k = int(rng.integers(len(program)))
            program.insert(k + 1, program[k])

    while len(program) > cost:
        skip()
    while len(program) < cost:
        grow()
    if rng.random() < 0.5:
        if len(program) > 1 and rng.random() < 0.5:
            k = int(rng.integers(len(program) - 1))
            program[k], program[k + 1] = program[k + 1], program[k]
        elif len(program) > 1:
            skip()
            grow()
    return tuple(program)


def _near(pool: list[tuple[tuple[int, ...], float]], cost: int) -> list[tuple[tuple[int, ...], float]]:
    """The pool's programs within NEAR layers of `cost` (or, when there are none, those of the nearest cost)."""
    gap = max(NEAR, min(abs(len(p) - cost) for p, _ in pool))
    return [(p, s) for p, s in pool if abs(len(p) - cost) <= gap]


def propose(spec: SearchSpec, arm: str, seq_id: str, round_index: int, costs: list[int], num_layers: int,
            enumerated: list[tuple[tuple[int, ...], float]], evaluated: list[tuple[tuple[int, ...], float]],
            tries: int = 32) -> list[tuple[int, ...]]:
    """The programs of one round of one sequence and arm, one per cost in `costs` (this round's slots).

    enumerated: (program, score) of the run's configurations for the sequence; evaluated: (program, score)
    the arm has evaluated for it so far (the random arm's scores are never read). A child already seen is
    drawn again, up to `tries` times. Raises ValueError when `enumerated` is empty.
    """
    if not enumerated:
        raise ValueError(f"sequence {seq_id}: no enumerated configurations to start the search from")
    rng = rng_for(spec, seq_id, round_index, arm)
    seen = {p for p, _ in enumerated} | {p for p, _ in evaluated}
    out = []
    for cost in costs:
        if arm == "search":
            near = _near(enumerated + evaluated, cost)
            parent = max(near, key=lambda item: item[1])[0]  # first of the best: deterministic on ties
        else:
            near = _near(enumerated, cost)
            parent = near[int(rng.integers(len(near)))][0]
        child = mutate(parent, cost, num_layers, rng)
        for _ in range(tries):
            if child not in seen:
                break
            child = mutate(parent, cost, num_layers, rng)
        seen.add(child)
        out.append(child)
    return out
