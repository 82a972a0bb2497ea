"""Whose folder `dynoracle finetune --out DIR` may write into, and which training a rerun may resume there.

A fine-tune writes a Hugging Face model folder (config.json, weights, tokenizer files), so it must not land
in a folder holding anything else: an existing folder is used only if it is empty or one of its own, that
is a fine-tune whose `trainer-checkpoints/` carries the stamp `training.json` written before the first step.
A rerun resumes those checkpoints only for the same training (starting model, configuration, data and the
settings that change the steps); anything else would train 0 new steps under new settings, or fail on the
optimizer's state, so it is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.run.atomic import write_json

STAMP = "training.json"  # inside the checkpoints folder
# Settings that do not change the training steps: where it is written, how much it is evaluated on.
_NOT_TRAINING = ("out", "eval_limit")


def training_identity(spec: Any) -> dict[str, Any]:
    """What decides a fine-tune's steps: every FinetuneSpec field but `out` and `eval_limit`; the dataset
    without its local folder (the same rows may be read from another mirror)."""
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _NOT_TRAINING}
    fields["dataset"] = {k: v for k, v in fields["dataset"].items() if k != "data_dir"}
    return json.loads(json.dumps(fields, default=str))


def claim_out_folder(out: Path, checkpoints: str, spec: Any) -> None:
    """Refuse (ValueError, one line) an `out` that holds something other than this same fine-tune's
    checkpoints; then stamp the checkpoints folder with the training, so a later rerun can tell."""
    stamp = out / checkpoints / STAMP
    if stamp.is_file():
        try:
            previous = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}
        mine = training_identity(spec)
        differ = sorted(k for k in set(mine) | set(previous) if mine.get(k) != previous.get(k))
        if differ:
            raise ValueError(f"{out} holds checkpoints of another training ({', '.join(differ)} differ); rerun with "
                             "the same settings to resume it, or choose another --out")
        return
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder; choose another --out")
        held = sorted(p.name for p in out.iterdir())
        if held:
            raise ValueError(f"--out {out} is not empty and is not an unfinished fine-tune of dynoracle (it holds "
                             f"{held[0]}{f' and {len(held) - 1} more' if len(held) > 1 else ''}); choose another --out")
    write_json(training_identity(spec), stamp)
