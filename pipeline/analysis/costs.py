"""The cost that is really paid per sequence: the prompt pass and every generated token, in layer-token units.

A configuration's nominal cost is its executed layers per generated token after the first. Under the
`full` prefill (the study's) the prompt runs through all L layers for every configuration, and that pass
yields the first generated token; each later token runs through the configuration's c layers. So a
sequence of P prompt tokens that generates g tokens costs

    full prefill:  P * L + (g - 1) * c        skip prefill:  P * c + (g - 1) * c

layer-token units (one layer applied to one token position). The last generated token is never fed back,
so g tokens take g - 1 decode steps. Pure numpy.
"""

from __future__ import annotations

import numpy as np

from pipeline.generation.engine import PREFILL_POLICIES


def total_cost(prompt_tokens: np.ndarray, gen_tokens: np.ndarray, cost: np.ndarray, num_layers: int,
               prefill: str = "full") -> np.ndarray:
    """Layer-token cost of each row (broadcast over the arguments): prompt pass + decode steps, see above.

    prompt_tokens, gen_tokens (>= 1), cost: executed layers of the row's configuration; num_layers: L.
    """
    if prefill not in PREFILL_POLICIES:
        raise ValueError(f"unknown prefill policy {prefill!r}; choose from {', '.join(PREFILL_POLICIES)}")
    prompt = np.asarray(prompt_tokens, dtype=np.float64)
    steps = np.maximum(np.asarray(gen_tokens, dtype=np.float64) - 1.0, 0.0)
    cost = np.asarray(cost, dtype=np.float64)
    return prompt * (num_layers if prefill == "full" else cost) + steps * cost
