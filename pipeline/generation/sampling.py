"""Sampling the next token: temperature and top-p (nucleus), one seeded generator per row.

The engine calls `pick_tokens` at the one place it chooses a row's next token; without a `RowSampler` that
is the greedy argmax (the default, and what temperature 0 means). A sampled row draws one uniform number per
generated token from its own generator (numpy's PCG64 seeded with the row's seed) and takes the token where
that number falls in the cumulative distribution of the top-p tokens, sorted by decreasing probability (ties
by token id). A row's draws therefore depend only on its seed and its own logits, never on which other rows
share its batch or when they finish (`tests/test_sampling.py`).

`Sampling` is the job's `[sampling]` table: K samples of the full model per sequence (family `sample`,
configurations `sample-0` .. `sample-{K-1}`, cost L; see `pipeline.generation.configs.sample_configs`),
the temperature, top-p and the seed every row's seed is derived from (`row_seed`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Sampling:
    """A job's sampling settings. samples = 0 (the default): no `sample` family, greedy decoding only."""

    samples: int = 0  # K sampled outputs of the full model per sequence
    temperature: float = 1.0  # logits / T before the softmax; 0 is greedy
    top_p: float = 1.0  # keep the fewest most probable tokens whose mass reaches top_p (always the first)
    seed: int = 0  # every row's seed is derived from it, the sequence and the configuration (`row_seed`)

    def __post_init__(self) -> None:
        for name in ("samples", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"sampling.{name} must be a non-negative integer, got {value!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                raise ValueError(f"sampling.{name} must be a number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


def row_seed(seed: int, seq_id: str, config_id: str) -> int:
    """The seed of one (sequence, configuration) row: a 63-bit hash of the job's seed and the two ids.

    Stable across processes, machines and batch layouts (blake2b, not Python's salted `hash`).
    """
    digest = hashlib.blake2b(f"{seed}\x00{seq_id}\x00{config_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RowSampler:
    """Temperature / top-p sampling for the rows of one engine batch, each row with its own generator.

    seeds: one per row, in the batch's original row order (row r is drawn from `default_rng(seeds[r])`).
    """

    def __init__(self, temperature: float, top_p: float, seeds: list[int]):
        if temperature <= 0:
            raise ValueError("a RowSampler samples; temperature 0 is greedy (pass no sampler)")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.generators = [np.random.default_rng(s) for s in seeds]

    def pick(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """logits (R, V) of the live rows, rows (R,) their original row numbers -> (R,) sampled token ids.

        Only the most probable tokens are sorted: the top k (k = 64, x4 until every row's top-k mass reaches
        top_p), which hold every row's kept set; ties are ordered by token id, as a stable sort of the whole
        vocabulary would. With top_p = 1 the whole vocabulary is kept and nothing is sorted: the draw walks the
        distribution in token-id order.
        """
        uniforms = torch.tensor([self.generators[r].random() for r in rows.tolist()], dtype=torch.float64,
                                device=logits.device)[:, None]
        scaled = logits.double() / self.temperature
        if self.top_p >= 1.0:
            cumulative = torch.softmax(scaled, dim=-1).cumsum(-1)
            at = torch.searchsorted(cumulative, uniforms * cumulative[:, -1:], right=True)
            return at.clamp_(max=scaled.shape[-1] - 1).squeeze(-1)
        log_total = torch.logsumexp(scaled, dim=-1, keepdim=True)
        k = min(64, scaled.shape[-1])
        while True:
            top, ids = scaled.topk(k, dim=-1)
            probs = torch.exp(top - log_total)
            if k == scaled.shape[-1] or bool((probs.sum(-1) >= self.top_p).all()):
                break
            k = min(4 * k, scaled.shape[-1])
        by_id = ids.argsort(dim=-1)  # then a stable sort by probability: ties in token-id order
        ids, probs = ids.gather(-1, by_id), probs.gather(-1, by_id)
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
        ids, probs = ids.gather(-1, order), probs.gather(-1, order)
        cumulative = probs.cumsum(-1)
        probs = probs.masked_fill(cumulative - probs >= self.top_p, 0.0)  # the mass before a kept token < top_p
        cumulative = probs.cumsum(-1)
        at = torch.searchsorted(cumulative, uniforms * cumulative[:, -1:], right=True)
        at = torch.minimum(at, (probs > 0).sum(-1, keepdim=True) - 1)  # guards the last kept token against rounding
        return ids.gather(-1, at).squeeze(-1)


def pick_tokens(logits: torch.Tensor, rows: torch.Tensor, sampler: RowSampler | None) -> torch.Tensor:
    """The next token of every live row: greedy argmax without a sampler, else the sampler's draw.

    logits (R, V); rows (R,) original row numbers. Greedy is `max(-1).indices` (the first maximum on ties,
    as argmax; 2x faster on CPUs in bfloat16).
    """
    if sampler is None:
        return logits.max(-1).indices
    return sampler.pick(logits, rows)
