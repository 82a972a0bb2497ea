"""The `dynoracle` command line: one subcommand per stage of the flow.

Each subcommand parses flags and hands over to the module that owns the stage; user errors
(ValueError, FileNotFoundError from our own checks) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from pipeline.generation.configs import FAMILIES, build_configs

SPLIT_HELP = ("train, validation or test (default). alpaca: the study's split, datasets' train_test_split twice with "
              "seed 42 (52,002 rows -> 36,401 / 7,800 / 7,801; a local slice is split likewise).")
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


@app.callback()
def main() -> None:
    """Oracle search for dynamic layer selection: generate, score, reduce, query, report."""


def family_names(families: str | None) -> tuple[str, ...] | None:
    """`--families uls, ee` as ("uls", "ee"); None (every family) when the flag is not given."""
    return None if families is None else tuple(f.strip() for f in families.split(",") if f.strip())


def fail(message: str) -> None:
    """Print one line to stderr and exit non-zero, with no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


METRIC_HELP = ("Any metric column of the run's scored rows (default: its task's first): rougeL, rougeLsum, rouge1, "
               "rouge2, fidelity for generation runs; acc, acc_norm, acc_bytes, prob_gold for multiple-choice runs.")
PARTIAL_HELP = "Read a run with shard files missing (still running or interrupted); refused by default."


def warn_partial(missing_shards: int) -> None:
    if missing_shards:
        typer.echo(f"warning: partial run, {missing_shards} shard files missing: these numbers cover only the "
                   "sequences present", err=True)


@app.command()
def configs(
    layers: int = typer.Option(..., "--layers", "-L", help="Number of decoder layers L of the model."),
    family: Optional[list[str]] = typer.Option(None, "--family", "-f", help="uls, ee or rls (repeatable); default all."),
    rls_seeds: int = typer.Option(1, "--rls-seeds", help="How many random-skip seeds (0..n-1)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print skip configurations: id, family, budget, executed layers, cost."""
    try:
        chosen = build_configs(layers, tuple(family or FAMILIES), tuple(range(rls_seeds)))
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps([cfg.to_dict() for cfg in chosen], indent=1))
        return
    typer.echo(f"{'config_id':<12} {'family':<6} {'budget':>6} {'cost':>4}  layers")
    for cfg in chosen:
        typer.echo(f"{cfg.config_id:<12} {cfg.family:<6} {cfg.budget:>6} {cfg.cost:>4}  {','.join(map(str, cfg.layers))}")


@app.command()
def prompts(
    dataset: str = typer.Option("alpaca", "--dataset", "-d", help="alpaca, cnn_dailymail, samsum, file, hub, or a multiple-choice task (arc_easy, ...)."),
    split: str = typer.Option("test", "--split", help=SPLIT_HELP),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Local data root; default $DYNORACLE_DATA_DIR."),
    path: Optional[str] = typer.Option(None, "--file", "--path", help="File (dataset file) or hub id (dataset hub)."),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="Prompt column (file, hub)."),
    reference_column: Optional[str] = typer.Option(None, "--reference-column", help="Reference column (file, hub)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Only the first N rows of the split."),
    prompt_budget: int = typer.Option(1024, "--prompt-budget", help="Max prompt tokens; 0 turns truncation off."),
    prompt_format: str = typer.Option("plain", "--format", help="plain (dataset template) or chat (chat template)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Tokenizer source; default the embedded model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Print the prompts a run would use: seq_id, prompt tokens, truncation, and the prompt text."""
    from pipeline.data.adapters import DataError, DatasetSpec, load_examples
    from pipeline.generation.models import EMBEDDED_MODEL, load_tokenizer

    spec = DatasetSpec(dataset, split, path, data_dir, prompt_column, reference_column, prompt_format,
                       prompt_budget or None, limit)
    try:
        examples = load_examples(spec, load_tokenizer(model or EMBEDDED_MODEL))
    except (DataError, ValueError, OSError) as exc:
        fail(str(exc).strip().splitlines()[0])
    if as_json:
        fields = ("seq_id", "prompt_tokens", "prompt_truncated", "summary", "prompt", "reference")
        typer.echo(json.dumps([{name: getattr(ex, name) for name in fields} for ex in examples], indent=1))
        return
    for ex in examples:
        typer.echo(f"== {ex.seq_id}  {ex.prompt_tokens} tokens{', truncated' if ex.prompt_truncated else ''}")
        typer.echo(ex.prompt)
        for k, (choice, (_, continuation)) in enumerate(zip(getattr(ex, "choices", ()), getattr(ex, "requests", ()))):
            typer.echo(f"  choice {k}{' (right)' if k == ex.gold else ''}: {choice!r}, {len(continuation)} tokens")
    lengths = [ex.prompt_tokens for ex in examples]
    typer.echo(f"{len(examples)} prompts: {sum(lengths) / len(lengths):.0f} tokens on average, {max(lengths)} at most, "
               f"{sum(ex.prompt_truncated for ex in examples)} truncated")


@app.command()
def run(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset; its default job is jobs/<name>.toml."),
    job: Optional[str] = typer.Option(None, "--job", "-j", help="Job file (TOML); flags below override it."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, local folder, GGUF file or embedded."),
    split: Optional[str] = typer.Option(None, "--split", help=SPLIT_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Only the first N sequences of the split."),
    families: Optional[str] = typer.Option(None, "--families", help="Comma-separated: uls,ee,rls."),
    config_ids: Optional[str] = typer.Option(None, "--configs", help="Only these config ids (comma-separated)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Tokens to generate per output."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per engine call."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Sequences per shard file."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Generator actors; default one per GPU, or 1."),
    prefill: Optional[str] = typer.Option(None, "--prefill", help="full (the study's) or skip."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto (bfloat16 where the hardware has bfloat16 units, else float32), float32, bfloat16 or float16."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder; default outputs/<name>."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (and folder outputs/<name>)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster (auto, or host:port); default a private local Ray."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Local data root; default $DYNORACLE_DATA_DIR."),
    path: Optional[str] = typer.Option(None, "--file", "--path", help="File (dataset file) or hub id (dataset hub)."),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="Prompt column (file, hub)."),
    reference_column: Optional[str] = typer.Option(None, "--reference-column", help="Reference column (file, hub)."),
    prompt_budget: Optional[int] = typer.Option(None, "--prompt-budget", help="Max prompt tokens (default 1024)."),
    prompt_format: Optional[str] = typer.Option(None, "--format", help="plain (dataset template) or chat."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Run the model folder's own Python code (recorded in run.json)."),
    stemming: Optional[bool] = typer.Option(None, "--stemming/--no-stemming",
                                            help="Porter-stem ROUGE tokens; default on (the study: off)."),
    sentence_split: Optional[bool] = typer.Option(None, "--sentence-split/--no-sentence-split",
                                                  help="One sentence per line for rougeLsum; default on for "
                                                       "cnn_dailymail and samsum only."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="ROUGE tokenizer: default (rouge_score's, "
                                            "a-z and 0-9 only) or unicode (letters and digits of every script)."),
    start_timeout: Optional[float] = typer.Option(None, "--start-timeout", help="Seconds to wait for workers to be placed and load the model, or to come back after a loss (default 600)."),
    task: Optional[str] = typer.Option(None, "--task", help="lm_eval:NAME, an lm-evaluation-harness generate-until "
                                       "task (needs dynoracle[lm-eval]); offline, its documents from --file."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Exemplars before each question "
                                              "(gsm8k, lm_eval tasks); default the task's."),
    fewshot_path: Optional[str] = typer.Option(None, "--fewshot-file", help="Local file of an lm_eval task's "
                                               "few-shot split (its first k rows are the exemplars)."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="A scorer module:function, called as "
                                         "function(output, reference, row) -> float or dict of floats."),
    stop: Optional[str] = typer.Option(None, "--stop", help="Stop strings, comma-separated; default the task's."),
    samples: Optional[int] = typer.Option(None, "--samples", help="K sampled outputs of the full model per "
                                          "sequence (family `sample`, cost L: the noise ceiling); default 0."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature of the `sample` "
                                                "family (default 1.0; 0 is greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Top-p (nucleus) of the `sample` family (default 1.0)."),
    sample_seed: Optional[int] = typer.Option(None, "--sample-seed", help="Seed every sampled row's seed derives "
                                              "from, with its sequence and configuration (default 0)."),
) -> None:
    """Generate and score every (sequence, configuration) of a job into sharded Parquet; reruns resume.

    Scoring options are part of the run's identity and recorded in run.json with the sentence splitter used.
    """
    from pipeline.run.cluster import sigterm_as_interrupt
    from pipeline.run.job import load_job
    from pipeline.run.rundir import RunLocked
    from pipeline.run.runner import RunError, run_job

    if task is not None:
        if not task.startswith("lm_eval:") or dataset or job:
            fail(f"--task takes lm_eval:NAME (an lm-evaluation-harness task), without --dataset or --job; got {task}")
        dataset = "lm_eval"
    overrides = {"name": name or (task.replace(":", "_") if task else None), "model": model,
                 "scorer": scorer, "stop": stop, "families": families, "config_ids": config_ids,
                 "max_new_tokens": max_new_tokens, "batch_size": batch_size, "shard_size": shard_size,
                 "workers": workers, "prefill": prefill, "dtype": dtype, "device": device, "out": out,
                 "trust_remote_code": trust_remote_code or None,
                 "start_timeout": start_timeout,
                 "dataset": {"split": split, "limit": limit, "data_dir": data_dir, "path": path,
                             "prompt_column": prompt_column, "reference_column": reference_column,
                             "prompt_budget": prompt_budget, "prompt_format": prompt_format,
                             "task": task.partition(":")[2] if task else None, "num_fewshot": num_fewshot,
                             "fewshot_path": fewshot_path},
                 "scoring": {"stemming": stemming, "sentence_split": sentence_split, "tokenizer": tokenizer},
                 "sampling": {"samples": samples, "temperature": temperature, "top_p": top_p, "seed": sample_seed}}
    sigterm_as_interrupt()
    try:
        summary = run_job(load_job(job, dataset, overrides), address)
    except (ValueError, OSError, RunLocked, RunError) as exc:
        fail(str(exc).strip().splitlines()[0])
    except KeyboardInterrupt:
        typer.echo("error: interrupted; the shard files written so far are whole: rerun the same command to resume",
                   err=True)
        raise typer.Exit(130) from None
    tokens_per_s = summary.gen_tokens / summary.generate_s if summary.generate_s else 0.0
    typer.echo(f"{summary.rows} rows in {summary.shards} shards ({summary.computed} computed, {summary.skipped} "
               f"skipped) in {summary.elapsed_s:.1f} s; generation {summary.generate_s:.1f} s, "
               f"{tokens_per_s:.0f} tokens/s")
    from pipeline.run.rundir import SCORED_TABLES, RunDir

    task = (RunDir(summary.run_dir).read_run_json() or {}).get("task", "generate")
    typer.echo(f"results: {summary.run_dir / SCORED_TABLES[task][0]}")
    typer.echo(f"next: dynoracle reduce {summary.run_dir} --match-full")


@app.command()
def features(
    run_dir: str = typer.Argument(..., help="A finished run folder."),
    layer: Optional[list[int]] = typer.Option(None, "--layer", "-l", help="Hidden state after this many layers (repeatable; default 1 and L)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker actors; default the run's."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster (auto, or host:port); default local."),
) -> None:
    """Prompt features of a run's sequences (one prefill each, the run's model) into features/; reruns resume."""
    from pipeline.analysis.feature_task import run_features
    from pipeline.run.rundir import RunLocked
    from pipeline.run.runner import RunError

    try:
        summary = run_features(run_dir, tuple(layer or ()), workers, address)
    except (ValueError, OSError, RunLocked, RunError) as exc:
        fail(str(exc).strip().splitlines()[0])
    typer.echo(f"features of {summary.shards} shards ({summary.computed} computed, {summary.skipped} skipped) "
               f"in {summary.seconds:.1f} s")
    typer.echo(f"next: dynoracle controller {run_dir}")


@app.command()
def finetune(
    model: str = typer.Option(..., "--model", "-m", help="Starting model: hub id, local folder, GGUF file or embedded."),
    config_id: str = typer.Option(..., "--config", help="Configuration to train for: full, uls-C, ee-C or rls-C-sS."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset; trains on its train split."),
    out: str = typer.Option(..., "--out", "-o", help="Output model folder; rerunning resumes it."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Only the first N training rows."),
    epochs: float = typer.Option(2.0, "--epochs", help="Epochs (the study: 2)."),
    lr: float = typer.Option(2e-5, "--lr", help="Learning rate (the study: 2e-5)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Global batch (the study: 8)."),
    seed: int = typer.Option(42, "--seed", help="Seed (the study: 42)."),
    prefill: str = typer.Option("full", "--prefill", help="full (prompt through all layers) or skip."),
    max_response_tokens: int = typer.Option(256, "--max-response-tokens", help="Cut references to N tokens."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Validation rows for the eval loss."),
    save_steps: int = typer.Option(500, "--save-steps", help="Steps between resumable checkpoints."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast (weights stay float32)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers (data-parallel)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster for --workers; default local."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Local data root; default $DYNORACLE_DATA_DIR."),
    path: Optional[str] = typer.Option(None, "--file", "--path", help="File (dataset file) or hub id (dataset hub)."),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="Prompt column (file, hub)."),
    reference_column: Optional[str] = typer.Option(None, "--reference-column", help="Reference column (file, hub)."),
    prompt_format: str = typer.Option("plain", "--format", help="plain (dataset template) or chat (chat template)."),
    prompt_budget: int = typer.Option(1024, "--prompt-budget", help="Max prompt tokens; 0 turns truncation off."),
) -> None:
    """Fine-tune a model for one configuration (skipped layers frozen and never run, loss on the response)."""
    from pipeline.data.adapters import DataError, DatasetSpec
    from pipeline.training.finetune import FinetuneSpec
    from pipeline.training.finetune import finetune as run_finetune

    data = DatasetSpec(dataset, "train", path, data_dir, prompt_column, reference_column, prompt_format,
                       prompt_budget or None, limit)
    try:
        spec = FinetuneSpec(model, config_id, data, out, epochs, lr, batch_size, seed, prefill, max_response_tokens,
                            eval_limit, save_steps, bf16, workers)
        record = run_finetune(spec, address)
    except (ValueError, OSError, DataError) as exc:
        fail(str(exc).strip().splitlines()[0])
    losses = ", ".join(f"{k} {record[k]:.4f}" for k in ("train_loss", "eval_loss") if k in record)
    typer.echo(f"{record['config']['config_id']}: {record['train_rows']} rows, {record['steps']} steps in "
               f"{record['seconds']:.0f} s; {losses}")
    typer.echo(f"model: {out} (dynoracle run --model {out}, or name it in a job's [checkpoints] table)")


@app.command("reduce")
def reduce_command(
    run_dir: str = typer.Argument(..., help="Run folder holding configs.parquet and generations/."),
    budget: Optional[list[float]] = typer.Option(None, "--budget", "-b", help="Budget in mean layers (repeatable)."),
    match_full: bool = typer.Option(True, "--match-full/--no-match-full", help="Find the least budget matching full."),
    metric: Optional[str] = typer.Option(None, "--metric", help=METRIC_HELP),
    families: Optional[str] = typer.Option(None, "--families", help="Comma-separated: uls,ee,rls; default all."),
    cost: str = typer.Option("nominal", "--cost", help="nominal: executed layers per generated token after the "
                             "first (the configuration's layer count); measured: executed layers per generated "
                             "token as run (the first token's full-model pass included under the full prefill); "
                             "total: layer-tokens per sequence, the prompt pass included (P*L + (g-1)*c under "
                             "the full prefill)."),
    tolerance: float = typer.Option(0.0, "--tolerance", help="Match when oracle mean >= full mean - T."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary JSON instead of a table."),
    partial: bool = typer.Option(False, "--partial", help=PARTIAL_HELP),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Paired bootstrap resamples for intervals; 0 turns them off."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
    confidence: float = typer.Option(0.95, "--confidence", help="Level of the bootstrap intervals."),
    degenerate: str = typer.Option("zero", "--degenerate", help="What degenerate outputs (empty, no letter or "
                                   "digit, function words only, one word repeated, looping) score: zero (default: "
                                   "what a reader would give them), keep (their metric as is) or exclude (not a "
                                   "choice while another is affordable)."),
    null_draws: int = typer.Option(200, "--null-draws", help="Draws of the oracle's residual-permutation null "
                                   "(sequence and configuration effects kept, their interaction shuffled); 0 "
                                   "turns it off. Seeded by --seed."),
) -> None:
    """Solve the oracle from a run's generations: frontier, allocations, minimal budget matching full, intervals,
    the oracle's null, the full model's best-of-K noise ceiling (runs with a `sample` family) and degenerate picks."""
    from pipeline.analysis.reduce import reduce_run

    chosen = family_names(families)
    try:
        result = reduce_run(run_dir, metric, chosen, tuple(budget or ()), match_full, cost, tolerance, partial,
                            bootstrap, seed, confidence, degenerate, null_draws)
    except (ValueError, OSError) as exc:
        fail(str(exc).strip().splitlines()[0])
    summary = result.summary
    warn_partial(summary["missing_shards"])
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    typer.echo(f"{summary['metric']} oracle: {summary['num_sequences']} sequences x {summary['num_configs']} configurations "
               f"({', '.join(summary['families'])}; {cost} cost), written to {result.out_dir}")
    level = f"{confidence:.0%} CI" if bootstrap else "(no CI)"
    null_head = f"{'null (median, interval)':>24} " if result.null is not None else ""
    typer.echo(f"{'budget':>9}  {'kind':<10} {'oracle mean':>11} {level:>15} {null_head}{'LP bound':>9} {'gap':>9}  "
               "top shares")
    rows = list(zip(result.rows, result.null if result.null is not None else [None] * len(result.rows)))
    for r, null in rows:
        if r.kind == "grid" and not (not budget and float(r.budget).is_integer()):
            continue
        top = sorted(r.shares, key=lambda item: -item[1])[:3]
        shares = ", ".join(f"{config_id} {share:.1%}" for config_id, share in top)
        interval = f"{r.value_lo:.4f}-{r.value_hi:.4f}" if r.value_lo is not None else ""
        null_cell = "" if null is None else f"{f'{null[0]:.4f} ({null[1]:.4f}-{null[2]:.4f})':>24} "
        typer.echo(f"{r.budget:>9.4f}  {r.kind:<10} {r.value:>11.4f} {interval:>15} {null_cell}{r.lp_bound:>9.4f} "
                   f"{r.gap:>9.2g}  {shares}")
    full = f"full model (mean {summary['full_mean']:.4f})"
    unit = "layer-tokens per sequence" if cost == "total" else "layers"
    if summary["full_mean_interval"] is not None:
        lo, hi = summary["full_mean_interval"]
        full = f"full model (mean {summary['full_mean']:.4f}, {level} {lo:.4f}-{hi:.4f})"
    if summary["min_budget_to_match"] is not None:
        interval = ""
        if summary["min_budget_interval"] is not None:
            lo, hi = summary["min_budget_interval"]
            interval = f"; {level} {lo:.4g}-{hi:.4g} {unit}, {bootstrap} paired resamples, seed {seed}"
        typer.echo(f"minimal budget matching {full}: {summary['min_budget_to_match']:.6g} {unit} of "
                   f"{summary['num_layers']:g} ({summary['min_budget_fraction']:.1%}){interval}")
    elif match_full:
        typer.echo(f"no budget up to {summary['num_layers']:g} layers matches the {full}")
    for line in headline_lines(summary, level, unit):
        typer.echo(line)
    if summary["warning"]:
        typer.echo(f"warning: {summary['warning']}", err=True)


def headline_lines(summary: dict, level: str, unit: str = "layers") -> list[str]:
    """The reducer's lines beside the oracle's match: its null, the noise ceiling, degenerate picks, total cost."""
    def span(pair: list | None, digits: str = ".4g") -> str:
        if not pair:
            return ""
        lo, hi = (("none" if v is None or v != v else format(v, digits)) for v in pair)
        return f" ({level} {lo}-{hi})"

    lines = []
    null = summary.get("oracle_null")
    if null is not None:
        where = "no budget" if null["min_budget_to_match"] is None else f"{null['min_budget_to_match']:.4g} {unit}"
        lines.append(f"null ({null['kind'].split(' (')[0]}, {null['draws']} draws): the oracle matches the full model at "
                     f"{where}{span(null['min_budget_interval'])}")
    ceiling = summary.get("noise_ceiling")
    if ceiling is not None:
        bar = ceiling["min_budget_to_match_best_of_k"]
        lines.append(f"noise ceiling: the full model's best of {ceiling['samples']} samples {ceiling['best_of_k_mean']:.4f}"
                     f"{span(ceiling['best_of_k_mean_interval'])}, gain over greedy {ceiling['best_of_k_gain']:+.4f}"
                     f"{span(ceiling['best_of_k_gain_interval'])}; the oracle's gain at the full budget "
                     f"{ceiling['oracle_gain_at_full_budget']:+.4f}{span(ceiling['oracle_gain_at_full_budget_interval'])}; "
                     "least budget matching best-of-K: "
                     + ("none" if bar is None else f"{bar:.4g} {unit}{span(ceiling['min_budget_to_match_best_of_k_interval'])}"))
    degenerate = summary["degenerate"]
    picks = degenerate["picks_at_match"]
    lines.append(f"degenerate ({degenerate['mode']}): {degenerate['rows']} of {degenerate['of_rows']} rows"
                 + ("" if picks is None else f"; {picks} of the oracle's {degenerate['of_sequences']} picks at the "
                    "matching budget"))
    total = summary["total_cost"]
    if total["oracle_at_match"] is not None:
        lines.append(f"total cost at the matching budget, prompt pass included: {total['oracle_at_match']:.0f} "
                     f"layer-tokens per sequence against the full model's {total['full_mean']:.0f} "
                     f"({total['fraction']:.1%})")
    return lines


@app.command()
def similarity(
    run_dir: str = typer.Argument(..., help="A finished run folder."),
    response: str = typer.Option("reference", "--response", help="reference (the study's) or full (the full model's output)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker actors; default the run's."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster (auto, or host:port); default local."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples of the intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
) -> None:
    """Hidden-state similarity of every configuration to the full model (teacher-forced), per layer and final."""
    from pipeline.analysis.similarity_task import run_similarity
    from pipeline.run.rundir import RunLocked
    from pipeline.run.runner import RunError

    try:
        done = run_similarity(run_dir, response, workers, address, bootstrap, seed)
    except (ValueError, OSError, RunLocked, RunError) as exc:
        fail(str(exc).strip().splitlines()[0])
    typer.echo(f"{done['rows']} rows in {done['shards']} shards ({done['computed']} computed, {done['skipped']} "
               f"skipped) in {done['seconds']:.1f} s; summary: {done['summary']}")


@app.command()
def gates(
    run_dir: str = typer.Argument(..., help="A finished run folder (its model, dataset, scoring and sequences)."),
    lam: list[float] = typer.Option(..., "--lambda", help="Cost weight per expected executed layer (repeatable)."),
    gate_input: Optional[list[str]] = typer.Option(None, "--input", help="hidden or fixed (repeatable); default both."),
    train_limit: Optional[int] = typer.Option(256, "--train-limit", help="Train-split rows to train on."),
    epochs: float = typer.Option(1.0, "--epochs"),
    lr: float = typer.Option(1e-2, "--lr", help="AdamW learning rate of the gates."),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_response_tokens: int = typer.Option(32, "--max-response-tokens", help="Reference tokens trained on per row."),
    hidden: int = typer.Option(0, "--gate-hidden", help="0: one linear layer (the study's); N: an MLP with N ReLU units."),
    bf16: bool = typer.Option(False, "--bf16/--no-bf16", help="bfloat16 autocast in training."),
    kv: str = typer.Option("compute", "--kv", help="compute (the study's masked semantics) or none."),
    seed: int = typer.Option(0, "--seed"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker actors of the evaluation; default the run's."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster (auto, or host:port); default local."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples of the intervals."),
) -> None:
    """Per-token skip gates (hidden state vs a fixed input): train for each lambda, generate the run's sequences."""
    from pipeline.analysis.gates_task import run_gates
    from pipeline.run.rundir import RunLocked
    from pipeline.run.runner import RunError
    from pipeline.training.gates import GATE_INPUTS

    try:
        done = run_gates(run_dir, lam, tuple(gate_input or GATE_INPUTS), train_limit, epochs, lr, batch_size,
                         max_response_tokens, hidden, bf16, kv, seed, workers, address, bootstrap)
    except (ValueError, OSError, RunLocked, RunError) as exc:
        fail(str(exc).strip().splitlines()[0])
    typer.echo(f"{len(done['trained'])} gate sets evaluated in {done['shards']} shards ({done['computed']} computed, "
               f"{done['skipped']} skipped) in {done['seconds']:.1f} s; summary: {done['summary']}")


@app.command("token-oracle")
def token_oracle(
    run_dir: str = typer.Argument(..., help="A finished run folder."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker actors; default the run's."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster (auto, or host:port); default local."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples of the intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
) -> None:
    """Per-token oracle: per token of the full model's output, the cheapest matching configuration of each family
    (teacher-forced, the full model's states for earlier tokens: an optimistic bound)."""
    from pipeline.analysis.token_oracle_task import run_token_oracle
    from pipeline.run.rundir import RunLocked
    from pipeline.run.runner import RunError

    try:
        done = run_token_oracle(run_dir, workers, address, bootstrap, seed)
    except (ValueError, OSError, RunLocked, RunError) as exc:
        fail(str(exc).strip().splitlines()[0])
    for row in done["summary"].itertuples():
        typer.echo(f"{row.family}: {row.mean_cost:.2f} layers per token (95% {row.mean_cost_lo:.2f}-"
                   f"{row.mean_cost_hi:.2f}) over {row.tokens} tokens of {row.sequences} sequences")
    typer.echo(f"{done['shards']} shards ({done['computed']} computed, {done['skipped']} skipped) in "
               f"{done['seconds']:.1f} s")


@app.command()
def search(
    run_dir: str = typer.Argument(..., help="A finished run folder (its enumerated configurations start the search)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="New run folder for source + searched rows; default RUN-search."),
    budget: int = typer.Option(16, "--budget", help="Programs evaluated per sequence, per arm (search and random)."),
    width: int = typer.Option(4, "--width", help="Programs per sequence per round (one engine batch per round)."),
    cost_cap: Optional[int] = typer.Option(None, "--cost-cap", help="Longest program (layers per token); default L."),
    seed: int = typer.Option(0, "--seed", help="Seed of every proposal and of the bootstrap."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Score column the search maximises and the curve reads; default rougeL, prob_gold for a multiple-choice run."),
    budgets: Optional[list[float]] = typer.Option(None, "--at", help="Layer budget of the curve's value (repeatable; default 4 and 8)."),
    threshold: float = typer.Option(0.3, "--right-at", help="A generation row is 'right' for CoLa's shares when metric >= this; a multiple-choice row when acc = 1."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker actors; default the run's."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster (auto, or host:port); default local."),
) -> None:
    """Per-sequence local search over layer programs against random programs of the same costs, then the curve.
    Generation runs decode each candidate; multiple-choice runs score its choices by log-likelihood."""
    import json as json_module

    from pipeline.run.rundir import RunDir, RunLocked
    from pipeline.run.runner import RunError
    from pipeline.search.policy import SearchSpec
    from pipeline.search.run import run_search, search_report

    try:
        record = RunDir(run_dir).read_run_json() or {}
        spec = SearchSpec(budget, width, cost_cap or int(record.get("num_layers") or 1), seed, metric)
        folder, done = run_search(run_dir, spec, out, address, workers)
        typer.echo(f"{done.shards} shards ({done.computed} computed, {done.skipped} skipped) in {done.seconds:.1f} s "
                   f"into {folder}")
        result = search_report(folder, metric, tuple(budgets or (4.0, 8.0)), threshold, seed=seed)
    except (ValueError, OSError, RunLocked, RunError) as exc:
        fail(str(exc).strip().splitlines()[0])
    typer.echo(result["curve"].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    typer.echo(json_module.dumps(result["shares"], indent=1, default=str))
    typer.echo("files: " + ", ".join(map(str, result["files"])))


@app.command()
def controller(
    run_dir: str = typer.Argument(..., help="Run folder with generations/ and features/."),
    metric: Optional[str] = typer.Option(None, "--metric", help=METRIC_HELP),
    families: Optional[str] = typer.Option(None, "--families", help="Comma-separated: uls,ee,rls; default all."),
    layer: Optional[list[int]] = typer.Option(None, "--layer", "-l", help="Feature layer (repeatable); default every stored one."),
    learner: Optional[list[str]] = typer.Option(None, "--learner", help="ridge, boosting or classifier (repeatable); default all."),
    folds: int = typer.Option(5, "--folds", help="Cross-fitting folds over sequences."),
    seed: int = typer.Option(0, "--seed", help="Seed of the folds, the learners and the shuffled-feature null."),
    resamples: int = typer.Option(1000, "--resamples", help="Bootstrap resamples for the matching budget's interval."),
) -> None:
    """Learn each sequence's configuration from its prompt features; compare with the oracle and static choices."""
    import numpy as np
    import pandas as pd

    from pipeline.analysis.controller import LEARNERS
    from pipeline.analysis.controller_run import evaluate_run

    chosen = family_names(families)
    try:
        result = evaluate_run(run_dir, metric, chosen, tuple(layer or ()), tuple(learner or LEARNERS), folds, seed,
                              resamples)
    except (ValueError, OSError) as exc:
        fail(str(exc).strip().splitlines()[0])
    s, curves = result.summary, result.curves
    from pipeline.analysis.small_sample import controller_warning

    small = controller_warning(s["num_sequences"], folds)
    if small:
        typer.echo(f"warning: {small}", err=True)
    typer.echo(f"{s['metric']} controllers: {s['num_sequences']} sequences x {s['num_configs']} configurations, "
               f"{folds}-fold cross-fitting (seed {seed}); written to {result.out_dir}")
    typer.echo("share = (controller - best static) / (oracle - best static); null = shuffled features")
    learners = list(s["learners"])
    for j in s["layers"]:
        at = curves[(curves["layer"] == j) & np.isclose(curves["budget"], np.round(curves["budget"]))]
        typer.echo(f"\nfeatures after layer {j}{' (final)' if j == s['num_layers'] else ''}")
        typer.echo(f"{'budget':>6} {'oracle':>7} {'static':>7}" + "".join(f" | {name[:10]:>10} {'cost':>5} {'share':>6}"
                   for name in learners) + " | null shares")
        for budget, rows in at.groupby("budget"):
            first = rows.iloc[0]
            line = f"{budget:>6g} {first['oracle']:>7.4f} {first['static']:>7.4f}"
            for name in learners:
                real = rows[(rows["learner"] == name) & ~rows["null"]].iloc[0]
                line += f" | {real['value']:>10.4f} {real['cost']:>5.2f} {real['share']:>6.1%}"
            nulls = [rows[(rows["learner"] == name) & rows["null"]].iloc[0]["share"] for name in learners]
            typer.echo(line + " | " + " ".join(f"{v:.1%}" for v in nulls))
    typer.echo(f"\nleast budget matching the full model (mean {s['full_mean']:.4f}), 95% bootstrap interval:")
    for m in result.matches.itertuples():
        if pd.isna(m.match_budget):
            where = "no budget matches"
        else:
            interval = f"{m.match_low:.2f}" if pd.notna(m.match_low) else "none"
            interval += f"-{m.match_high:.2f}" if pd.notna(m.match_high) else "-no match"
            where = f"{m.match_budget:.2f} layers [{interval}]"
        typer.echo(f"  layer {m.layer:>2} {m.learner:<10} {'null' if m.null else 'real':<4} {where}; "
                   f"overall share {m.overall_share:.1%}; {m.seconds:.1f} s")


@app.command("query")
def query_command(
    run_dir: str = typer.Argument(..., help="Run folder."),
    sql: str = typer.Argument(..., help="SQL over the views generations (choices for a multiple-choice run), "
                              "configs, frontier, allocations, config_means, controller_curves, controller_matches, similarity, features, "
                              "gates, token_oracle (each once the command that writes it has run)."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Which metric's oracle (and controller) the views "
                                         "read. " + METRIC_HELP),
    families: Optional[str] = typer.Option(None, "--families", help="The oracle reduced over these families "
                                           "(as `reduce --families`); default all."),
    cost: str = typer.Option("nominal", "--cost", help="The oracle reduced with this cost (as `reduce --cost`)."),
    degenerate: str = typer.Option("zero", "--degenerate", help="The oracle reduced with this rule for degenerate "
                                   "outputs (as `reduce --degenerate`)."),
    output_format: str = typer.Option("table", "--format", help="table, csv or json."),
    partial: bool = typer.Option(False, "--partial", help=PARTIAL_HELP),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds a query may run before it is stopped."),
) -> None:
    """Run read-only SQL (DuckDB) over a run's verified Parquet files and print the result.

    Only SELECT and EXPLAIN run; DuckDB gets no file access (no COPY, ATTACH, read_csv of other files),
    cannot install or load extensions, and its settings are locked. A query is bounded: 2 GB of DuckDB
    memory, --timeout seconds, a million result rows; Ctrl-C stops it.
    """
    from pipeline.report.query import query_run, render

    try:
        columns, rows = query_run(run_dir, sql, metric, partial, family_names(families), cost, timeout, degenerate)
        text = render(columns, rows, output_format)
    except (ValueError, OSError) as exc:
        fail(str(exc).strip().splitlines()[0])
    except KeyboardInterrupt:
        typer.echo("error: query interrupted", err=True)
        raise typer.Exit(130) from None
    if columns:
        typer.echo(text)


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="Run folder holding configs.parquet and generations/."),
    metric: Optional[str] = typer.Option(None, "--metric", help=METRIC_HELP),
    families: Optional[str] = typer.Option(None, "--families", help="Comma-separated: uls,ee,rls; default all."),
    partial: bool = typer.Option(False, "--partial", help=PARTIAL_HELP),
    figure_format: str = typer.Option("png", "--format", help="Figure formats, comma-separated: png, pdf, svg "
                                      "(e.g. png,pdf); report.md shows the first."),
) -> None:
    """Write the study's figures and report.md into a run folder, reducing first when the oracle is stale."""
    from pipeline.report.figures import build_report
    from pipeline.report.paper import figure_formats

    chosen = None if families is None else [f.strip() for f in families.split(",") if f.strip()]
    try:
        result = build_report(run_dir, metric, chosen, partial, figure_formats(figure_format))
    except (ValueError, OSError) as exc:
        fail(str(exc).strip().splitlines()[0])
    summary = result.summary
    warn_partial(summary.get("missing_shards", 0))
    if result.reduced:
        typer.echo(f"reduced first: {result.reduced}")
    match = summary["min_budget_to_match"]
    typer.echo(f"{summary['num_sequences']} sequences; full-model mean {summary['metric']} {summary['full_mean']:.4f}; " + (
        f"the oracle matches it at {match:.3f} of {summary['num_layers']:g} layers ({summary['min_budget_fraction']:.1%})"
        if match is not None else "no budget matches it"))
    for path in (result.markdown, *result.figures):
        typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
