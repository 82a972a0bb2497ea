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

# Model types whose tiny random models the engine matches the identity-layer reference on, under both prefills.
CHECKED = ("biogpt", "codegen", "cohere", "gemma", "gemma3_text", "glm", "gpt2", "gpt_neox", "gptj", "granite",
           "llama", "mistral", "mixtral", "olmo", "olmo2", "opt", "persimmon", "phi", "phi3", "qwen2", "qwen2_moe",
           "qwen3", "qwen3_moe", "smollm3", "starcoder2")
_ALIBI = ("its decoder layers take ALiBi biases and return tuples (the older layer interface), which the engine's "
          "per-row routing cannot slice; use a rotary-position model (llama, mistral, qwen2, gpt_neox, ...)")
_RECURRENT = ("its layers carry a recurrent state instead of a KV cache, so a skipped layer cannot be routed per row; "
              "use a transformer decoder (llama, mistral, qwen2, gpt_neox, ...)")
# model_type -> why it is refused under every prefill, and what works instead
REFUSED = {"bloom": _ALIBI, "falcon": _ALIBI, "mpt": _ALIBI, "falcon_mamba": _RECURRENT, "jamba": _RECURRENT,
           "mamba": _RECURRENT, "recurrent_gemma": _RECURRENT, "rwkv": _RECURRENT}
# model_type -> why prefill `full` (the shared prompt pass) is refused; prefill `skip` matches the reference
FULL_PREFILL_REFUSED = {
    "gemma2": "its attention softcaps the logits, which the shared-prompt attention does not",
    "stablelm": "its attention does not hand the cache to Hugging Face's attention interface",
    "xglm": "its attention does not go through Hugging Face's attention interface",
}


def supported_markdown() -> str:
    """The README's list of architectures, made from the tables above (tests check the README holds it)."""
    skip_only = ", ".join(f"`{t}`" for t in sorted(FULL_PREFILL_REFUSED))
    refused = ", ".join(f"`{t}`" for t in sorted(REFUSED))
    return "\n".join([
        f"- checked under both prefill policies: {', '.join(f'`{t}`' for t in CHECKED)};",
        f"- checked under `prefill = \"skip\"`, refused under `full`: {skip_only};",
        f"- refused up front: {refused}.",
    ])


def architecture_problem(config: PretrainedConfig, prefill: str) -> str | None:
    """Why the engine cannot run a model of this config under `prefill`, as one line; None when it can."""
    model_type = config.get_text_config().model_type
    if model_type in REFUSED:
        return f"architecture {model_type} is not supported: {REFUSED[model_type]}"
    if prefill == "full" and model_type in FULL_PREFILL_REFUSED:
        return f"architecture {model_type} cannot share its prompt pass: {FULL_PREFILL_REFUSED[model_type]}; use prefill = \"skip\""
    return None
