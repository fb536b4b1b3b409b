"""The ``karlo`` command: each subcommand parses, validates, calls one library function and sets the exit code."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

EXIT_ROW_ERRORS = 3  # the run finished, but some rows (or input files) could not be generated


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Batch image generation with Karlo v1 alpha (unCLIP) on Ray Data."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command("generate")
@click.argument("input_url")
@click.argument("output_url")
@click.option("--model", default=None, metavar="DIR|URL",
              help="Diffusers-format Karlo repo (folder or fsspec URL). Default: an embedded tiny random model.")
@click.option("--seed", default=0, show_default=True, type=int, help="Run seed; rows without a seed derive theirs from it.")
@click.option("--prior-steps", default=25, show_default=True, type=int)
@click.option("--decoder-steps", default=25, show_default=True, type=int)
@click.option("--super-res-steps", default=7, show_default=True, type=int)
@click.option("--prior-guidance-scale", default=4.0, show_default=True, type=float)
@click.option("--decoder-guidance-scale", default=8.0, show_default=True, type=float)
@click.option("--image-format", type=click.Choice(["png", "jpeg", "webp"]), default="png", show_default=True)
@click.option("--output-format", type=click.Choice(["webdataset", "parquet"]), default="webdataset",
              show_default=True)
@click.option("--rows-per-shard", default=1000, show_default=True, type=int)
@click.option("--stage-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file with per-stage batch_size, actors, num_gpus, num_cpus, device, dtype.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True)
@click.option("--overwrite", is_flag=True, help="Delete a previous run in OUTPUT made with other settings.")
def generate(input_url, output_url, model, stage_config, device, dtype, **settings) -> None:
    """Generate one image per row of the prompt table(s) at INPUT_URL into OUTPUT_URL.

    INPUT_URL: a Parquet file, folder or glob (local, s3://, gs://, ...) with a `prompt` column and optional
    `id`, `seed`, `negative_prompt`, `prior_guidance_scale`, `decoder_guidance_scale` columns.
    Rerunning the same command resumes an interrupted run. S3-compatible endpoints and credentials come from
    the usual settings (AWS_ENDPOINT_URL and AWS_* variables, FSSPEC_S3_* variables, ~/.config/fsspec).
    """
    from pipeline.config import ConfigError, RunConfig, load_stage_config_file
    from pipeline.reader import InputError
    from pipeline.run import OutputConflict, run

    try:
        stages = load_stage_config_file(Path(stage_config).read_text(), device, dtype) if stage_config else {}
        cfg = RunConfig(input_url=input_url, output_url=output_url, model=model, device=device, dtype=dtype,
                        stages=stages, **settings)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if model is None:
        click.echo(
            "Using the embedded tiny model with RANDOM weights: the images will be noise. "
            "Point --model at a diffusers-format Karlo repo (e.g. a local copy of kakaobrain/karlo-v1-alpha, or "
            "s3://bucket/models/karlo-v1-alpha) for real images.",
            err=True,
        )
    try:
        summary = run(cfg, echo=lambda m: click.echo(m, err=True))
    except (InputError, ConfigError, OutputConflict) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    _print_summary(summary)
    if not summary.ok:
        sys.exit(EXIT_ROW_ERRORS)


def _print_summary(s) -> None:
    lines = [
        f"rows read        {s.rows_in}",
        f"images written   {s.written}" + (f" ({s.resumed} from earlier attempts)" if s.resumed else ""),
        f"error rows       {s.errors}" + ("  -> see errors/" if s.errors else ""),
        f"images/s         {s.images_per_second:.2f} ({s.images_this_run} in {s.seconds:.1f} s)",
        f"output           {s.output_url}  (images/, img_emb/, text_emb/, metadata/, manifest.json)",
    ]
    for source, reason in s.bad_files:
        lines.append(f"unreadable file  {source}: {reason}")
    if not s.complete:
        lines.append("INCOMPLETE: rows are missing; rerun the same command to finish")
    click.echo("\n".join(lines))


@main.command("make-tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--preset", "preset_name", type=click.Choice(["tiny", "tiny-alt"]), default="tiny", show_default=True)
def make_tiny_model_cmd(out_dir: str, seed: int, preset_name: str) -> None:
    """Write a tiny random-weight Karlo in the diffusers on-disk layout to OUT_DIR."""
    from karlo_model import make_tiny_model

    path = make_tiny_model(out_dir, seed=seed, preset_name=preset_name)
    click.echo(f"wrote a random-weight {preset_name} Karlo model to {path}")


@main.group("bench")
def bench() -> None:
    """Benchmarks; each prints a table (or --json) of rates and ratios measured in one run."""


def _model_or_default(model: str | None) -> str:
    from pipeline.run import default_model

    return model or default_model()


def _report(rows: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    keys = list(rows[0])
    click.echo("  ".join(f"{k:>24}" for k in keys))
    for row in rows:
        click.echo("  ".join(f"{v:>24.3f}" if isinstance(v, float) else f"{v!s:>24}" for v in row.values()))


@bench.command("model")
@click.option("--model", default=None, metavar="DIR", help="Local diffusers-format repo (default: the tiny model).")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, default=(1, 8), show_default=True)
@click.option("--steps", nargs=3, type=int, default=(25, 25, 7), show_default=True, help="prior decoder super-res")
@click.option("--repeats", default=2, show_default=True, type=int)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_model_cmd(model, batch_sizes, steps, repeats, device, dtype, as_json) -> None:
    """Karlo.generate vs diffusers' UnCLIPPipeline on the same weights (needs the test extra: diffusers)."""
    from jobs.bench import bench_model
    from pipeline.stages import DTYPES

    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise click.UsageError("bench model compares against diffusers: pip install 'karlo-pipeline[test]'") from None
    rows = bench_model(_model_or_default(model), batch_sizes=tuple(batch_sizes), steps=tuple(steps),
                       repeats=repeats, device=device, dtype=DTYPES[dtype])
    _report(rows, as_json)


@bench.command("pipeline")
@click.option("--model", default=None, metavar="DIR", help="Local diffusers-format repo (default: the tiny model).")
@click.option("--rows", default=64, show_default=True, type=int)
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--steps", nargs=3, type=int, default=(25, 25, 7), show_default=True, help="prior decoder super-res")
@click.option("--data-plane-rows", default=6000, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def bench_pipeline_cmd(model, rows, batch_size, steps, data_plane_rows, as_json) -> None:
    """Pipeline vs an in-process generate loop, and the data plane vs the PNG-encode bound."""
    from jobs.bench import bench_pipeline

    result = bench_pipeline(_model_or_default(model), rows=rows, batch_size=batch_size, steps=tuple(steps),
                            data_plane_rows=data_plane_rows)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            click.echo(f"{k:>28}  {v:.3f}" if isinstance(v, float) else f"{k:>28}  {v}")


if __name__ == "__main__":
    main()
