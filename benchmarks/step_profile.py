"""Where one decode step of the engine goes: `torch.profiler` over one step, time per kind of work, host syncs.

The engine decodes every ULS configuration of a prompt batch together (as `benchmarks/sweep.py` does);
one decode step (model forward, greedy pick, EOS check, routing of the next step) is recorded after a
few warm-up steps, and its time is split by kind:
- decoder-layer matmuls (projections and MLP; `mm`/`addmm`/`bmm`/`linear` inside a decoder layer),
- LM head (everything inside the output embedding),
- attention over the shared prompt and over the rows' own generated tokens (the two parts of the
  engine's shared-prompt attention; an engine without the split reports them as one, "both parts"),
- gathers and scatters (index_select/index_copy/index_put/gather/scatter/nonzero: row routing and the
  token bookkeeping), the greedy pick (`max`/`argmax` outside the model), element-wise (the rest:
  norms, activations, residuals, copies),
- idle: the step's wall time not covered by that work (host time: Python, dispatch, launches; on a
  GPU, the device waiting for the host).
On CUDA the time of a kind is its kernels' device time; on the CPU the ops' own (self) CPU time.
Host-device synchronisations per step: on CUDA counted by `torch.cuda.set_sync_debug_mode("warn")`;
on the CPU (which has no such mode) the ops that synchronise on CUDA are counted in the profile
(`aten::_local_scalar_dense`, behind `.item()`, `bool()` and `int()` of a tensor, and `aten::nonzero`).
Both are split into those inside the model's forward (the layer loop) and those between forwards.

    python benchmarks/step_profile.py [--model random:tiny-opt] [--device cpu] [--dtype auto]
                                      [--prompts 2,4] [--step 4] [--json profile.json]
"""

from __future__ import annotations

import argparse
import json
import warnings
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from pipeline.generation import engine
from pipeline.generation.configs import build_configs
from pipeline.generation.engine import generate
from pipeline.generation.models import LoadedModel, decoder_layers, load_model
from prompts import alpaca_prompts  # noqa: E402 (this script's folder)

KINDS = ("decoder-layer matmuls", "LM head", "attention: shared prompt", "attention: own tokens",
         "attention (both parts)",
         "gathers/scatters", "element-wise", "greedy pick", "idle (host, gaps)")
LABEL = "dynoracle::"  # prefix of the profiler ranges this module opens
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")
MATMULS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm", "dot")
GATHERS = ("index", "index_select", "index_copy", "index_copy_", "index_put", "index_put_", "_index_put_impl_",
           "gather", "scatter", "scatter_", "take", "masked_select", "nonzero", "index_add_", "index_add")
ATTENTION_PARTS = {"_prompt_attention": "attention: shared prompt", "_own_attention": "attention: own tokens"}


class _Ranges:
    """Named profiler ranges opened by module hooks, and whether the host is inside the model's forward."""

    def __init__(self) -> None:
        self.open: list[tuple[str, record_function]] = []

    def enter(self, name: str) -> None:
        scope = record_function(LABEL + name)
        scope.__enter__()
        self.open.append((name, scope))

    def leave(self) -> None:
        self.open.pop()[1].__exit__(None, None, None)

    @property
    def in_forward(self) -> bool:
        return bool(self.open)

    def hook(self, module: nn.Module, name: str) -> list:
        return [module.register_forward_pre_hook(lambda *_: self.enter(name)),
                module.register_forward_hook(lambda *_: self.leave())]


@contextmanager
def _labelled(lm: LoadedModel, ranges: _Ranges) -> Iterator[None]:
    """Label the model's parts for the profiler: decoder layers, their attention, the LM head, the engine's
    attention parts (patched methods of `_SharedPromptLayer`, whichever of them this engine has)."""
    handles = []
    for layer in decoder_layers(lm.model):
        handles += ranges.hook(layer, "layer")
        attention = getattr(layer, "self_attn", None)
        if attention is not None:
            handles += ranges.hook(attention, "self_attn")
    handles += ranges.hook(lm.model.get_output_embeddings(), "LM head")
    cls = engine._SharedPromptLayer
    parts = [name for name in ATTENTION_PARTS if hasattr(cls, name)] or ["attend"]
    originals = {name: getattr(cls, name) for name in parts}

    def labelled(name, method):
        def run(*args, **kwargs):
            with record_function(LABEL + ATTENTION_PARTS.get(name, "attention (both parts)")):
                return method(*args, **kwargs)
        return run

    for name, method in originals.items():
        setattr(cls, name, labelled(name, method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(cls, name, method)
        for handle in handles:
            handle.remove()


def _labels(event) -> list[str]:
    """The module's range names around a profiler event, innermost first."""
    names, parent = [], event.cpu_parent
    while parent is not None:
        if parent.name.startswith(LABEL):
            names.append(parent.name[len(LABEL):])
        parent = parent.cpu_parent
    return names


def kind_of(op: str, labels: list[str]) -> str:
    """The kind of work of aten op `op` (without its `aten::`) under the ranges `labels` (innermost first)."""
    for label in labels:
        if label.startswith("attention") or label == "LM head":
            return label
    if "self_attn" in labels:  # inside a layer's attention module, outside the engine's attention
        if "scaled_dot_product" in op:
            return "attention (both parts)"  # the `skip` prefill's per-row caches: SDPA over prompt and tokens
        if op in MATMULS:
            return "decoder-layer matmuls"  # q/k/v/out projections
    elif "layer" in labels and op in MATMULS:
        return "decoder-layer matmuls"
    if op in GATHERS:
        return "gathers/scatters"
    if op in ("max", "argmax", "topk") and "layer" not in labels:
        return "greedy pick"
    return "element-wise"


def profile_step(lm: LoadedModel, prompts: list[list[int]], step: int) -> dict:
    """Profile decode step `step` (>= 2) of the engine's ULS sweep over `prompts`; the step's figures.

    Returns {"prompts", "rows", "step", "wall_ms", "kinds": {kind: ms}, "syncs": {...}}; on CUDA the kinds
    are device time, on the CPU own CPU time, "idle" the rest of the step's wall time.
    """
    if step < 2:
        raise ValueError("profile a step after at least one warm-up decode step: step >= 2")
    configs = build_configs(lm.num_layers, ("uls",))
    layer_sets = len(dict.fromkeys(c.layers for c in configs))
    cuda = lm.device.type == "cuda"
    ranges, forwards, found = _Ranges(), [0], []
    warned: list[bool] = []

    def at_forward(*_):
        # Forward n (0 = the prompt's) starts profiler step n + 1: decode step `step` is profiler step step + 1,
        # from its forward to the next one (greedy pick, EOS check and the next step's routing included).
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize(lm.device)  # the step's wall time covers its kernels
        prof.step()
        forwards[0] += 1
        if cuda and forwards[0] == step + 1:
            torch.cuda.set_sync_debug_mode("warn")
        ranges.enter("forward")

    def show(message, category, *args, **kwargs):
        if "synchroniz" in str(message):
            warned.append(ranges.in_forward)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=step, warmup=1, active=1, repeat=1),
                   on_trace_ready=lambda p: found.append(p.events()))
    with ExitStack() as stack:
        stack.enter_context(_labelled(lm, ranges))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("always")
        warnings.showwarning = show
        handles = [lm.model.register_forward_pre_hook(at_forward),
                   lm.model.register_forward_hook(lambda *_: ranges.leave())]
        stack.callback(lambda: [h.remove() for h in handles])
        if cuda:
            stack.callback(torch.cuda.set_sync_debug_mode, 0)
        with prof:
            generate(lm, prompts, configs, step + 2, max_rows=len(prompts) * layer_sets)
    if not found:
        raise RuntimeError(f"the profiler recorded no step {step}")
    events = found[0]
    wall = next(e for e in events if e.name.startswith("ProfilerStep")).cpu_time_total
    kinds = dict.fromkeys(KINDS, 0.0)
    counted = {"in_forward": 0, "between_forwards": 0}
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        labels = _labels(event)
        kinds[kind_of(event.name[len("aten::"):], labels)] += event.self_device_time_total if cuda \
            else event.self_cpu_time_total
        if event.name in SYNC_OPS:
            counted["in_forward" if "forward" in labels else "between_forwards"] += 1
    kinds["idle (host, gaps)"] = max(0.0, wall - sum(kinds.values()))
    syncs = {"ops": counted, "ops_how": "profiled calls of " + ", ".join(SYNC_OPS)}
    if cuda:
        syncs["debug_mode"] = {"in_forward": sum(warned), "between_forwards": len(warned) - sum(warned)}
    return {"prompts": len(prompts), "rows": len(prompts) * layer_sets, "step": step, "wall_ms": wall / 1e3,
            "kinds": {k: v / 1e3 for k, v in kinds.items()}, "syncs": syncs}


def table(results: list[dict]) -> str:
    """One column per profiled batch: milliseconds and share of the step per kind, then the sync counts."""
    heads = [f"{r['prompts']} prompts = {r['rows']} rows" for r in results]
    rows = [("one decode step", [f"{r['wall_ms']:.2f} ms (step {r['step']})" for r in results])]
    for kind in KINDS:
        if any(r["kinds"][kind] for r in results):
            rows.append((kind, [f"{r['kinds'][kind]:.2f} ms {100 * r['kinds'][kind] / r['wall_ms']:4.1f}%"
                                for r in results]))
    rows.append(("sync ops in / between forwards",
                 [f"{r['syncs']['ops']['in_forward']} / {r['syncs']['ops']['between_forwards']}" for r in results]))
    if all("debug_mode" in r["syncs"] for r in results):
        rows.append(("CUDA syncs in / between forwards",
                     [f"{r['syncs']['debug_mode']['in_forward']} / {r['syncs']['debug_mode']['between_forwards']}"
                      for r in results]))
    width = max(len(label) for label, _ in rows)
    cell = max(len(str(v)) for _, values in rows for v in [*values, *heads])
    lines = [f"{'':<{width}}  " + "  ".join(f"{h:<{cell}}" for h in heads)]
    lines += [f"{label:<{width}}  " + "  ".join(f"{v:<{cell}}" for v in values) for label, values in rows]
    return "\n".join(lines)


def profile_batches(lm: LoadedModel, encoded: list[list[int]], counts: list[int], step: int) -> list[dict]:
    """`profile_step` at each prompt count (the first `count` prompts of `encoded`)."""
    return [profile_step(lm, encoded[:count], step) for count in counts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny-opt", help="a model name for load_model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", default="2,4", help="comma-separated prompt counts, one profiled step each")
    parser.add_argument("--step", type=int, default=4, help="the decode step profiled (>= 2; earlier ones warm up)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    lm = load_model(args.model, args.dtype, args.device)
    counts = [int(n) for n in args.prompts.split(",") if n]
    encoded = [lm.tokenizer(t)["input_ids"] for t in alpaca_prompts(max(counts))]
    print(f"model {lm.name} L={lm.num_layers} {lm.dtype} on {lm.device}; one decode step of the ULS sweep")
    results = profile_batches(lm, encoded, counts, args.step)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": lm.name, "dtype": lm.dtype, "device": str(lm.device), "steps": results}, f, indent=1)


if __name__ == "__main__":
    main()
