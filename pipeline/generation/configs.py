"""Skip configurations and layer programs: which layers a configuration executes, in which order.

A configuration's `layers` is its **program**: the ordered list of decoder layers a token runs through. A
layer may be skipped (absent), repeated (listed again) or taken out of order, e.g. (0, 1, 2, 2, 3, 5, 4, 6).
The built-in families (ULS, EE, RLS, exactly as DESIGN.md defines them) and increasing custom lists are
the programs that are increasing (subsets); `loop` programs repeat one block (CoLa, "Skip a Layer or Loop
It?", 2025). Cost is the program's length: layers executed per token, so a repeat costs what it runs.
This module is the one home of that rule (`check_program`). Pure functions over the model depth L;
nothing here touches a model. Layer indices are 0-based.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

FAMILIES = ("uls", "ee", "rls")
LOOP = "loop"  # programs that repeat one block a..b k times; parameters in the job's [loop] table
PROGRAM_FAMILIES = (*FAMILIES, LOOP)  # families a job may name (`loop` only with its [loop] table)
FULL_ID = "full"
CUSTOM = "custom"  # a layer program a job names itself (DESIGN.md, Definitions)
SAMPLE = "sample"  # K sampled outputs of the full model per sequence: the noise ceiling, not an oracle choice
SEARCH_FAMILIES = ("search", "random")  # rows of `dynoracle search`: searched programs and the random null
KNOWN_FAMILIES = (*FAMILIES, LOOP, CUSTOM, *SEARCH_FAMILIES)
_BUILT_ID = re.compile(r"^(full|uls-\d+|ee-\d+|rls-\d+-s\d+|sample-\d+|loop-\d+-\d+-x\d+|(search|random)-\d+)$")
MAX_LAYERS = 1024  # deeper than any released decoder (the deepest have ~130 layers); L^2 layer lists beyond


@dataclass(frozen=True)
class SkipConfig:
    """One configuration: an id, its family, the nominal budget c and its program (executed layers in order)."""

    config_id: str
    family: str
    budget: int
    layers: tuple[int, ...]

    @property
    def cost(self) -> int:
        return len(self.layers)

    @property
    def is_subset(self) -> bool:
        """True when the program is increasing: a plain layer subset, as every built-in family but `loop`."""
        return is_subset(self.layers)

    def to_dict(self) -> dict:
        return {
            "config_id": self.config_id,
            "family": self.family,
            "budget": self.budget,
            "layers": list(self.layers),
            "cost": self.cost,
        }


def _check_budget(num_layers: int, budget: int) -> None:
    if num_layers < 1:
        raise ValueError(f"a model needs at least one layer, got L={num_layers}")
    if not 1 <= budget <= num_layers:
        raise ValueError(f"budget c={budget} is outside 1..{num_layers}")


def uls_layers(num_layers: int, budget: int) -> tuple[int, ...]:
    """Uniform layer skipping: spread c executed layers evenly, or c skipped ones when c > L/2."""
    _check_budget(num_layers, budget)
    L, c = num_layers, budget
    if 2 * c <= L:
        return tuple(sorted({(k * L) // c for k in range(c)}))
    skipped = {1 + (k * L) // (L - c) for k in range(L - c)}
    return tuple(i for i in range(L) if i not in skipped)


def ee_layers(num_layers: int, budget: int) -> tuple[int, ...]:
    """Early exit at c: layers 0..c-1, then straight to the final norm and LM head."""
    _check_budget(num_layers, budget)
    return tuple(range(budget))


def rls_layers(num_layers: int, budget: int, seed: int) -> tuple[int, ...]:
    """Random layer skipping: layer 0 plus c-1 distinct layers of 1..L-1, drawn from a generator seeded by (c, s)."""
    _check_budget(num_layers, budget)
    rng = np.random.default_rng([budget, seed])
    drawn = rng.choice(np.arange(1, num_layers), size=budget - 1, replace=False)
    return tuple(sorted([0, *(int(i) for i in drawn)]))


def full_config(num_layers: int) -> SkipConfig:
    return SkipConfig(FULL_ID, FULL_ID, num_layers, tuple(range(num_layers)))


def build_configs(
    num_layers: int,
    families: tuple[str, ...] | list[str] = FAMILIES,
    rls_seeds: tuple[int, ...] | list[int] = (0,),
) -> list[SkipConfig]:
    """Every configuration of the chosen families, `full` first.

    Raises ValueError for L outside 1..MAX_LAYERS (the work and the output grow as L squared) or an unknown
    family. Each family covers budgets 1..L-1; budget L of any family is the full model, listed once as `full`
    (so a family together with `full` has L configurations).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= MAX_LAYERS:
        raise ValueError(f"a model has 1 to {MAX_LAYERS} decoder layers, got L={num_layers!r}")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    configs = [full_config(num_layers)]
    for c in range(1, num_layers):
        if "uls" in families:
            configs.append(SkipConfig(f"uls-{c}", "uls", c, uls_layers(num_layers, c)))
        if "ee" in families:
            configs.append(SkipConfig(f"ee-{c}", "ee", c, ee_layers(num_layers, c)))
        if "rls" in families:
            for s in rls_seeds:
                configs.append(SkipConfig(f"rls-{c}-s{s}", "rls", c, rls_layers(num_layers, c, s)))
    order = {f: i for i, f in enumerate((FULL_ID, *FAMILIES))}
    return sorted(configs, key=lambda cfg: (order[cfg.family], cfg.budget, cfg.config_id))


def configs_by_id(configs: list[SkipConfig]) -> dict[str, SkipConfig]:
    return {cfg.config_id: cfg for cfg in configs}


def config_for_id(num_layers: int, config_id: str) -> SkipConfig:
    """The built-in configuration named `config_id` (`full`, `uls-c`, `ee-c`, `rls-c-sS`) of an L-layer model.

    Raises ValueError for an id of no family or a budget outside 1..L-1.
    """
    match = re.fullmatch(r"(uls|ee)-(\d+)|rls-(\d+)-s(\d+)|full", config_id)
    if match is None:
        raise ValueError(f"unknown config id {config_id!r}; expected full, uls-C, ee-C or rls-C-sS")
    if config_id == FULL_ID:
        return full_config(num_layers)
    family, budget, rls_budget, seed = match.groups()
    budget = int(budget or rls_budget)
    if not 1 <= budget < num_layers:
        raise ValueError(f"{config_id}: budget {budget} is outside 1..{num_layers - 1} for a {num_layers}-layer model")
    if seed is not None:
        return SkipConfig(config_id, "rls", budget, rls_layers(num_layers, budget, int(seed)))
    layers = uls_layers(num_layers, budget) if family == "uls" else ee_layers(num_layers, budget)
    return SkipConfig(config_id, family, budget, layers)


def is_subset(program: tuple[int, ...] | list[int]) -> bool:
    """True when a program is strictly increasing (no repeat, no reordering): a layer subset."""
    return all(a < b for a, b in zip(program, program[1:]))


def check_program(name: object, layers: object, num_layers: int | None = None) -> tuple[int, ...]:
    """Validate one program (the rule of this module): a non-empty list of integers in 0..L-1 that includes
    layer 0 (DESIGN.md: layer 0 always runs); repeats and any order allowed. `num_layers` None checks all
    but the range. Returns the program as a tuple, in order; raises ValueError (one line naming `name`)."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"configuration {name}: layers must be a non-empty list of layer indices")
    if any(not isinstance(j, int) or isinstance(j, bool) or j < 0 for j in layers):
        raise ValueError(f"configuration {name}: layers must be non-negative integers, got {list(layers)}")
    if 0 not in layers:
        raise ValueError(f"configuration {name}: layer 0 is always executed and must be listed")
    if num_layers is not None and max(layers) >= num_layers:
        raise ValueError(f"configuration {name}: layer {max(layers)} is out of range for a "
                         f"{num_layers}-layer model (0..{num_layers - 1})")
    return tuple(layers)


def check_custom_layers(name: object, layers: object) -> tuple[int, ...]:
    """Validate a custom program without knowing the model: a free name (not a built-in id, no '/') and a
    program (`check_program`). Returns the program in order; raises ValueError (one line)."""
    if not isinstance(name, str) or not name or "/" in name or _BUILT_ID.match(name):
        raise ValueError(f"custom configuration name {name!r} must be non-empty, without '/', and not a built-in "
                         "id (full, uls-C, ee-C, rls-C-sS, loop-A-B-xK, search-N, random-N)")
    return check_program(f"custom {name}", layers)


def custom_configs(sets: dict[str, list[int]], num_layers: int) -> list[SkipConfig]:
    """Family `custom` configurations of an L-layer model from a job's `[configs]` table (name -> program).

    Budget and cost are the program's length. Raises ValueError naming the first bad program.
    """
    configs = []
    for name, layers in sets.items():
        check_custom_layers(name, layers)
        program = check_program(f"custom {name}", layers, num_layers)
        configs.append(SkipConfig(name, CUSTOM, len(program), program))
    return configs


def loop_program(num_layers: int, start: int, end: int, repeats: int) -> tuple[int, ...]:
    """CoLa's loop: layers 0..end, then the block start..end again until it has run `repeats` times, then
    end+1..L-1. Needs 1 <= start <= end <= L-1 and repeats >= 2; raises ValueError otherwise."""
    if not 1 <= start <= end < num_layers or repeats < 2:
        raise ValueError(f"loop block {start}..{end} x{repeats} needs 1 <= start <= end <= {num_layers - 1} and "
                         "repeats >= 2")
    block = list(range(start, end + 1))
    return (*range(end + 1), *block * (repeats - 1), *range(end + 1, num_layers))


def check_loop_grid(grid: dict[str, list[int]]) -> None:
    """Check a job's `[loop]` table without the model: keys `starts`, `lengths`, `repeats`, each a non-empty
    list of positive integers (repeats >= 2). Raises ValueError (one line)."""
    keys = ("starts", "lengths", "repeats")
    unknown = sorted(set(grid) - set(keys))
    if unknown:
        raise ValueError(f"[loop] has unknown key {unknown[0]}; expected {', '.join(keys)}")
    for key in keys:
        values = grid.get(key)
        least = 2 if key == "repeats" else 1
        if not isinstance(values, list) or not values or any(not isinstance(v, int) or isinstance(v, bool)
                                                             or v < least for v in values):
            raise ValueError(f"[loop] {key} must be a non-empty list of integers >= {least}, got {values!r}")


def loop_configs(num_layers: int, grid: dict[str, list[int]]) -> list[SkipConfig]:
    """Family `loop` of a job's `[loop]` table (`starts`, `lengths`, `repeats`: lists of integers): one program
    per (a, n, k) whose block a..a+n-1 fits the model, id `loop-a-b-xk` (b = a+n-1), cost L + (k-1)n.

    Raises ValueError (one line) for a missing or malformed key or a grid with no block that fits."""
    check_loop_grid(grid)
    configs = []
    for a in sorted(set(grid["starts"])):
        for n in sorted(set(grid["lengths"])):
            for k in sorted(set(grid["repeats"])):
                if a + n - 1 < num_layers:
                    program = loop_program(num_layers, a, a + n - 1, k)
                    configs.append(SkipConfig(f"loop-{a}-{a + n - 1}-x{k}", LOOP, len(program), program))
    if not configs:
        raise ValueError(f"[loop] gives no block that fits a {num_layers}-layer model (needs 1 <= start, "
                         f"start + length - 1 <= {num_layers - 1}, repeats >= 2)")
    return configs


def sample_configs(num_layers: int, samples: int) -> list[SkipConfig]:
    """Family `sample`: `sample-0` .. `sample-{K-1}`, each the full model (all L layers, cost L), decoded by
    sampling with the job's `[sampling]` settings and a seed per (sequence, configuration)
    (`pipeline.generation.sampling`). They are rows of the run like any configuration; the oracle leaves
    them out and `reduce` reads them as the full model's best-of-K noise ceiling."""
    return [SkipConfig(f"{SAMPLE}-{k}", SAMPLE, num_layers, tuple(range(num_layers))) for k in range(samples)]
