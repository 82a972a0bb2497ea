"""The `dynoracle` command line: one subcommand per stage of the flow.

Each subcommand parses flags and hands over to the module that owns the stage; user errors
(ValueError, FileNotFoundError from our own checks) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from pipeline.configs import FAMILIES, build_configs

SPLIT_HELP = ("train, validation or test (default). alpaca: the study's split, datasets' train_test_split twice with "
              "seed 42 (52,002 rows -> 36,401 / 7,800 / 7,801; a local slice is split likewise).")
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


@app.callback()
def main() -> None:
    """Oracle search for dynamic layer selection: generate, score, reduce, query, report."""


def fail(message: str) -> None:
    """Print one line to stderr and exit non-zero, with no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


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
    dataset: str = typer.Option("alpaca", "--dataset", "-d", help="alpaca, cnn_dailymail, samsum, file or hub."),
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
    from pipeline.data import DataError, DatasetSpec, load_examples
    from pipeline.models import EMBEDDED_MODEL, load_tokenizer

    spec = DatasetSpec(dataset, split, path, data_dir, prompt_column, reference_column, prompt_format,
                       prompt_budget or None, limit)
    try:
        examples = load_examples(spec, load_tokenizer(model or EMBEDDED_MODEL))
    except (DataError, OSError) as exc:
        fail(str(exc).strip().splitlines()[0])
    if as_json:
        fields = ("seq_id", "prompt_tokens", "prompt_truncated", "summary", "prompt", "reference")
        typer.echo(json.dumps([{name: getattr(ex, name) for name in fields} for ex in examples], indent=1))
        return
    for ex in examples:
        typer.echo(f"== {ex.seq_id}  {ex.prompt_tokens} tokens{', truncated' if ex.prompt_truncated else ''}")
        typer.echo(ex.prompt)
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
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster (auto, or host:port); default local."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Local data root; default $DYNORACLE_DATA_DIR."),
    stemming: Optional[bool] = typer.Option(None, "--stemming/--no-stemming",
                                            help="Porter-stem ROUGE tokens; default on (the study: off)."),
    sentence_split: Optional[bool] = typer.Option(None, "--sentence-split/--no-sentence-split",
                                                  help="One sentence per line for rougeLsum; default on for "
                                                       "cnn_dailymail and samsum only."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="ROUGE tokenizer: default (rouge_score's, "
                                            "a-z and 0-9 only) or unicode (letters and digits of every script)."),
) -> None:
    """Generate and score every (sequence, configuration) of a job into sharded Parquet; reruns resume.

    Scoring options are part of the run's identity and recorded in run.json with the sentence splitter used.
    """
    from pipeline.job import load_job
    from pipeline.rundir import RunLocked
    from pipeline.runner import RunError, run_job

    overrides = {"name": name, "model": model, "families": families, "config_ids": config_ids,
                 "max_new_tokens": max_new_tokens, "batch_size": batch_size, "shard_size": shard_size,
                 "workers": workers, "prefill": prefill, "dtype": dtype, "device": device, "out": out,
                 "dataset": {"split": split, "limit": limit, "data_dir": data_dir},
                 "scoring": {"stemming": stemming, "sentence_split": sentence_split, "tokenizer": tokenizer}}
    try:
        summary = run_job(load_job(job, dataset, overrides), address)
    except (ValueError, OSError, RunLocked, RunError) as exc:
        fail(str(exc).strip().splitlines()[0])
    tokens_per_s = summary.gen_tokens / summary.generate_s if summary.generate_s else 0.0
    typer.echo(f"{summary.rows} rows in {summary.shards} shards ({summary.computed} computed, {summary.skipped} "
               f"skipped) in {summary.elapsed_s:.1f} s; generation {summary.generate_s:.1f} s, "
               f"{tokens_per_s:.0f} tokens/s")
    typer.echo(f"results: {summary.run_dir / 'generations'}")
    typer.echo(f"next: dynoracle reduce {summary.run_dir} --match-full")


@app.command("reduce")
def reduce_command(
    run_dir: str = typer.Argument(..., help="Run folder holding configs.parquet and generations/."),
    budget: Optional[list[float]] = typer.Option(None, "--budget", "-b", help="Budget in mean layers (repeatable)."),
    match_full: bool = typer.Option(True, "--match-full/--no-match-full", help="Find the least budget matching full."),
    metric: str = typer.Option("rougeL", "--metric", help="rougeL, rougeLsum, rouge1, rouge2 or fidelity."),
    families: Optional[str] = typer.Option(None, "--families", help="Comma-separated: uls,ee,rls; default all."),
    cost: str = typer.Option("nominal", "--cost", help="nominal (executed layers) or measured (layers per token)."),
    tolerance: float = typer.Option(0.0, "--tolerance", help="Match when oracle mean >= full mean - T."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary JSON instead of a table."),
) -> None:
    """Solve the oracle from a run's generations: frontier, allocations, minimal budget matching full."""
    from pipeline.reduce import reduce_run

    chosen = None if families is None else tuple(f.strip() for f in families.split(",") if f.strip())
    try:
        result = reduce_run(run_dir, metric, chosen, tuple(budget or ()), match_full, cost, tolerance)
    except (ValueError, OSError) as exc:
        fail(str(exc).strip().splitlines()[0])
    summary = result.summary
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    shown = [r for r in result.rows if r.kind != "grid" or (not budget and float(r.budget).is_integer())]
    typer.echo(f"{metric} oracle: {summary['num_sequences']} sequences x {summary['num_configs']} configurations "
               f"({', '.join(summary['families'])}; {cost} cost), written to {result.out_dir}")
    typer.echo(f"{'budget':>9}  {'kind':<10} {'oracle mean':>11} {'LP bound':>9} {'gap':>9}  top shares")
    for r in shown:
        top = sorted(r.shares, key=lambda item: -item[1])[:3]
        shares = ", ".join(f"{config_id} {share:.1%}" for config_id, share in top)
        typer.echo(f"{r.budget:>9.4f}  {r.kind:<10} {r.value:>11.4f} {r.lp_bound:>9.4f} {r.gap:>9.2g}  {shares}")
    full = f"full model (mean {summary['full_mean']:.4f})"
    if summary["min_budget_to_match"] is not None:
        typer.echo(f"minimal budget matching {full}: {summary['min_budget_to_match']:.6g} layers of "
                   f"{summary['num_layers']:g} ({summary['min_budget_fraction']:.1%})")
    elif match_full:
        typer.echo(f"no budget up to {summary['num_layers']:g} layers matches the {full}")


@app.command("query")
def query_command(
    run_dir: str = typer.Argument(..., help="Run folder."),
    sql: str = typer.Argument(..., help="SQL over the views generations, configs, frontier, allocations."),
    metric: str = typer.Option("rougeL", "--metric", help="Which oracle/<metric>/ the frontier and allocations read."),
    output_format: str = typer.Option("table", "--format", help="table, csv or json."),
) -> None:
    """Run SQL (DuckDB) over a run's Parquet files and print the result."""
    from pipeline.query import query_run, render

    try:
        columns, rows = query_run(run_dir, sql, metric)
        text = render(columns, rows, output_format)
    except (ValueError, OSError) as exc:
        fail(str(exc).strip().splitlines()[0])
    if columns:
        typer.echo(text)


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="Run folder holding configs.parquet and generations/."),
    metric: str = typer.Option("rougeL", "--metric", help="rougeL, rougeLsum, rouge1, rouge2 or fidelity."),
    families: Optional[str] = typer.Option(None, "--families", help="Comma-separated: uls,ee,rls; default all."),
) -> None:
    """Write the study's figures and report.md into a run folder, reducing first when the oracle is stale."""
    from pipeline.report import build_report

    chosen = None if families is None else [f.strip() for f in families.split(",") if f.strip()]
    try:
        result = build_report(run_dir, metric, chosen)
    except (ValueError, OSError) as exc:
        fail(str(exc).strip().splitlines()[0])
    summary = result.summary
    if result.reduced:
        typer.echo(f"reduced first: {result.reduced}")
    typer.echo(f"{summary['num_sequences']} sequences; full-model mean {metric} {summary['full_mean']:.4f}; the oracle "
               f"matches it at {summary['min_budget_to_match']:.3f} of {summary['num_layers']:g} layers "
               f"({summary['min_budget_fraction']:.1%})")
    for path in (result.markdown, *result.figures):
        typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
