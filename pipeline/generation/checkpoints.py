"""Checkpoint tables: which model each configuration runs on (a job's `[checkpoints]`, config id -> model).

A configuration without an entry runs on the job's `model`. Every distinct checkpoint is loaded once per
worker process, next to the job's model, and kept for the worker's life: a worker holds the job's model
plus one copy of each distinct checkpoint at once (memory: each costs its weights in the run's dtype).
For one prompt batch the engine decodes the configurations that share weights together, one engine
call per model. Checkpoints must speak the job model's tokenizer and have its layer count; both are
checked on the driver before the run folder is touched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.generation.configs import SkipConfig
from pipeline.generation.models import LoadedModel, load_model, load_tokenizer, model_depth
from pipeline.run.job import JobSpec

_LOADED: dict[tuple[str, str, str], LoadedModel] = {}  # (source, dtype, device) -> model, per process


def resolve_source(source: str) -> str:
    """A local folder or file as an absolute path (workers may run elsewhere in the tree); else as given."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def with_resolved_checkpoints(spec: JobSpec) -> JobSpec:
    """The job with local checkpoint paths made absolute and entries naming the job's own model dropped
    (they run on it anyway, so such a table changes nothing, not even the run's identity)."""
    own = resolve_source(spec.model)
    table = {config_id: resolve_source(source) for config_id, source in spec.checkpoints.items()}
    return dataclasses.replace(spec, checkpoints={k: v for k, v in table.items() if v != own})


def check_checkpoints(spec: JobSpec, configs: list[SkipConfig], num_layers: int, named: tuple[str, ...] = ()) -> None:
    """Refuse, with one line, a table naming unknown configurations or a checkpoint whose tokenizer or
    layer count differs from the job's model. `named`: the table's config ids as the job gave them (before
    `with_resolved_checkpoints` dropped those naming the job's own model), which must be known as well."""
    known = {cfg.config_id for cfg in configs}
    unknown = sorted((set(spec.checkpoints) | set(named)) - known)
    if unknown:
        raise ValueError(f"checkpoints name configuration {', '.join(unknown)}, which this job does not run")
    if not spec.checkpoints:
        return
    vocab = load_tokenizer(spec.model).get_vocab()
    for source in sorted(set(spec.checkpoints.values())):
        try:
            depth = model_depth(source)
        except FileNotFoundError as exc:
            entries = ", ".join(k for k, v in sorted(spec.checkpoints.items()) if v == source)
            raise ValueError(f"[checkpoints] {entries}: {exc}") from None
        if depth != num_layers:
            raise ValueError(f"checkpoint {source} has {depth} layers, the job's model {spec.model} has {num_layers}")
        if load_tokenizer(source).get_vocab() != vocab:
            raise ValueError(f"checkpoint {source} has a different tokenizer from the job's model {spec.model}")


def checkpoint_model(source: str, dtype: str, device: str) -> LoadedModel:
    """The checkpoint loaded in this process (first call loads it, later calls return the same model)."""
    key = (source, dtype, device)
    if key not in _LOADED:
        _LOADED[key] = load_model(source, dtype, device)
    return _LOADED[key]


def load_checkpoints(checkpoints: dict[str, str], lm: LoadedModel) -> dict[str, str]:
    """Load every distinct checkpoint beside `lm` (same dtype and device); returns config id -> fingerprint."""
    prints = {source: checkpoint_model(source, lm.dtype, str(lm.device)).fingerprint()
              for source in sorted(set(checkpoints.values()))}
    return {config_id: prints[source] for config_id, source in sorted(checkpoints.items())}


def model_groups(lm: LoadedModel, checkpoints: dict[str, str],
                 configs: list[SkipConfig]) -> list[tuple[LoadedModel, list[int]]]:
    """Configurations grouped by the model they run on: (model, indices into `configs`), the job's model first."""
    groups: dict[str, list[int]] = {}
    for k, cfg in enumerate(configs):
        groups.setdefault(checkpoints.get(cfg.config_id, ""), []).append(k)
    return [(lm if source == "" else checkpoint_model(source, lm.dtype, str(lm.device)), indices)
            for source, indices in sorted(groups.items())]
