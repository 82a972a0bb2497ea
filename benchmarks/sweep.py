"""Benchmark: a full ULS sweep, the engine against the plain and the study's way, and the engine's batch size.

All three decode the same prompts under every ULS configuration with EOS ignored, batch size = the
number of prompts:
- engine: `pipeline.generation.engine.generate` (every configuration in one routed batch, shared full prefill);
- plain:  Hugging Face `generate` per configuration on a deep copy holding only the kept layers;
- study:  every layer computed per configuration, skipped layers' outputs masked (KV cache on).
It also measures the device's matmul throughput and copy bandwidth and reports the fraction of each
the engine's sweep reaches (its FLOPs and its minimal HBM traffic per decode step, counted below), and
with `--batch-scan` times the engine at several prompt counts (rows decoded together = prompts x
distinct layer sets) for its best operating point and, on a GPU, its memory per row. `--profile 32,512`
profiles one decode step at each prompt count (`benchmarks/step_profile.py`: time per kind of work, host
syncs); `--no-baselines` times the engine alone (gpu.sh's run of the previous engine).

    python benchmarks/sweep.py [--model embedded:...|random:opt-1.3b] [--device cpu|cuda] [--dtype auto]
                               [--prompts 64] [--new-tokens 64] [--baseline-configs 6] [--repeats 1]
                               [--batch-scan 8,16,32] [--profile 32,512] [--no-baselines] [--json figures.json]

Baselines take long on a CPU, so by default they run on an evenly spaced sample of the configurations
(whose mean cost matches the sweep's) and their time is scaled by the number of configurations.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline.generation.configs import build_configs
from pipeline.generation.engine import generate
from pipeline.generation.models import EMBEDDED_MODEL, LoadedModel, load_model
from pipeline.generation.reference import masked_generate, subset_generate
from prompts import alpaca_prompts  # noqa: E402 (this script's folder)
from step_profile import profile_batches, table as profile_table  # noqa: E402


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of `fn()`, with the device's queued work finished on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int, reps: int = 10) -> float:
    """Best-of FLOP/s of a square matmul: the device's practical peak for this dtype."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up (kernel choice, clocks)
    return 2 * size**3 / min(timed(lambda: torch.mm(a, b), device) for _ in range(reps))


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """Best-of bytes/s of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / min(timed(lambda: dst.copy_(src), device) for _ in range(reps))


def _layer_params(lm: LoadedModel) -> int:
    """Matmul weights of one decoder layer (its 2-D parameters)."""
    return sum(p.numel() for n, p in lm.model.named_parameters() if ".layers.0." in n and p.dim() == 2)


def _kv_width(lm: LoadedModel) -> tuple[int, int]:
    """(KV heads, head size): a token's keys (and values) per layer have their product of elements."""
    cfg = lm.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim


def sweep_flops(lm: LoadedModel, prompt_lens: list[int], costs: list[int], new_tokens: int) -> float:
    """Matmul FLOPs the engine must do: one full prefill, then per config and token its kept layers and the head."""
    cfg = lm.model.config
    layer_params = _layer_params(lm)
    head = cfg.hidden_size * cfg.vocab_size
    attn_width = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    width = max(prompt_lens)
    flops = 2 * len(prompt_lens) * width * (lm.num_layers * layer_params) + 2 * len(prompt_lens) * head
    for t in range(1, new_tokens):
        per_layer = 2 * layer_params + 4 * attn_width * (width + t)
        flops += len(prompt_lens) * sum(2 * head + c * per_layer for c in costs)
    return flops


def sweep_bytes(lm: LoadedModel, prompt_lens: list[int], layer_sets: list[tuple[int, ...]], new_tokens: int,
                kv_bytes: int) -> float:
    """Least memory traffic of the engine's decode steps, in bytes: per step every layer some row keeps and the
    LM head are read once for all rows; each layer's prompt KV once per prompt (one shared float32 copy under
    prefill `full`); each row's generated KV (`kv_bytes` per element) for each layer it keeps."""
    cfg = lm.model.config
    weight_bytes = lm.model.dtype.itemsize
    used = len(set().union(*layer_sets))
    heads, head_dim = _kv_width(lm)
    kv = 2 * heads * head_dim  # keys and values, elements per token per layer
    prompts, width = len(prompt_lens), max(prompt_lens)
    per_step_fixed = (used * _layer_params(lm) + cfg.hidden_size * cfg.vocab_size) * weight_bytes \
        + prompts * used * width * kv * 4
    kept = sum(len(s) for s in layer_sets)
    return sum(per_step_fixed + prompts * kept * t * kv * kv_bytes for t in range(1, new_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="a model name for load_model, e.g. random:opt-1.3b")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU/GPU has bfloat16 units, else float32")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--baseline-configs", type=int, default=6, help="0 = run the baselines on every config")
    parser.add_argument("--repeats", type=int, default=1, help="time the engine's sweep this often, keep the best")
    parser.add_argument("--batch-scan", default="", help="comma-separated prompt counts for the engine alone")
    parser.add_argument("--peak-size", type=int, default=0, help="matmul side for the peak; default 8192 on GPUs, 2048 on CPUs")
    parser.add_argument("--profile", default="", help="comma-separated prompt counts: profile one decode step at each")
    parser.add_argument("--profile-step", type=int, default=4, help="the decode step profiled (>= 2)")
    parser.add_argument("--no-baselines", action="store_true", help="time the engine only (no plain/study way)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    device = torch.device(args.device)
    lm = load_model(args.model, args.dtype, args.device)
    profile_counts = [int(n) for n in args.profile.split(",") if n]
    texts = alpaca_prompts(max([args.prompts, *profile_counts, *(int(n) for n in args.batch_scan.split(",") if n)]))
    encoded = [lm.tokenizer(t)["input_ids"] for t in texts]
    prompts = encoded[: args.prompts]
    configs = build_configs(lm.num_layers, ("uls",))
    layer_sets = list(dict.fromkeys(c.layers for c in configs))
    tokens = len(prompts) * len(configs) * args.new_tokens
    print(f"model {lm.name} L={lm.num_layers} {lm.dtype} on {device}; {len(prompts)} prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens), {len(configs)} ULS configs, "
          f"{args.new_tokens} new tokens each, torch threads {torch.get_num_threads()}")
    figures: dict = {"model": lm.name, "layers": lm.num_layers, "dtype": lm.dtype, "device": str(device),
                     "prompts": len(prompts), "configs": len(configs), "new_tokens": args.new_tokens}

    def engine(batch: list[list[int]]) -> None:
        generate(lm, batch, configs, args.new_tokens, ignore_eos=True, max_rows=len(batch) * len(layer_sets))

    timed(lambda: generate(lm, prompts[:4], configs[:3], 4, ignore_eos=True), device)  # warm-up
    engine_s = min(timed(lambda: engine(prompts), device) for _ in range(args.repeats))
    figures.update(engine_s=engine_s, engine_tok_s=tokens / engine_s)
    print(f"engine: {engine_s:.2f} s, {tokens / engine_s:,.0f} generated tokens/s")

    step = 1 if args.baseline_configs <= 0 else max(1, len(configs) // args.baseline_configs)
    sample = configs[step // 2 :: step]  # evenly spaced, centred: mean cost close to the sweep's
    ways = (("plain", lambda c: subset_generate(lm, prompts, c, args.new_tokens, ignore_eos=True)),
            ("study", lambda c: masked_generate(lm, prompts, c, args.new_tokens, ignore_eos=True)))
    for name, run in () if args.no_baselines else ways:
        run(sample[0])  # warm-up
        elapsed = sum(timed(lambda: run(cfg), device) for cfg in sample)
        sweep_s = elapsed * len(configs) / len(sample)
        figures.update({f"{name}_s": sweep_s, f"{name}_tok_s": tokens / sweep_s, f"vs_{name}": sweep_s / engine_s})
        print(f"{name}: {elapsed:.2f} s on {len(sample)} configs -> {sweep_s:.1f} s for the sweep "
              f"({tokens / sweep_s:,.0f} tokens/s); engine is {sweep_s / engine_s:.1f}x faster")

    lens = [len(p) for p in prompts]
    costs = [c.cost for c in configs]
    achieved = sweep_flops(lm, lens, costs, args.new_tokens) / engine_s
    peak = matmul_peak(lm.model.dtype, device, args.peak_size or (8192 if device.type == "cuda" else 2048))
    kv_bytes = 4 if device.type == "cpu" else lm.model.dtype.itemsize  # the engine's generated-KV dtype
    traffic = sweep_bytes(lm, lens, layer_sets, args.new_tokens, kv_bytes) / engine_s
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    figures.update(matmul_peak_flop_s=peak, engine_flop_s=achieved, matmul_fraction=achieved / peak,
                   copy_bytes_s=bandwidth, engine_bytes_s=traffic, bandwidth_fraction=traffic / bandwidth)
    print(f"matmul peak ({lm.model.dtype}): {peak / 1e12:.3f} TFLOP/s; engine sustains {achieved / 1e12:.3f} "
          f"TFLOP/s = {100 * achieved / peak:.1f}% of it")
    print(f"copy bandwidth: {bandwidth / 1e9:,.0f} GB/s; engine's least decode traffic {traffic / 1e9:,.1f} GB/s "
          f"= {100 * traffic / bandwidth:.1f}% of it")

    scan = []
    for count in (int(n) for n in args.batch_scan.split(",") if n):
        batch = encoded[:count]
        rows = count * len(layer_sets)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        try:
            seconds = timed(lambda: engine(batch), device)
        except torch.OutOfMemoryError:  # the scan has passed the device's memory: its last point is the limit
            print(f"scan: {count} prompts = {rows} rows: out of memory; scan stopped")
            break
        batch_lens = [len(b) for b in batch]
        point = {"prompts": count, "rows": rows, "tok_s": count * len(configs) * args.new_tokens / seconds,
                 "matmul_fraction": sweep_flops(lm, batch_lens, costs, args.new_tokens) / seconds / peak,
                 "bandwidth_fraction": sweep_bytes(lm, batch_lens, layer_sets, args.new_tokens, kv_bytes) / seconds
                 / bandwidth}
        if device.type == "cuda":
            point["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            point["bytes_per_row"] = (point["peak_bytes"] - before) / rows
        scan.append(point)
        memory = f", {point['bytes_per_row'] / 2**20:.2f} MiB per row" if "bytes_per_row" in point else ""
        print(f"scan: {count} prompts = {rows} rows: {point['tok_s']:,.0f} tokens/s{memory}, "
              f"{100 * point['matmul_fraction']:.1f}% of the matmul peak, "
              f"{100 * point['bandwidth_fraction']:.1f}% of the copy bandwidth")
    if scan:
        best = max(scan, key=lambda p: p["tok_s"])
        figures.update(scan=scan, best=best)
        print(f"best: {best['rows']} rows ({best['prompts']} prompts), {best['tok_s']:,.0f} tokens/s")
    if profile_counts:
        figures["profile"] = profile_batches(lm, encoded, profile_counts, args.profile_step)
        print(profile_table(figures["profile"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
