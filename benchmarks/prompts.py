"""The benchmarks' prompts: real Alpaca instructions from the local data slice, in the study's template."""

from __future__ import annotations

import json
import os
from pathlib import Path

ALPACA = "alpaca/alpaca_sample.jsonl"
TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompts(count: int) -> list[str]:
    """The first `count` input-free Alpaca prompts of the local slice, repeated if the slice has fewer."""
    data_dir = Path(os.environ.get("DYNORACLE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    rows = [json.loads(line) for line in (data_dir / ALPACA).read_text().splitlines()]
    texts = [TEMPLATE.format(**r) for r in rows if not r["input"]]
    return [texts[i % len(texts)] for i in range(count)]
