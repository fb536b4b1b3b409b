"""``karlo sweep``: parse the spec, run it (or list its points) and exit with the sweep's status."""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from jobs.exit_codes import EXIT_POINT_FAILED
from pipeline.config import ConfigError
from pipeline.redact import display_url

from .spec import load_spec, points
from .summary import SUMMARY_MD, markdown


@click.command("sweep")
@click.argument("spec_url", metavar="SPEC")
@click.option("--output", default=None, metavar="URL", help="Output root (default: the spec's `output`).")
@click.option("--overwrite", is_flag=True, help="Replace points whose folder holds a run with other settings.")
@click.option("--dry-run", is_flag=True, help="Print the grid points and exit.")
def sweep_cmd(spec_url: str, output: str | None, overwrite: bool, dry_run: bool) -> None:
    """Run every grid point of the sweep SPEC (YAML, local or fsspec URL) into OUTPUT/<point>/, then write
    sweep.json, summary.parquet and summary.md there. Rerunning skips finished points and resumes the others.

    Exit code: 0 every point complete without error rows; 2 unusable spec, or a point could not run; 3 some rows
    became error rows.
    """
    # Ray and torch load in seconds: only a sweep that runs imports them, so that `karlo --help` starts fast.
    from pipeline.reader import InputError

    from .runner import run_sweep

    try:
        spec = load_spec(spec_url)
        if output:
            spec = dataclasses.replace(spec, output=output)
        grid = points(spec)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if dry_run:
        for p in grid:
            click.echo(f"{p.name}\t{json.dumps(p.as_dict(spec)['settings'], sort_keys=True)}")
        return
    try:
        result = run_sweep(spec, overwrite=overwrite, echo=lambda m: click.echo(m, err=True))
    except (InputError, ConfigError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_POINT_FAILED)
    click.echo(markdown(result.summary), nl=False)
    click.echo(f"summary: {display_url(result.root)}/{SUMMARY_MD}")
    sys.exit(result.exit_code)
