"""A job: what to generate (model, dataset, configurations) and how (batching, sharding, workers).

Named jobs are edited in `jobs/*.toml` and ship inside the wheel as `pipeline/jobs/*.toml` (pyproject.toml
maps the one folder onto the other), so `--dataset NAME` means the same job in a checkout and an installed
package. Command-line flags override single fields. Everything is checked here, before any run folder is
touched, and a bad field becomes one ValueError line naming it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.data.adapters import DATASETS, DatasetSpec
from pipeline.generation.configs import (
    FAMILIES,
    LOOP,
    PROGRAM_FAMILIES,
    SAMPLE,
    SkipConfig,
    build_configs,
    check_custom_layers,
    check_loop_grid,
    custom_configs,
    loop_configs,
    sample_configs,
)
from pipeline.generation.engine import DEFAULT_MAX_ROWS, PREFILL_POLICIES
from pipeline.generation.models import AUTO_DTYPE, DTYPES, EMBEDDED_MODEL
from pipeline.generation.sampling import Sampling
from pipeline.generation.scoring import ScoringOptions
from pipeline.run.location import RunPath, locate

_PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/
# An installed wheel carries the named jobs as pipeline/jobs/; a checkout (or editable install) has them in jobs/.
JOBS_DIR = _PACKAGE / "jobs" if (_PACKAGE / "jobs").is_dir() else _PACKAGE.parent / "jobs"
DEVICES = ("auto", "cpu", "cuda")
_DATASET_FIELDS = {f.name for f in dataclasses.fields(DatasetSpec)}
# Fields that change what a run's rows mean; two runs may share a folder only if these agree.
# Batching, workers and where the data files sit change speed, not results.
_IDENTITY = ("model", "dtype", "prefill", "max_new_tokens", "shard_size", "families", "rls_seeds", "config_ids")
_DATASET_IDENTITY = tuple(sorted(_DATASET_FIELDS - {"data_dir"}))
_SCORING_FIELDS = {f.name for f in dataclasses.fields(ScoringOptions)}
# Dataset fields in the identity only when set, so runs from before them keep their identity.
_DATASET_OPTIONAL = ("num_fewshot", "task", "fewshot_path")


@dataclass(frozen=True)
class JobSpec:
    """One resolved job. `out` is the run folder (default outputs/<name>): a path or an object-store URI."""

    name: str
    dataset: DatasetSpec
    model: str = EMBEDDED_MODEL
    dtype: str = AUTO_DTYPE  # auto: bfloat16 on GPUs and CPUs with bfloat16 units, else float32 (per worker)
    device: str = "auto"  # auto: a GPU per worker when the cluster has GPUs, else CPU
    families: tuple[str, ...] = FAMILIES
    rls_seeds: tuple[int, ...] = (0,)
    config_ids: tuple[str, ...] = ()  # empty: every configuration of `families`; `full` is always kept
    max_new_tokens: int = 64
    prefill: str = "full"
    batch_size: int = 8  # prompts per engine call
    max_rows: int = DEFAULT_MAX_ROWS  # engine rows (prompt x layer set) decoded together
    shard_size: int = 64  # examples per shard file, the unit of work and of resume
    workers: int | None = None  # None: one per GPU, or one CPU worker
    scoring: ScoringOptions = ScoringOptions()  # [scoring]: stemming, sentence_split, tokenizer
    sampling: Sampling = Sampling()  # [sampling]: samples (K of family `sample`), temperature, top_p, seed
    start_timeout: float = 600.0  # seconds to wait for workers to be placed and load the model, or to come back
    configs: Mapping[str, list[int]] = dataclasses.field(default_factory=dict)  # [configs]: custom programs
    loop: Mapping[str, list[int]] = dataclasses.field(default_factory=dict)  # [loop]: starts, lengths, repeats
    checkpoints: Mapping[str, str] = dataclasses.field(default_factory=dict)  # [checkpoints]: config id -> model
    out: str = ""
    trust_remote_code: bool = False  # run a model folder's own Python code (recorded in run.json); off by default
    stop: tuple[str, ...] = ()  # stop strings; empty: the task's own (gsm8k's, an lm_eval task's `until`)
    scorer: str | None = None  # a user's scorer, module:function (pipeline.generation.user_scorer)

    def __post_init__(self) -> None:
        _check_types(self, "")
        _validate(self)
        if not self.out:
            object.__setattr__(self, "out", str(Path("outputs") / self.name))
        elif "://" not in self.out:  # `out = "~/runs/x"` means the home folder, as in a shell
            object.__setattr__(self, "out", os.path.expanduser(self.out))

    @property
    def run_dir(self) -> RunPath:
        return locate(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the rows' content, as run.json stores them (lists, not tuples)."""
        ident = {key: getattr(self, key) for key in _IDENTITY}
        for key in ("families", "rls_seeds", "config_ids"):  # order does not change the rows
            ident[key] = sorted(ident[key])
        ident["dataset"] = {key: getattr(self.dataset, key) for key in _DATASET_IDENTITY
                            if key not in _DATASET_OPTIONAL or getattr(self.dataset, key) is not None}
        ident["scoring"] = self.scoring.to_dict()
        if self.configs:  # only when used, so runs from before these tables keep their identity
            ident["configs"] = {name: list(layers) for name, layers in sorted(self.configs.items())}  # programs: order counts
        if self.loop:
            ident["loop"] = {key: sorted(values) for key, values in sorted(self.loop.items())}
        if self.checkpoints:
            ident["checkpoints"] = dict(sorted(self.checkpoints.items()))
        if self.sampling.samples:  # likewise: only a run with a `sample` family has it in its identity
            ident["sampling"] = self.sampling.to_dict()
        return ident

    def select_configs(self, configs: list[SkipConfig]) -> list[SkipConfig]:
        """Restrict built configurations to `config_ids` (keeping `full`, which fidelity needs)."""
        if not self.config_ids:
            return configs
        known = {cfg.config_id for cfg in configs} | set(self.configs)
        unknown = [c for c in self.config_ids if c not in known]
        if unknown:
            raise ValueError(f"unknown config id {', '.join(unknown)} for this model and families "
                             f"(see `dynoracle configs --layers L`)")
        wanted = set(self.config_ids)
        return [cfg for cfg in configs if cfg.family == "full" or cfg.config_id in wanted]

    def configurations(self, num_layers: int) -> list[SkipConfig]:
        """Every configuration this job runs on an L-layer model: the chosen built-in ones (`loop` from the
        [loop] table), then its custom programs (always included), then the `sample` family; `config_ids`
        restricts the built-in and sample ones. Raises ValueError for a program that does not fit the model."""
        subsets = [f for f in self.families if f != LOOP]
        built = build_configs(num_layers, subsets, self.rls_seeds)
        if LOOP in self.families:
            built += loop_configs(num_layers, dict(self.loop))
        chosen = self.select_configs([*built, *sample_configs(num_layers, self.sampling.samples)])
        return [*(c for c in chosen if c.family != SAMPLE), *custom_configs(dict(self.configs), num_layers),
                *(c for c in chosen if c.family == SAMPLE)]


def _validate(spec: JobSpec) -> None:
    _check_types(spec.dataset, "dataset.")
    if spec.name in ("", ".", "..") or any(c in spec.name for c in "/\\\0"):
        raise ValueError(f"job name {spec.name!r} must be a plain folder name (not '.' or '..', no '/' or '\\'): "
                         "the run folder is outputs/<name>")
    if not spec.name.isprintable():
        raise ValueError(f"job name {spec.name!r} holds a control character (a newline, a tab...); "
                         "give a name of printable characters")
    if not spec.out.isprintable():
        raise ValueError(f"out {spec.out!r} holds a control character (a newline, a tab...); give a printable path")
    if not isinstance(spec.model, str) or not spec.model:
        raise ValueError(f"model must be a hub id, a local folder, a GGUF file or {EMBEDDED_MODEL}, got {spec.model!r}")
    if spec.dtype != AUTO_DTYPE and spec.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {spec.dtype!r}; choose from {AUTO_DTYPE}, {', '.join(DTYPES)}")
    if spec.device not in DEVICES:
        raise ValueError(f"unknown device {spec.device!r}; choose from {', '.join(DEVICES)}")
    if spec.prefill not in PREFILL_POLICIES:
        raise ValueError(f"unknown prefill {spec.prefill!r}; choose from {', '.join(PREFILL_POLICIES)}")
    if not spec.families and not spec.configs:  # with [configs], families = [] runs only the custom sets and full
        raise ValueError("families is empty and the job has no [configs]; choose from " + ", ".join(PROGRAM_FAMILIES))
    bad = [f for f in spec.families if f not in PROGRAM_FAMILIES]
    if bad:
        raise ValueError(f"unknown family {', '.join(map(str, bad))}; choose from {', '.join(PROGRAM_FAMILIES)}")
    if (LOOP in spec.families) != bool(spec.loop):
        raise ValueError("family loop and the [loop] table (starts, lengths, repeats) go together: give both or neither")
    if spec.loop:
        check_loop_grid(dict(spec.loop))  # the blocks' range against the model at preflight
    if any(not isinstance(s, int) or s < 0 for s in spec.rls_seeds):
        raise ValueError(f"rls_seeds must be non-negative integers, got {list(spec.rls_seeds)}")
    for key in ("max_new_tokens", "batch_size", "max_rows", "shard_size"):
        value = getattr(spec, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if spec.workers is not None and (not isinstance(spec.workers, int) or spec.workers < 1):
        raise ValueError(f"workers must be a positive integer, got {spec.workers!r}")
    if isinstance(spec.start_timeout, bool) or not isinstance(spec.start_timeout, (int, float)) \
            or not spec.start_timeout > 0:
        raise ValueError(f"start_timeout must be a positive number of seconds, got {spec.start_timeout!r}")
    if not isinstance(spec.configs, Mapping):
        raise ValueError("configs must be a table ([configs]) of name = [executed layers]")
    seen: dict[tuple[int, ...], str] = {}
    for name, layers in spec.configs.items():
        executed = check_custom_layers(name, layers)
        if executed in seen:
            raise ValueError(f"custom configurations {seen[executed]} and {name} execute the same layers "
                             f"{list(executed)}; keep one of them in [configs]")
        seen[executed] = name
    if not isinstance(spec.checkpoints, Mapping):
        raise ValueError("checkpoints must be a table ([checkpoints]) of config id = model")
    for config_id, source in spec.checkpoints.items():
        if not isinstance(source, str) or not source:
            raise ValueError(f"checkpoint of {config_id} must be a hub id, a local folder or a GGUF file, got {source!r}")
    limit = spec.dataset.limit
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"dataset.limit must be a positive integer, got {limit!r}")
    budget = spec.dataset.prompt_budget
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        raise ValueError(f"dataset.prompt_budget must be a positive integer, got {budget!r}")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "none"}


def _expected(hint: Any) -> str:
    """`hint` in words: 'a string', 'an integer or none', 'a list of strings', 'a table'."""
    if typing.get_origin(hint) is collections.abc.Mapping:
        return "a table"
    if typing.get_origin(hint) is tuple:
        item = _TYPE_NAMES[typing.get_args(hint)[0]].split(" ", 1)[1]
        return f"a list of {item}s"
    args = typing.get_args(hint) or (hint,)
    return " or ".join(_TYPE_NAMES[a] for a in sorted(args, key=lambda a: a is type(None)))


def _matches(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) is collections.abc.Mapping:  # [configs], [checkpoints]: entries checked in _validate
        return isinstance(value, Mapping)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    args = typing.get_args(hint) or (hint,)
    # bool is a subclass of int in Python; `workers = true` is not a number of workers; `10` is a float's 10.0
    if isinstance(value, bool):
        return bool in args
    return any(isinstance(value, a) or (a is float and isinstance(value, int)) for a in args)


def _check_types(obj: Any, prefix: str) -> None:
    """Every field of a job (or its dataset table) has its declared type; else one line naming the field."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):  # [dataset], [scoring]: checked field by field on their own
            continue
        value = getattr(obj, field.name)
        if not _matches(value, hint):
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"{prefix}{field.name} must be {_expected(hint)}, got {shown!r}")


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with the non-None values of `overrides`, tables merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            if isinstance(merged.get(key) or {}, Mapping):  # else a mistyped table stays, for the type check
                merged[key] = _merge(merged.get(key) or {}, value)
        elif value is not None:
            merged[key] = value
    return merged


def job_from_dict(raw: Mapping[str, Any]) -> JobSpec:
    """Build a JobSpec from TOML-shaped data; unknown or mistyped fields are errors."""
    known = {f.name for f in dataclasses.fields(JobSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown job field {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    data = dict(raw)
    dataset = data.get("dataset")
    if not isinstance(dataset, Mapping) or "name" not in dataset:
        raise ValueError(f"dataset must be a dataset name or a [dataset] table with a name, got {dataset!r}")
    unknown = sorted(set(dataset) - _DATASET_FIELDS)
    if unknown:
        raise ValueError(f"unknown dataset field {', '.join(unknown)}; known: {', '.join(sorted(_DATASET_FIELDS))}")
    data["dataset"] = DatasetSpec(**dataset)
    _check_types(data["dataset"], "dataset.")
    scoring = data.get("scoring", {})
    if not isinstance(scoring, Mapping):
        raise ValueError("scoring must be a table ([scoring]) with stemming, sentence_split, tokenizer")
    unknown = sorted(set(scoring) - _SCORING_FIELDS)
    if unknown:
        raise ValueError(f"unknown scoring field {', '.join(unknown)}; known: {', '.join(sorted(_SCORING_FIELDS))}")
    data["scoring"] = ScoringOptions(**scoring)
    _check_types(data["scoring"], "scoring.")
    data["sampling"] = _sampling(data.get("sampling", {}))
    data.setdefault("name", data["dataset"].name)
    for key in ("families", "rls_seeds", "config_ids", "stop"):
        if key in data:
            value = data[key]
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{key} must be a list, got {value!r}"
                                 + (f" (write {key} = {json.dumps([v.strip() for v in value.split(',')])})"
                                    if isinstance(value, str) else ""))
            data[key] = tuple(value)
    return JobSpec(**data)


def _sampling(table: Any) -> Sampling:
    """The [sampling] table as Sampling; unknown fields and bad values are one ValueError line."""
    known = {f.name for f in dataclasses.fields(Sampling)}
    if not isinstance(table, Mapping):
        raise ValueError(f"sampling must be a table ([sampling]) with {', '.join(sorted(known))}")
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"unknown sampling field {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return Sampling(**table)


def load_job(path: str | Path | None = None, dataset: str | None = None,
             overrides: Mapping[str, Any] | None = None) -> JobSpec:
    """A job from a TOML file, or a named job (jobs/<dataset>.toml, as shipped in the package).

    A dataset kind without a named job (file, hub) starts from the defaults; any other unknown name is a
    ValueError listing the named jobs.

    `overrides` is TOML-shaped (`{"dataset": {"limit": 8}, "workers": 2}`); None values are ignored.
    Renaming a job without a new `out` moves it to outputs/<new name>.
    """
    if path is not None and dataset is not None:
        raise ValueError("give either a job file or a dataset name, not both")
    if path is None and dataset is None:
        raise ValueError("give a job file (--job) or a dataset name (--dataset)")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"job file {path} does not exist")
        raw = _read_toml(path)
    else:
        raw = _named_job(dataset)
    if isinstance(raw.get("dataset"), str):
        raw["dataset"] = {"name": raw["dataset"]}
    overrides = dict(overrides or {})
    for key in ("families", "rls_seeds", "config_ids"):  # a flag's comma-separated list
        if isinstance(overrides.get(key), str):
            overrides[key] = [v.strip() for v in overrides[key].split(",") if v.strip()]
    if overrides.get("name") and not overrides.get("out") and isinstance(raw.get("out"), str):
        raw.pop("out")  # a mistyped `out` stays, for the type check
    return job_from_dict(_merge(raw, overrides))


def named_jobs() -> list[str]:
    """The names `--dataset` accepts with a job spec behind them (the stems of JOBS_DIR/*.toml), sorted."""
    return sorted(path.stem for path in JOBS_DIR.glob("*.toml"))


def _named_job(name: str) -> dict[str, Any]:
    path = JOBS_DIR / f"{name}.toml"
    if path.is_file():
        return _read_toml(path)
    if name in DATASETS:
        return {"dataset": {"name": name}}
    raise ValueError(f"no job named {name!r}; named jobs: {', '.join(named_jobs())} "
                     f"(or a dataset kind without one: {', '.join(d for d in DATASETS if d not in named_jobs())})")


def _read_toml(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                         "save the job file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: {exc}") from None
