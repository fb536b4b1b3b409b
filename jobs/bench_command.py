"""``karlo bench``: the benchmark sections (jobs.bench) as commands, each printing a table or JSON."""

from __future__ import annotations

import json

import click

from jobs.choices import DEVICE_CHOICE, DTYPE_CHOICE
from pipeline.config import DEFAULT_STEPS


@click.group("bench", invoke_without_command=True)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmarks; each prints a table (or --json) of rates and ratios measured in one run. Without a subcommand:
    the whole suite (`karlo bench all`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(bench_all_cmd)


def _model_options(fn):
    """Which model, where and how: shared by the benchmarks that run the model in this process."""
    options = [
        click.option("--model", default=None, metavar="DIR",
                     help="Local diffusers-format repo (default: the embedded tiny model)."),
        click.option("--preset", default=None, type=click.Choice(["karlo-v1-alpha", "tiny", "tiny-alt"]),
                     help="With --random-weights: build this preset's shapes with random weights on the device, in "
                          "memory (nothing written to disk)."),
        click.option("--random-weights", is_flag=True, help="Use --preset's shapes with random weights."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random weights."),
        click.option("--device", type=DEVICE_CHOICE, default="cpu", show_default=True),
        click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True),
        click.option("--fast/--no-fast", default=None,
                     help="The fast path (channels_last, cuDNN autotuning). Default: on for cuda with bf16/fp16."),
        click.option("--compile", "compile_", is_flag=True, help="torch.compile the denoising networks."),
        click.option("--steps", nargs=3, type=int, default=DEFAULT_STEPS, show_default=True,
                     help="prior decoder super-res"),
        click.option("--repeats", default=2, show_default=True, type=int),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _source(model: str | None, preset: str | None, random_weights: bool, seed: int):
    from jobs.bench import ModelSource

    if random_weights != (preset is not None):
        raise click.UsageError("random weights need a shape: give --preset NAME together with --random-weights")
    if preset is not None and model is not None:
        raise click.UsageError("give either --model or --preset with --random-weights, not both")
    if preset is not None:
        return ModelSource(preset=preset, seed=seed)
    return ModelSource(model_dir=_model_or_default(model))


def _model_or_default(model: str | None) -> str:
    from pipeline.embedded import default_model

    return model or default_model()


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise click.UsageError("the model benchmark compares against diffusers: pip install 'karlo-pipeline[test]'"
                               ) from None


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA GPU is visible to this process")


def _print_result(results: dict, json_output: bool) -> None:
    from jobs.bench import as_json, format_report

    click.echo(json.dumps(as_json(results), indent=2) if json_output else format_report(results))


@bench.command("all")
@_model_options
@click.option("--reference-dtype", type=DTYPE_CHOICE, default=None,
              help="diffusers' dtype (default: --dtype); e.g. float16 against Karlo in bfloat16.")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, default=(1, 4, 8), show_default=True,
              help="Batch sizes of the model comparison (repeat the option).")
@click.option("--stage-batch-size", default=4, show_default=True, type=int,
              help="Batch size of the stage benchmark (and of the CPU pipeline run).")
@click.option("--pipeline-rows", default=64, show_default=True, type=int)
@click.option("--data-plane-rows", default=20_000, show_default=True, type=int)
@click.option("--driver-rows", default=100_000, show_default=True, type=int)
@click.option("--only", "sections", multiple=True,
              type=click.Choice(["model", "stages", "pipeline", "driver_memory"]),
              help="Run only these sections (repeat the option). Default: all.")
def bench_all_cmd(model, preset, random_weights, seed, device, dtype, fast, compile_, steps, repeats, as_json,
                  reference_dtype, batch_sizes, stage_batch_size, pipeline_rows, data_plane_rows, driver_rows,
                  sections) -> None:
    """The whole suite in one run: model vs diffusers, stages (images/s, FLOP utilisation), pipeline and data-plane
    efficiency, driver memory over 100k rows."""
    from jobs.bench import SECTIONS, bench_all
    from karlo_model import DTYPES

    sections = tuple(sections) or SECTIONS
    source = _source(model, preset, random_weights, seed)
    _check_device(device)
    if "model" in sections:
        _require_diffusers()
    if "pipeline" in sections and source.model_dir is None:
        raise click.UsageError("the pipeline section loads the model in Ray actors and needs a model folder; "
                               "leave it out with --only model --only stages --only driver_memory")
    result = bench_all(source, device=device, dtype=DTYPES[dtype],
                       reference_dtype=DTYPES[reference_dtype] if reference_dtype else None, fast=fast,
                       compile=compile_, batch_sizes=tuple(batch_sizes), stage_batch_size=stage_batch_size,
                       steps=tuple(steps), repeats=repeats, pipeline_rows=pipeline_rows,
                       data_plane_rows=data_plane_rows, driver_rows=driver_rows, sections=sections)
    _print_result(result, as_json)


@bench.command("model")
@_model_options
@click.option("--reference-dtype", type=DTYPE_CHOICE, default=None,
              help="diffusers' dtype (default: --dtype); e.g. float16 against Karlo in bfloat16.")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, default=(1, 4, 8), show_default=True)
def bench_model_cmd(model, preset, random_weights, seed, device, dtype, fast, compile_, steps, repeats, as_json,
                    reference_dtype, batch_sizes) -> None:
    """Karlo.generate vs diffusers' UnCLIPPipeline on the same weights (needs the test extra: diffusers)."""
    from jobs.bench import bench_model
    from karlo_model import DTYPES

    source = _source(model, preset, random_weights, seed)
    _check_device(device)
    _require_diffusers()
    result = bench_model(source, batch_sizes=tuple(batch_sizes), steps=tuple(steps), repeats=repeats,
                         device=device, dtype=DTYPES[dtype], fast=fast, compile=compile_,
                         reference_dtype=DTYPES[reference_dtype] if reference_dtype else None)
    _print_result({"model": result}, as_json)


@bench.command("stages")
@_model_options
@click.option("--batch-size", default=4, show_default=True, type=int)
def bench_stages_cmd(model, preset, random_weights, seed, device, dtype, fast, compile_, steps, repeats, as_json,
                     batch_size) -> None:
    """Each stage alone: images/s, FLOPs per image and FLOP utilisation against the device's peak."""
    from jobs.bench import bench_stages
    from karlo_model import DTYPES

    source = _source(model, preset, random_weights, seed)
    _check_device(device)
    karlo = source.load(device, DTYPES[dtype], fast=fast, compile=compile_)
    result = bench_stages(karlo, batch_size=batch_size, steps=tuple(steps), repeats=repeats)
    _print_result({"stages": result}, as_json)


@bench.command("pipeline")
@click.option("--model", default=None, metavar="DIR", help="Local diffusers-format repo (default: the tiny model).")
@click.option("--rows", default=64, show_default=True, type=int)
@click.option("--batch-size", default=None, type=int, help="Every stage's batch size (default: the device's).")
@click.option("--steps", nargs=3, type=int, default=DEFAULT_STEPS, show_default=True, help="prior decoder super-res")
@click.option("--data-plane-rows", default=20_000, show_default=True, type=int)
@click.option("--device", type=DEVICE_CHOICE, default="cpu", show_default=True)
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True)
@click.option("--repeats", default=2, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def bench_pipeline_cmd(model, rows, batch_size, steps, data_plane_rows, device, dtype, repeats, as_json) -> None:
    """Pipeline vs the bound its stages' standalone rates set, and the data plane vs the PNG-encode bound."""
    from jobs.bench import bench_pipeline

    _check_device(device)
    result = bench_pipeline(_model_or_default(model), rows=rows, batch_size=batch_size, steps=tuple(steps),
                            data_plane_rows=data_plane_rows, device=device, dtype=dtype, repeats=repeats)
    _print_result({"pipeline": result}, as_json)


@bench.command("driver-memory")
@click.option("--rows", default=100_000, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def bench_driver_memory_cmd(rows, as_json) -> None:
    """The driver's peak RSS growth while ROWS prompt rows stream through the pipeline (networks skipped)."""
    from jobs.bench import bench_driver_memory

    _print_result({"driver_memory": bench_driver_memory(rows=rows)}, as_json)


@bench.command("scale")
@click.option("--rows", "sizes", multiple=True, type=int, default=(10_000_000, 100_000_000), show_default=True,
              help="Input rows of each measurement (repeat the option).")
@click.option("--work", type=click.Path(file_okay=False), default=None,
              help="Keep the built tables here and reuse them next time (default: a temporary folder, deleted).")
@click.option("--duplicates", default=0.03, show_default=True, type=float, help="Share of rows repeating an id.")
@click.option("--committed", default=0.5, show_default=True, type=float, help="Share of rows already committed.")
@click.option("--rows-per-shard", default=1000, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def bench_scale_cmd(sizes, work, duplicates, committed, rows_per_shard, as_json) -> None:
    """A resumed run over 10^7 and 10^8 rows with ids, half committed: each step's seconds up to the first prepared
    batch (plan, resume, duplicate ids), the driver's peak RSS growth and each Ray task's peak RSS and private
    memory."""
    import tempfile
    from pathlib import Path

    from jobs.bench.scale import bench_scale

    with tempfile.TemporaryDirectory(prefix="karlo-bench-scale-") as tmp:
        result = bench_scale(Path(work or tmp), sizes=tuple(sizes), duplicates=duplicates, committed=committed,
                             rows_per_shard=rows_per_shard)
    _print_result({"scale": result}, as_json)
