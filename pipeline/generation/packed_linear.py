"""Decoder layers' linear maps through oneDNN with their weights packed once, for bfloat16 inference on CPUs.

On this project's CPUs `torch.nn.functional.linear` in bfloat16 costs about as much for 1 row as for 16
(about 100 us for SmolLM2's 576x1536 weight, whatever the rows up to 16), so a decode step's layer calls
on few rows (a program's repeat, the last rows of a batch) are mostly that fixed cost. oneDNN's linear with
the weight reordered once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight` and
`_linear_pointwise`, the pair inductor's CPU freezing pass uses) costs about 65 us there and returns the
same numbers, bit for bit (tests/test_packed_linear.py checks it on the machine it runs on). The engine's
routed passes (`engine.wrapped_layers`) run under `packed_linears`; anything else, including training
(gradients enabled) and float32, keeps `nn.Linear.forward`.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterable, Iterator

import torch
from torch import nn


def supported() -> bool:
    """Whether this PyTorch build and CPU run oneDNN's bfloat16 linear (else `packed_linears` changes nothing)."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight") and bool(mkldnn._is_mkldnn_bf16_supported()))


def _packed_forward(module: nn.Linear, packed: dict[nn.Linear, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() or x.dtype != torch.bfloat16 or x.numel() == 0:
        return nn.Linear.forward(module, x)
    weight = packed.get(module)
    if weight is None:  # packed on first use: a layer the block never runs costs nothing
        weight = packed[module] = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, module.bias, "none", [], "")
    return out.view(*x.shape[:-1], module.out_features)


@contextmanager
def packed_linears(layers: Iterable[nn.Module]) -> Iterator[int]:
    """Within the block, every plain `nn.Linear` of `layers` (a model's decoder layers) with a bfloat16 weight
    on the CPU runs the packed kernel when called without gradients on bfloat16 input; yields how many linears
    that is (0 on other devices, dtypes or builds). Modules stay in place (hooks, state dicts and names are
    untouched): their `forward` is shadowed by an instance attribute, removed on exit with the packed weights
    (a copy of each weight run, about 0.13 s to pack for SmolLM2-135M's 210 linears: a block per engine call)."""
    patched, packed = [], {}
    if supported():
        for layer in layers:
            for module in layer.modules():
                if (type(module) is nn.Linear and module.weight.dtype == torch.bfloat16
                        and module.weight.device.type == "cpu" and "forward" not in module.__dict__):
                    module.forward = partial(_packed_forward, module, packed)
                    patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
