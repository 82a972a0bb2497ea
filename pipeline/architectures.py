"""Which Hugging Face causal-LM architectures the engine runs, and why the others are refused up front.

The engine needs a stack of decoder layers that each take and return the hidden states of a batch of
rows, a KV cache of `transformers.cache_utils.Cache` layers, and (for prefill `full`) attention that goes
through Hugging Face's attention interface. `REFUSED` names the model types known to lack one of these,
each with the reason and what works instead; tests/test_architectures.py checks every entry of
`CHECKED` against the identity-layer reference under both prefill policies and every refusal, and the
README's list is checked against both tables.
"""

from __future__ import annotations

from transformers import PretrainedConfig

# model_type -> (prefill policies the engine matches the reference under)
CHECKED: dict[str, tuple[str, ...]] = {}
# model_type -> why it is refused and what works instead (for every prefill policy)
REFUSED: dict[str, str] = {}
# model_type -> why prefill `full` is refused (prefill `skip` works)
FULL_PREFILL_REFUSED: dict[str, str] = {}


def architecture_problem(config: PretrainedConfig, prefill: str) -> str | None:
    """Why the engine cannot run a model of this config under `prefill`, as one line; None when it can."""
    model_type = config.get_text_config().model_type
    if model_type in REFUSED:
        return f"architecture {model_type} is not supported: {REFUSED[model_type]}"
    if prefill == "full" and model_type in FULL_PREFILL_REFUSED:
        return f"architecture {model_type} cannot share its prompt pass: {FULL_PREFILL_REFUSED[model_type]}; use prefill = \"skip\""
    return None
