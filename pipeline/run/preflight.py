"""Checks of a job that need neither a cluster nor model weights, run before Ray starts.

A bad configuration id, prompts that outgrow the model's positions, an architecture the engine cannot
run, or a run folder that holds someone else's files are all known from the job, the data and the
model's config file alone; finding them after starting Ray and loading weights on every worker wastes
minutes and, worse, used to end in a worker traceback.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig

from pipeline.data.adapters import Example
from pipeline.generation.architectures import architecture_problem
from pipeline.generation.models import load_config, max_positions
from pipeline.run.job import JobSpec
from pipeline.run.rundir import OWN_TEMP, RunDir, refuse_symlink


def check_job(spec: JobSpec, examples: list[Example]) -> PretrainedConfig:
    """Raise ValueError (one line) for anything in `spec` that would fail after the workers start.

    Returns the model's config. Raises FileNotFoundError for a missing model file.
    """
    config = load_config(spec.model, spec.trust_remote_code)
    problem = architecture_problem(config, spec.prefill)
    if problem:
        raise ValueError(f"{spec.model}: {problem}")
    spec.configurations(config.get_text_config().num_hidden_layers)  # ids, custom and loop programs in range
    positions = max_positions(config)
    longest = max((ex.prompt_tokens for ex in examples), default=0)
    if positions is not None and longest + spec.max_new_tokens > positions:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({spec.max_new_tokens}) needs "
                         f"{longest + spec.max_new_tokens} positions, but {spec.model} has {positions}; lower "
                         f"dataset.prompt_budget (now {spec.dataset.prompt_budget}) or max_new_tokens")
    check_run_folder(RunDir(spec.run_dir))
    return config


def check_run_folder(run: RunDir) -> None:
    """An existing folder may become a run folder only if it is empty or already one (it has run.json).

    Anything else (a home folder, a project folder named by mistake) is refused, so a run never writes,
    or sweeps temporary files, among files that are not its own.
    """
    if isinstance(run.root, Path):
        refuse_symlink(run.root)
    if not run.root.exists() or run.run_json.is_file():
        return
    if not run.root.is_dir():
        raise ValueError(f"run folder {run.root} exists and is not a folder; choose another --out or --name")
    own = {".lock", run.configs.name, run.generations.name}
    other = sorted(p.name for p in run.root.iterdir() if p.name not in own and not OWN_TEMP.fullmatch(p.name))
    if other:
        raise ValueError(f"{run.root} is not empty and is not a dynoracle run folder (it holds {other[0]}"
                         f"{f' and {len(other) - 1} more' if len(other) > 1 else ''}); choose another --out or --name")

