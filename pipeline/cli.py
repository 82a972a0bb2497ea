"""The `dynoracle` command line: one subcommand per stage of the flow.

Each subcommand parses flags and hands over to the module that owns the stage; user errors
(ValueError, FileNotFoundError from our own checks) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from pipeline.configs import FAMILIES, build_configs

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


if __name__ == "__main__":
    app()
