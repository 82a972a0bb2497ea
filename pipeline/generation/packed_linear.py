"""Small-batch linear maps of the decoder layers through oneDNN with weights packed once, for bfloat16 on CPUs.

On this project's CPUs `torch.nn.functional.linear` in bfloat16 costs about as much for 1 row as for 16
(about 100 us for SmolLM2's 576x1536 weight), so a decode step's layer calls on few rows (a program's
repeat, the last rows of a batch) are mostly that fixed cost. oneDNN's linear with the weight reordered once
into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise`, the pair
inductor's CPU freezing pass uses) costs about 65 us there.

It must not change a result, and it does not always agree with `nn.Linear` bit for bit: with 2 threads,
576x576 at 352-544 rows and 576x1536 at 1,568-1,920 rows differed in a few elements by one bfloat16 unit,
as did non-contiguous inputs with a bias. So the packed kernel serves only calls of at most `MAX_ROWS` rows
on contiguous input (where the fixed cost is what matters), and only for a (weight shape, bias, thread
count) it has been checked on in this process: at first use it is compared with `nn.Linear` at every row
count 1..MAX_ROWS on random inputs, and a shape that differs once keeps `nn.Linear`. Everything else
(more rows, gradients, float32, other devices) keeps `nn.Linear`. The engine's routed passes
(`engine.wrapped_layers`) run under `packed_linears`.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterable, Iterator

import torch
from torch import nn

MAX_ROWS = 64  # packed calls have at most this many rows (the fixed-cost regime; checked exhaustively)
_AGREES: dict[tuple[int, int, bool, int], bool] = {}  # (in, out, bias, threads) -> packed == nn.Linear on 1..MAX_ROWS


def supported() -> bool:
    """Whether this PyTorch build and CPU run oneDNN's bfloat16 linear (else `packed_linears` changes nothing)."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight") and bool(mkldnn._is_mkldnn_bf16_supported()))


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _agrees(module: nn.Linear, weight: torch.Tensor) -> bool:
    """Whether the packed kernel equals `nn.Linear` bit for bit on this module's shape at every row count
    1..MAX_ROWS (random bfloat16 inputs, this module's weight and bias), checked once per process and thread count."""
    key = (module.in_features, module.out_features, module.bias is not None, torch.get_num_threads())
    if key not in _AGREES:
        generator = torch.Generator().manual_seed(0)
        agrees = True
        for rows in range(1, MAX_ROWS + 1):
            x = torch.randn(rows, module.in_features, generator=generator).to(torch.bfloat16)
            if not torch.equal(_pointwise(x, weight, module.bias), nn.Linear.forward(module, x)):
                agrees = False
                break
        _AGREES[key] = agrees
    return _AGREES[key]


def _packed_forward(module: nn.Linear, packed: dict[nn.Linear, torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // max(1, x.shape[-1])
    if (torch.is_grad_enabled() or x.dtype != torch.bfloat16 or not 0 < rows <= MAX_ROWS
            or not x.is_contiguous()):
        return nn.Linear.forward(module, x)
    if module not in packed:  # packed on first use: a layer the block never runs costs nothing
        weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
        packed[module] = weight if _agrees(module, weight) else None
    weight = packed[module]
    if weight is None:
        return nn.Linear.forward(module, x)
    return _pointwise(x.view(rows, x.shape[-1]), weight, module.bias).view(*x.shape[:-1], module.out_features)


@contextmanager
def packed_linears(layers: Iterable[nn.Module]) -> Iterator[int]:
    """Within the block, every plain `nn.Linear` of `layers` (a model's decoder layers) with a bfloat16 weight
    on the CPU runs the packed kernel on calls it serves (see the module's docstring); yields how many linears
    are patched (0 on other devices, dtypes or builds). Modules stay in place (hooks, state dicts and names
    are untouched): their `forward` is shadowed by an instance attribute, removed on exit with the packed
    weights (a copy of each weight used, packed in about 0.13 s for SmolLM2-135M's 210 linears)."""
    patched: list[nn.Linear] = []
    packed: dict[nn.Linear, torch.Tensor | None] = {}
    try:
        if supported():
            for layer in layers:
                for module in layer.modules():
                    if (type(module) is nn.Linear and module.weight.dtype == torch.bfloat16
                            and module.weight.device.type == "cpu" and "forward" not in module.__dict__):
                        module.forward = partial(_packed_forward, module, packed)
                        patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
