"""The ``karlo`` command: each subcommand parses, validates, calls one library function and sets the exit code."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import click

from jobs.choices import DEVICE_CHOICE, DTYPE_CHOICE
from jobs.exit_codes import EXIT_INTERRUPTED, EXIT_ROW_ERRORS
from jobs.run_report import format_summary
from pipeline.config import (
    ALL_STAGE_NAMES,
    DECODER_GUIDANCE_SCALE,
    DECODER_STEPS,
    IMAGE_FORMATS,
    OUTPUT_FORMATS,
    PRIOR_GUIDANCE_SCALE,
    PRIOR_STEPS,
    STRENGTH,
    SUPER_RES_STEPS,
    ConfigError,
    RunConfig,
    load_stage_config_file,
    parse_adapters,
    parse_stage_configs,
    read_stage_config_file,
)
from pipeline.redact import redact


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True,
              help="Log debug messages, with Ray's own start-up messages, progress bars and warnings.")
def main(verbose: bool) -> None:
    """Batch image generation with Karlo v1 alpha (unCLIP) on Ray Data."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from pipeline.quiet import quiet_ray

        quiet_ray()
    # botocore's debug log prints request headers, session tokens included.
    for name in ("botocore", "aiobotocore"):
        logging.getLogger(name).setLevel(logging.INFO)


def _run_options(command):
    """Output, resources and the optional CLIP score stage (pipeline.scoring): shared by generate and variations."""
    options = [
        click.option("--image-format", type=click.Choice(IMAGE_FORMATS), default="png", show_default=True),
        click.option("--output-format", type=click.Choice(OUTPUT_FORMATS), default="webdataset", show_default=True),
        click.option("--rows-per-shard", default=1000, show_default=True, type=int),
        click.option("--limit", default=None, type=click.IntRange(min=1), metavar="N",
                     help="Only the first N input rows (files in path order, rows in file order): a trial run, which "
                          "the same command without --limit (or with a larger one) continues into the same OUTPUT."),
        click.option("--images-per-prompt", default=1, show_default=True, type=click.IntRange(min=1), metavar="N",
                     help="N images per input row, each its own row with its own seed and a sample_index column; "
                          "image 0 is the one a single-image run makes. A rerun into the same OUTPUT may raise an N "
                          "above 1 to add images."),
        click.option("--stage-config", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="YAML file with per-stage batch_size, actors, num_gpus, num_cpus, device, dtype (sections "
                          "prior or image_encoder, decoder, super_res, clip_score)."),
        click.option("--device", type=DEVICE_CHOICE, default="cpu", show_default=True),
        click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True),
        click.option("--overwrite", is_flag=True, help="Delete a previous run in OUTPUT made with other settings."),
        click.option("--placement-timeout", default=0.0, show_default=True, type=click.FloatRange(min=0),
                     metavar="SECONDS",
                     help="Wait this long for the GPUs the stage actors need (an autoscaling cluster adding nodes, "
                          "or other jobs releasing them) before refusing the run."),
        click.option("--dry-run", is_flag=True,
                     help="Check the input, the model and OUTPUT, reserve and show the actors' placement (as `karlo "
                          "plan`) and the rows and shards the run would write; write nothing."),
        click.option("--progress-interval", default=10.0, show_default=True, type=click.FloatRange(min=0),
                     metavar="SECONDS",
                     help="Print a status line (rows, images/s, ETA, errors) to stderr this often; 0 turns it off."),
        click.option("--clip-score", is_flag=True,
                     help="Score each image: cosine of its CLIP image embedding with the prompt's CLIP text embedding "
                          "(with the input image's, for variations); embeddings in clip_img_emb/."),
        click.option("--clip-model", default=None, metavar="DIR|URL",
                     help="CLIP vision tower for --clip-score: an image-variations repo or a CLIP model folder with "
                          "the text encoder's embedding width. Default: the run's own (embedded or variations) model."),
        click.option("--min-clip-score", default=None, type=click.FloatRange(-1, 1), metavar="COSINE",
                     help="Move rows scoring below this cosine to rejected/ (implies --clip-score)."),
        click.option("--aesthetic-model", default=None, metavar="PATH|URL",
                     help="LAION aesthetic predictor weights (.safetensors or a weights-only .pth state dict, e.g. "
                          "sac+logos+ava1-l14-linearMSE.pth): adds aesthetic_score (implies --clip-score)."),
        click.option("--min-aesthetic", default=None, type=float, metavar="SCORE",
                     help="Move rows whose aesthetic_score is below this to rejected/ (needs --aesthetic-model)."),
        click.option("--safety-checker", default=None, metavar="DIR|URL",
                     help="A StableDiffusionSafetyChecker folder (e.g. a copy of "
                          "CompVis/stable-diffusion-safety-checker): adds nsfw and the concept scores (implies "
                          "--clip-score)."),
        click.option("--drop-unsafe", is_flag=True,
                     help="Move rows the safety checker flags to rejected/ (default: flag them only)."),
        click.option("--lora", "lora", multiple=True, metavar="PATH|URL[:SCALE]",
                     help="LoRA adapter merged into the prior / decoder / super-res networks its keys name: a PEFT "
                          "folder or a .safetensors file (diffusers or kohya keys); SCALE defaults to 1. Repeatable: "
                          "adapters add up. Appended to the stage config's lora section."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("generate")
@click.argument("input_url")
@click.argument("output_url")
@click.option("--model", default=None, metavar="DIR|URL",
              help="Diffusers-format Karlo repo (folder or fsspec URL). Default: an embedded tiny random model.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Run seed; rows without a seed derive theirs from it.")
@click.option("--prior-steps", default=PRIOR_STEPS, show_default=True, type=int)
@click.option("--decoder-steps", default=DECODER_STEPS, show_default=True, type=int)
@click.option("--super-res-steps", default=SUPER_RES_STEPS, show_default=True, type=int)
@click.option("--prior-guidance-scale", default=PRIOR_GUIDANCE_SCALE, show_default=True, type=float)
@click.option("--decoder-guidance-scale", default=DECODER_GUIDANCE_SCALE, show_default=True, type=float)
@click.option("--strength", default=None, type=click.FloatRange(0, 1, min_open=True), metavar="S",
              help=f"Image-to-image: the denoising strength of rows with an init_image and no strength of their own "
                   f"(1 = the whole decoder chain from noise, lower keeps more of the image). Default: {STRENGTH}.")
@_run_options
def generate(input_url, output_url, model, stage_config, device, dtype, progress_interval, **settings) -> None:
    """Generate one image (--images-per-prompt N: N) per row of the prompt table(s) at INPUT_URL into OUTPUT_URL.

    INPUT_URL: a Parquet file, folder or glob (local, s3://, gs://, ...) with a `prompt` column and optional
    `id`, `seed`, `negative_prompt`, `prior_guidance_scale`, `decoder_guidance_scale` columns, and for
    image-to-image `init_image` (image bytes, Hugging Face Image structs or paths/URLs) and `strength`.
    Rerunning the same command resumes an interrupted run. S3-compatible endpoints and credentials come from
    the usual settings (AWS_ENDPOINT_URL and AWS_* variables, FSSPEC_S3_* variables, ~/.config/fsspec).
    """
    _run_command(input_url, output_url, model, stage_config, device, dtype, progress_interval, settings,
                 repo="kakaobrain/karlo-v1-alpha")


@main.command("variations")
@click.argument("input_url")
@click.argument("output_url")
@click.option("--model", default=None, metavar="DIR|URL",
              help="Diffusers-format Karlo image-variations repo (folder or fsspec URL). Default: an embedded tiny "
                   "random model.")
@click.option("--image-column", default="image", show_default=True,
              help="Column of image bytes, Hugging Face Image structs {bytes, path}, or image paths/URLs.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Run seed; rows without a seed derive theirs from it.")
@click.option("--decoder-steps", default=DECODER_STEPS, show_default=True, type=int)
@click.option("--super-res-steps", default=SUPER_RES_STEPS, show_default=True, type=int)
@click.option("--decoder-guidance-scale", default=DECODER_GUIDANCE_SCALE, show_default=True, type=float)
@_run_options
def variations(input_url, output_url, model, stage_config, device, dtype, progress_interval, **settings) -> None:
    """Generate one variation (--images-per-prompt N: N) of each image in the table(s) at INPUT_URL into OUTPUT_URL.

    INPUT_URL: Parquet file(s) as for generate, with an image column (see --image-column) and optional `id`,
    `seed`, `decoder_guidance_scale` columns. Images that are missing or cannot be decoded become error rows.
    The outputs have generate's layout; img_emb/ holds the input images' CLIP embeddings (normalised).
    """
    _run_command(input_url, output_url, model, stage_config, device, dtype, progress_interval,
                 {**settings, "task": "variations"}, repo="kakaobrain/karlo-v1-alpha-image-variations")


def _run_command(input_url, output_url, model, stage_config, device, dtype, progress_interval, settings, *,
                 repo: str) -> None:
    """Build the RunConfig, run it (or its dry run), print the summary and exit with the run's status."""
    from ray.exceptions import RayError

    from pipeline.reader import InputError
    from pipeline.run import OutputError, RayStartError, run

    dry = settings.pop("dry_run")

    if settings.get("min_clip_score") is not None:
        settings["clip_score"] = True
    try:
        sections = read_stage_config_file(Path(stage_config).read_text()) if stage_config else {}
        stages = parse_stage_configs(sections, device, dtype, ALL_STAGE_NAMES) if stage_config else {}
        lora = parse_adapters(sections) + _lora_options(settings.pop("lora"))
        cfg = RunConfig(input_url=input_url, output_url=output_url, model=model, device=device, dtype=dtype,
                        stages=stages, lora=lora, **settings)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if model is None:
        from pipeline.embedded import notice

        try:
            click.echo(f"{notice()} Point --model at a diffusers-format Karlo repo (e.g. a local copy of {repo}, or "
                       f"s3://bucket/models/{repo.split('/')[-1]}) for real images.", err=True)
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    try:
        if dry:
            from pipeline.dry_run import dry_run, format_dry_run

            click.echo(format_dry_run(dry_run(cfg, echo=echo)))
            return
        # In a terminal, one bar redrawn in place, unless -v brought Ray Data's own bars back.
        live = sys.stderr if sys.stderr.isatty() and not _verbose() else None
        summary = run(cfg, echo=echo, progress_interval=progress_interval, live=live)
    except KeyboardInterrupt:
        # Click would print only "Aborted!". Committed shards are whole; partial files are removed by the rerun.
        click.echo("\ninterrupted: the shards committed so far are kept; rerun the same command to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except (InputError, ConfigError, OutputError) as e:
        click.echo(f"error: {redact(str(e))}", err=True)
        sys.exit(2)
    except (OSError, RayError, RayStartError) as e:
        # Storage (a full disk, a lost bucket) or Ray failed under a usable run: committed shards stay, and the
        # same command resumes. The user reads what failed; the traceback is for -v.
        if _verbose():
            traceback.print_exception(e)
        what = str(e) if isinstance(e, RayStartError) else _first_cause(e)
        click.echo(f"error: {redact(what)} (rerun the same command to resume)", err=True)
        sys.exit(1)
    click.echo(format_summary(summary))
    if not summary.ok:
        sys.exit(EXIT_ROW_ERRORS)


def _verbose() -> bool:
    return bool(click.get_current_context().find_root().params.get("verbose"))
def _lora_options(values: tuple[str, ...]) -> tuple:
    """The adapters of ``--lora PATH|URL[:SCALE]`` options (karlo_model is imported only when there are some)."""
    if not values:
        return ()
    from karlo_model.lora import AdapterError, parse_adapter

    try:
        return tuple(parse_adapter(v) for v in values)
    except AdapterError as e:
        raise ConfigError(f"--lora: {e}") from None


def _first_cause(e: BaseException) -> str:
    """One line for an infrastructure failure: the innermost OSError among its causes (Ray wraps a task's error,
    its traceback in the message), else the innermost error that is not Ray's wrapper, else the error itself."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        # A RayTaskError's ``cause`` is the task's own exception; its __cause__ only Ray Data's marker.
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    cause = next((c for c in reversed(chain) if isinstance(c, OSError)), None) or next(
        (c for c in reversed(chain) if not type(c).__module__.startswith("ray.")), chain[0])
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


@main.command("plan")
@click.option("--stage-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The YAML stage config a run would use (see `karlo generate --help`).")
@click.option("--device", type=DEVICE_CHOICE, default="cpu", show_default=True)
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True)
@click.option("--clip-score", is_flag=True, help="Include the CLIP score stage, as `generate --clip-score` does.")
@click.option("--variations", is_flag=True, help="The stages of `karlo variations` (image encoder for the prior).")
@click.option("--placement-timeout", default=0.0, show_default=True, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Wait this long for GPUs the cluster lacks or has busy.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_cmd(stage_config, device, dtype, clip_score, variations, placement_timeout, as_json) -> None:
    """Reserve what `karlo generate` would on the Ray cluster (RAY_ADDRESS, a cluster started on this machine, or a
    local Ray), print per node and per GPU the stage actors that land there, then release it.

    Exits 0 when every actor places, 2 with a message naming what does not fit.
    """
    from pipeline.dry_run import placement_plan
    from pipeline.placement import format_layout

    try:
        stages = (load_stage_config_file(Path(stage_config).read_text(), device, dtype, ALL_STAGE_NAMES)
                  if stage_config else {})
        # The stages of a run; its input and output play no part in placement.
        cfg = RunConfig(input_url="-", output_url="-", device=device, dtype=dtype, stages=stages,
                        clip_score=clip_score, task="variations" if variations else "generate",
                        placement_timeout=placement_timeout)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    report = placement_plan(cfg, echo=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(report, indent=2) if as_json else format_layout(report))
    if report["error"]:
        if as_json:
            click.echo(f"error: {report['error']}", err=True)
        sys.exit(2)


@main.command("preview")
@click.argument("output_url")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1),
              help="Images to show: the first N rows in input order (per point of a sweep).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Local folder for index.html and contact_sheet.png. Default: ./preview-<name of OUTPUT>.")
def preview(output_url: str, limit: int, out_dir: str | None) -> None:
    """Write a contact sheet and a self-contained HTML gallery of the run or sweep at OUTPUT_URL.

    OUTPUT_URL is a run folder (local, s3://, ...) or a sweep root. Only committed shards are read; the page
    embeds its thumbnails and loads nothing from the network, so it opens from file:// anywhere.
    """
    from jobs.preview import PreviewError, default_out_dir, write_preview

    try:
        files = write_preview(output_url, out_dir or default_out_dir(output_url), limit=limit)
    except PreviewError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(f"{files.images} images: {files.page}\ncontact sheet: {files.sheet}")


@main.command("make-tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--preset", "preset_name", type=click.Choice(["tiny", "tiny-alt"]), default="tiny", show_default=True)
@click.option("--variations", is_flag=True,
              help="The image-variations layout: no prior, a tiny CLIP vision tower and its image processor.")
def make_tiny_model_cmd(out_dir: str, seed: int, preset_name: str, variations: bool) -> None:
    """Write a tiny random-weight Karlo in the diffusers on-disk layout to OUT_DIR."""
    from karlo_model import make_tiny_model

    path = make_tiny_model(out_dir, seed=seed, preset_name=preset_name, variations=variations)
    kind = " image-variations" if variations else ""
    click.echo(f"wrote a random-weight {preset_name}{kind} Karlo model to {path}")


@main.command("train-small")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--smoke", is_flag=True, help="A few steps of every stage (about a minute): proves the recipe; the "
              "model it writes draws nothing recognisable.")
def train_small_cmd(out_dir: str, seed: int, smoke: bool) -> None:
    """Train the small Karlo from scratch on the synthetic shapes world (karlo_model.small; sized for about 55
    minutes on 2 CPU cores) and write it to OUT_DIR as a diffusers-format repo with its training record."""
    from karlo_model.small.recipe import RECORD, train_small_model
    from karlo_model.small.train import Budget

    log = lambda line: click.echo(line, err=True)  # noqa: E731
    path = train_small_model(out_dir, seed=seed, budget=Budget.smoke() if smoke else Budget(), log=log)
    click.echo(f"wrote the small Karlo model to {path} (record: {path / RECORD})")


from jobs.bench_command import bench  # noqa: E402 - commands defined in their own modules
from jobs.convert import convert_original_cmd  # noqa: E402
from jobs.k8s import launch_rayjob_cmd, render_k8s_cmd  # noqa: E402
from jobs.submit import jobs_group, submit_cmd  # noqa: E402
from jobs.sweep.command import sweep_cmd  # noqa: E402

main.add_command(bench)
main.add_command(submit_cmd)
main.add_command(jobs_group)
main.add_command(sweep_cmd)
main.add_command(render_k8s_cmd)
main.add_command(launch_rayjob_cmd)
main.add_command(convert_original_cmd)

if __name__ == "__main__":
    # Jobs run the command as `python -m jobs.cli`; its messages name it as the user typed it.
    main(prog_name="karlo")
