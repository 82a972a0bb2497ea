"""Benchmark: a full ULS sweep of the embedded model, the engine against the plain and the study's way.

All three decode the same prompts under every ULS configuration with EOS ignored, batch size = the
number of prompts:
- engine: `pipeline.engine.generate` (every configuration in one routed batch, shared full prefill);
- plain:  Hugging Face `generate` per configuration on a deep copy holding only the kept layers;
- study:  every layer computed per configuration, skipped layers' outputs masked (KV cache on).
It also measures this machine's bfloat16 matmul peak and reports the fraction the engine reaches.

    python benchmarks/sweep.py [--prompts 64] [--new-tokens 64] [--baseline-configs 6]

Baselines take long on a CPU, so by default they run on an evenly spaced sample of the configurations
(whose mean cost matches the sweep's) and their time is scaled by the number of configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from pipeline.configs import build_configs
from pipeline.engine import generate
from pipeline.models import load_model
from pipeline.reference import masked_generate, subset_generate

ALPACA = "alpaca/alpaca_sample.jsonl"
TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompts(count: int) -> list[str]:
    data_dir = Path(os.environ.get("DYNORACLE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    rows = [json.loads(line) for line in (data_dir / ALPACA).read_text().splitlines()]
    rows = [r for r in rows if not r["input"]][:count]
    return [TEMPLATE.format(**r) for r in rows]


def matmul_peak(dtype: torch.dtype, size: int = 2048, reps: int = 10) -> float:
    """Best-of FLOP/s of a square matmul: the machine's practical peak for this dtype."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def sweep_flops(lm, prompt_lens: list[int], costs: list[int], new_tokens: int) -> float:
    """Matmul FLOPs the engine must do: one full prefill, then per config and token its kept layers and the head."""
    cfg = lm.model.config
    layer_params = sum(p.numel() for n, p in lm.model.named_parameters() if ".layers.0." in n and p.dim() == 2)
    head = cfg.hidden_size * cfg.vocab_size
    attn_width = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    width = max(prompt_lens)
    flops = 2 * len(prompt_lens) * width * (lm.num_layers * layer_params) + 2 * len(prompt_lens) * head
    for t in range(1, new_tokens):
        per_layer = 2 * layer_params + 4 * attn_width * (width + t)
        flops += len(prompt_lens) * sum(2 * head + c * per_layer for c in costs)
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--baseline-configs", type=int, default=6, help="0 = run the baselines on every config")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU/GPU has bfloat16 units, else float32")
    args = parser.parse_args()

    lm = load_model(dtype=args.dtype)
    args.dtype = lm.dtype
    texts = alpaca_prompts(args.prompts)
    prompts = [lm.tokenizer(t)["input_ids"] for t in texts]
    configs = build_configs(lm.num_layers, ("uls",))
    tokens = len(prompts) * len(configs) * args.new_tokens
    print(f"model {lm.name} L={lm.num_layers} {args.dtype}; {len(prompts)} prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens), {len(configs)} ULS configs, "
          f"{args.new_tokens} new tokens each, torch threads {torch.get_num_threads()}")

    generate(lm, prompts[:4], configs[:3], 4, ignore_eos=True)  # warm-up
    start = time.perf_counter()
    generate(lm, prompts, configs, args.new_tokens, ignore_eos=True)
    engine_s = time.perf_counter() - start
    print(f"engine: {engine_s:.1f} s, {tokens / engine_s:,.0f} generated tokens/s")

    step = 1 if args.baseline_configs <= 0 else max(1, len(configs) // args.baseline_configs)
    sample = configs[step // 2 :: step]  # evenly spaced, centred: mean cost close to the sweep's
    timings = {}
    for name, run in (("plain", lambda c: subset_generate(lm, prompts, c, args.new_tokens, ignore_eos=True)),
                      ("study", lambda c: masked_generate(lm, prompts, c, args.new_tokens, ignore_eos=True))):
        start = time.perf_counter()
        for cfg in sample:
            run(cfg)
        elapsed = time.perf_counter() - start
        timings[name] = elapsed * len(configs) / len(sample)
        print(f"{name}: {elapsed:.1f} s on {len(sample)} configs -> {timings[name]:.1f} s for the sweep "
              f"({tokens / timings[name]:,.0f} tokens/s); engine is {timings[name] / engine_s:.1f}x faster")

    achieved = sweep_flops(lm, [len(p) for p in prompts], [c.cost for c in configs], args.new_tokens) / engine_s
    for dtype in dict.fromkeys((lm.model.dtype, torch.bfloat16)):
        peak = matmul_peak(dtype)
        print(f"matmul peak ({dtype}, 2048^3): {peak / 1e12:.3f} TFLOP/s; engine sustains "
              f"{achieved / 1e12:.3f} TFLOP/s = {100 * achieved / peak:.1f}% of it")


if __name__ == "__main__":
    main()
