"""Build the Ray Data pipeline from a RunConfig, execute it and account for every input row.

read -> prepare (validate, key, seed; drop rows already committed) -> prior -> decoder -> super-res -> encode
-> write
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

import ray

from . import crashes
from .actors import add_stage
from .catalog import CARD, SHARD_LIST, write_catalog
from .config import ConfigError, RunConfig
from .coverage import Coverage
from .duplicates import find_duplicates
from .embedded import EmbeddedModel
from .encode import ENCODE_CPUS, add_encode
from .init_images import uses_init_images
from .manifest import check_adapters, identity_changes, identity_of_run, model_identity, new_manifest, now
from .outputs import (
    MANIFEST,
    RUN_FOLDERS,
    SUCCESS,
    committed_shards,
    damaged_sources,
    output_filesystem,
    read_coverage,
    read_manifest,
)
from .placement import Reservation, placement_record, reserved
from .progress import report_progress
from .quiet import quiet_ray_data
from .reader import InputError, InputPlan, display_url, plan_inputs, read_prompts
from .redact import storage_error
from .repeats import DuplicateIndex
from .schema import prepare_and_skip
from .scope import Scope, take_rows
from .scoring import plan_scoring
from .shards import unwritable_columns
from .shared_paths import check_run_paths
from .sinks import KarloDatasink, SinkResult, check_writable, remove_uncommitted, write_json_atomic
from .stage_actors import STAGE_ACTORS, check_stage_columns
from .tasks import Task, task_of, with_init_images
from .variations import check_model_kind

logger = logging.getLogger(__name__)

# A write task assembles encoded files and uploads them: little CPU, mostly waiting on storage. It reserves no CPU:
# Ray Data caps a run's CPUs at what its autoscaling coordinator reserved for it, which can shrink to what the
# actor pools already hold (leftover fractions of a CPU are not handed out), and a write task that needs a share
# of a CPU then waits for the pools to finish: no shard is committed until the end. `concurrency` bounds them.
WRITE_CPUS = 0
PREPARE_CPUS = 0.25  # the prepare step (and column drops) beside actor pools that hold most CPUs


class OutputError(RuntimeError):
    """OUTPUT cannot be used; the message says why."""


class OutputConflict(OutputError):
    """OUTPUT already holds a run made with other settings, model or input."""


class RayStartError(RuntimeError):
    """Ray could not be started or joined; nothing was written yet."""


@dataclass
class RunSummary:
    output_url: str
    rows_in: int  # rows the run accounts for: the input rows taken (--limit), times --images-per-prompt
    written: int  # good rows committed in OUTPUT (this run and earlier attempts)
    errors: int  # error rows committed in OUTPUT
    resumed: int  # rows found already committed when this run started
    shards: int
    bad_files: list[tuple[str, str]]
    seconds: float
    images_this_run: int
    rejected: int = 0  # rows below the minimum CLIP score, committed in rejected/
    start_up_seconds: float | None = None  # until the first batch began: Ray, actor processes, model loads
    clip_scored: bool = False  # the run scores its images: good rows also have clip_img_emb/ files
    task: str = "generate"  # or "variations"
    images_per_prompt: int = 1
    left_out: int = 0  # input rows after --limit, not read

    @property
    def complete(self) -> bool:
        return self.written + self.errors + self.rejected == self.rows_in

    @property
    def images_per_second(self) -> float:
        return self.images_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_second_after_start_up(self) -> float | None:
        """The rate from the first batch on: what a long run approaches, with the fixed start-up left out."""
        if self.start_up_seconds is None or self.seconds <= self.start_up_seconds:
            return None
        return self.images_this_run / (self.seconds - self.start_up_seconds)

    @property
    def ok(self) -> bool:
        return self.complete and self.errors == 0 and not self.bad_files


def init_ray(echo: Callable[[str], None] | None = None) -> None:
    """Join the cluster a Ray user would expect, and say which in one line through ``echo``.

    RAY_ADDRESS (set inside Ray jobs) names a cluster; without it a cluster started on this machine with
    ``ray start`` is joined, as ``ray.init()`` does; otherwise (or with ``RAY_ADDRESS=local``) a private local Ray
    sized to the machine is started.
    """
    if ray.is_initialized():
        return
    quiet_ray_data()
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        ray.init(log_to_driver=True)
        _say_cluster(echo, "joined the Ray cluster at RAY_ADDRESS")
        return
    cpus = os.cpu_count() or 1
    # Ray keeps about one idle worker process per CPU and kills the rest within a second. Beside the stage and
    # encoder actors, that killed the read and write tasks' workers between tasks on a small machine, and every
    # task then paid a new process (~2 s of CPU importing Ray and pyarrow). Idle workers cost memory only.
    os.environ.setdefault("RAY_num_workers_soft_limit", str(max(16, 2 * cpus)))
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    except ValueError as e:
        # ray.init() joins a cluster that `ray start` recorded on this machine, and then refuses resource
        # arguments: join it as it is.
        if "existing cluster" not in str(e):
            raise
        ray.init(log_to_driver=True)
        _say_cluster(echo, "joined the Ray cluster started on this machine (RAY_ADDRESS=local starts a private one)")
        return
    _say_cluster(echo, "started a local Ray")


def _say_cluster(echo: Callable[[str], None] | None, what: str) -> None:
    if echo is None:
        return
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    echo(f"{what} ({ray.get_runtime_context().gcs_address}): {nodes} node{'s' * (nodes != 1)}, "
         f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")


def check_resources(cfg: RunConfig) -> None:
    """Fail before any work if the stages' CPUs cannot be placed: pools holding every CPU leave none for the read
    and prepare tasks (Ray Data then stalls silently). GPUs are checked by reserving them (pipeline.placement)."""
    cpus = ray.cluster_resources().get("CPU", 0)
    reserved = sum(s.min_actors * s.num_cpus for s in cfg.stages.values()) + ENCODE_CPUS  # + one encoder
    if reserved + 0.5 > cpus:
        raise ConfigError(
            f"the stages and the image encoder reserve {reserved:g} of the cluster's {cpus:g} CPUs at start; leave at "
            "least 0.5 CPU for the tasks that read and prepare the rows (lower num_cpus or the minimum number of "
            "actors)"
        )


@dataclass(frozen=True)
class RunPlan:
    """A run checked on the driver, before Ray starts or OUTPUT is touched: its input, model and identity."""

    cfg: RunConfig
    task: Task
    input: InputPlan
    model: str  # the Karlo repo as the driver reads it (for the embedded default: the driver's copy)
    model_ref: str | EmbeddedModel  # what the stage actors load: each node builds its own embedded default
    model_id: dict[str, Any]
    identity: dict[str, Any]  # what a rerun into the same OUTPUT must match to resume
    scope: Scope  # which rows: the first input rows taken, images per row
    clip_ref: str | EmbeddedModel | None = None  # the CLIP score stage's vision tower
    clip_record: dict[str, Any] | None = None  # what the manifest says of the scores
    scorers: dict[str, Any] | None = None  # the curation models' records (pipeline.scoring.check_scorers)


def plan_run(cfg: RunConfig) -> RunPlan:
    """Check the input (footers only), the model and the CLIP tower; raise what the user must fix (exit 2)."""
    task = task_of(cfg)
    plan, scope = take_rows(cfg, plan_inputs(cfg.input_url, cfg.storage_options, cfg.rows_per_read_task,
                                             check_columns=task.check_columns, exclude=cfg.output_url))
    unwritable = unwritable_columns(plan.schema)
    if unwritable:
        raise InputError(f"{plan.url}: columns the metadata files cannot hold: {'; '.join(unwritable)}; drop or "
                         "convert them")
    if uses_init_images(cfg, plan.schema):
        task = with_init_images(task, cfg)
    check_stage_columns(cfg.stages, task.prepared, task.stage_kwargs)
    model = cfg.model or task.embedded.path()
    model_id = model_identity(model, cfg.storage_options)
    check_model_kind(cfg.task, model_id)
    if cfg.lora:
        check_adapters(model, cfg.lora, cfg.storage_options)
    clip_ref, clip_record, scorers = plan_scoring(cfg, model, task.clip_reference)
    return RunPlan(cfg, task, plan, model, cfg.model or task.embedded, model_id,
                   identity_of_run(cfg.input_url, model_id, cfg.output_settings(), scorers), scope, clip_ref,
                   clip_record, scorers)


def run(cfg: RunConfig, *, echo: Callable[[str], None] = logger.info, progress_interval: float = 0.0,
        live: TextIO | None = None) -> RunSummary:
    """Generate every uncommitted row of ``cfg``; with ``progress_interval`` > 0, ``echo`` a status line that often
    (or with ``live``, a terminal's stream, redraw a progress bar on it every second).

    plan (driver only) -> an OUTPUT holding another run is refused, a finished one answered, both without Ray ->
    Ray, the GPUs reserved, every node able to see local paths -> OUTPUT opened, its uncommitted files removed, the
    manifest written -> the dataset built and written (:func:`execute`) -> the rows accounted for, the manifest
    closed.
    """
    started = time.time()
    p = plan_run(cfg)
    fs, root = output_filesystem(cfg.output_url, cfg.storage_options)
    previous, replace = _previous_run(cfg, fs, root, p.identity, p.scope)
    # Rows committed by earlier attempts (none once another run's files are replaced); removing uncommitted files
    # before the attempt does not change them.
    done = Coverage() if replace else read_coverage(fs, root)
    if previous is not None and done.rows >= p.scope.rows:  # every row committed: nothing needs Ray
        return _attempt(p, fs, root, started, echo, previous, replace, done, reservation=None)
    # Before OUTPUT is touched: a run that cannot be placed must not leave a manifest that refuses the fixed rerun.
    try:
        init_ray(echo)
    except Exception as e:  # ray.init fails with ConnectionError, RuntimeError or a bare Exception (start timeout)
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise RayStartError(f"Ray failed to start: {type(e).__name__}: {first_line}") from e
    with reserved(cfg.stages, timeout=cfg.placement_timeout, echo=echo) as reservation:
        check_resources(cfg)
        check_run_paths(cfg, p.input)
        return _attempt(p, fs, root, started, echo, previous, replace, done, reservation, progress_interval, live)


def _previous_run(cfg: RunConfig, fs: Any, root: str, identity: dict[str, Any],
                  scope: Scope) -> tuple[dict[str, Any] | None, bool]:
    """(the manifest of the run OUTPUT holds if it is this run (same input, model and settings, and rows that
    ``scope`` covers), whether OUTPUT holds another run to replace); another run is refused (OutputConflict) unless
    ``cfg.overwrite``. Reads only."""
    try:
        previous = read_manifest(fs, root)
    except OSError as e:  # a folder the run cannot read is one it cannot write to either: one message for both
        raise OutputError(f"cannot write to the output folder {display_url(cfg.output_url)}: "
                          f"{storage_error(e, cfg.storage_options)}") from None
    if previous is None:
        return None, False
    diff = identity_changes(previous, identity)
    other = f"a run with different settings ({diff})" if diff else scope.narrowing(previous)
    if other and not cfg.overwrite:
        raise OutputConflict(f"{display_url(cfg.output_url)} already holds {other}. Use a fresh OUTPUT, or "
                             "--overwrite to delete that run's files first.")
    return (None, True) if other else (previous, False)


def _open_output(cfg: RunConfig, fs: Any, root: str, replace: bool) -> None:
    """Make OUTPUT ready to write: created and checked writable, and with ``replace`` (``--overwrite`` of another
    run) that run's files deleted."""
    try:
        fs.makedirs(root, exist_ok=True)
        check_writable(fs, root)
    except OSError as e:
        reason = storage_error(e, cfg.storage_options)
        raise OutputError(f"cannot write to the output folder {display_url(cfg.output_url)}: {reason}") from None
    if replace:
        for folder in RUN_FOLDERS:
            if fs.exists(f"{root}/{folder}"):
                fs.rm(f"{root}/{folder}", recursive=True)
        for name in (MANIFEST, SUCCESS, SHARD_LIST, CARD):
            if fs.exists(f"{root}/{name}"):
                fs.rm(f"{root}/{name}")


def _attempt(p: RunPlan, fs: Any, root: str, started: float, echo: Callable[[str], None],
             previous: dict[str, Any] | None, replace: bool, done: Coverage, reservation: Reservation | None,
             progress_interval: float = 0.0, live: TextIO | None = None) -> RunSummary:
    """One attempt at the rows ``done`` does not cover: OUTPUT opened (``previous``: this run's manifest, ``replace``:
    another run's files to delete first), the dataset executed if rows remain, the summary and the closed
    manifest."""
    cfg = p.cfg
    _open_output(cfg, fs, root, replace)
    removed = remove_uncommitted(cfg.output_url, cfg.storage_options)
    if removed:
        echo(f"removed {len(removed)} uncommitted file(s) left by an interrupted run")
    if done.rows:
        echo(f"resuming: {done.rows} of {p.scope.rows} rows are already committed")
    manifest = new_manifest(p.identity, previous, input_rows=p.scope.rows, bad_files=p.input.bad_files,
                            stages=cfg.stages, rows_per_shard=cfg.rows_per_shard,
                            placement=placement_record(reservation), clip_score=p.clip_record, scorers=p.scorers)
    manifest.update(p.scope.record())
    write_json_atomic(fs, f"{root}/{MANIFEST}", manifest)
    if fs.exists(f"{root}/{SUCCESS}"):
        fs.rm(f"{root}/{SUCCESS}")

    sink = KarloDatasink(cfg.output_url, storage_options=cfg.storage_options, image_format=cfg.image_format,
                         output_format=cfg.output_format, rows_per_shard=cfg.rows_per_shard,
                         settings={"model": p.model_id["model"], **p.task.row_settings},
                         min_clip_score=cfg.min_clip_score, min_aesthetic=cfg.min_aesthetic,
                         drop_unsafe=cfg.drop_unsafe)
    first_batch = None
    if p.scope.rows > done.rows:
        first_batch, manifest["actors"] = execute(p, done, sink, reservation, echo, progress_interval, live)
    this_run = sink.result or SinkResult(0, 0, 0, 0)

    markers = committed_shards(cfg.output_url, cfg.storage_options)
    total = SinkResult.from_markers(markers)
    summary = RunSummary(
        output_url=display_url(cfg.output_url),
        rows_in=p.scope.rows,
        written=total.rows,
        errors=total.errors,
        resumed=done.rows,
        shards=total.shards,
        # Files whose footers parse but some data pages do not: their rows are error rows, the files named too.
        bad_files=[*p.input.bad_files, *damaged_sources(cfg.output_url, cfg.storage_options)],
        seconds=time.time() - started,
        images_this_run=this_run.rows,
        rejected=total.rejected,
        start_up_seconds=None if first_batch is None else max(0.0, first_batch - started),
        clip_scored=cfg.clip_score,
        task=p.task.name,
        images_per_prompt=p.scope.images_per_prompt,
        left_out=p.scope.left_out,
    )
    _close_manifest(manifest, summary, this_run)
    write_catalog(fs, root, markers)
    write_json_atomic(fs, f"{root}/{MANIFEST}", manifest)
    if summary.complete and not summary.left_out:  # a run over the first rows (--limit) has not finished INPUT
        write_json_atomic(fs, f"{root}/{SUCCESS}", {"finished": manifest["finished"]})
    return summary


def execute(p: RunPlan, done: Coverage, sink: KarloDatasink, reservation: Reservation | None,
            echo: Callable[[str], None], progress_interval: float,
            live: TextIO | None = None) -> tuple[float | None, list[dict[str, Any]]]:
    """read (rows ``done`` covers skipped; repeated ids marked) -> prepare (keys, seeds, validation) -> the model
    stages -> encode -> write, streamed by Ray Data; returns when the first batch began (None if unknown) and where
    the stage actors ran."""
    cfg = p.cfg
    ds = prepared_rows(p, done, find_duplicates(p.input))
    ledger = crashes.new_ledger()
    for name, stage in cfg.stages.items():
        model = p.clip_ref if name == "clip_score" else p.model_ref
        ds = add_stage(ds, STAGE_ACTORS[name], stage, cfg, model, ledger, reservation, **p.task.stage_kwargs(name))
    if p.task.drop:
        ds = ds.drop_columns(list(p.task.drop), num_cpus=PREPARE_CPUS)
    # A write task assembles the encoded files of a shard and uploads them: light CPU work, mostly waiting on
    # storage. At most one per CPU, and as many encoders.
    writers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = add_encode(ds, cfg.image_format, max_actors=writers)
    last_stage = list(cfg.stages)[-1]  # rows past it, for the progress line
    with report_progress(cfg.output_url, cfg.storage_options, total=p.scope.rows, interval=progress_interval,
                         write=echo, live=live,
                         generated=lambda: tuple(ray.get(ledger.finished_rows.remote(last_stage), timeout=30))):
        ds.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_CPUS}, concurrency=writers)
    return _first_batch_began(ledger), _actor_placements(ledger)


def prepared_rows(p: RunPlan, done: Coverage, duplicates: DuplicateIndex | None) -> ray.data.Dataset:
    """The rows the attempt makes, read and prepared: the planned rows less those ``done`` covers, each repeat of
    an earlier row's id (``duplicates``, from :func:`pipeline.duplicates.find_duplicates`) an error row."""
    ds = read_prompts(p.input, skip=done, images_per_prompt=p.scope.images_per_prompt, duplicates=duplicates)
    return ds.map_batches(prepare_and_skip, batch_format="pyarrow", num_cpus=PREPARE_CPUS,
                          fn_kwargs=dict(prepare=p.task.prepare, images_per_prompt=p.scope.images_per_prompt,
                                         **p.task.prepare_settings))


def _close_manifest(manifest: dict[str, Any], summary: RunSummary, this_run: SinkResult) -> None:
    manifest.update(
        # "limited": every row of the first input rows (--limit) is committed, the rest are not read yet.
        status=("limited" if summary.left_out else "complete") if summary.complete else "incomplete",
        bad_files=[list(b) for b in summary.bad_files],
        finished=now(),
        counts={"input_rows": summary.rows_in, "written": summary.written, "errors": summary.errors,
                "rejected": summary.rejected, "shards": summary.shards},
        last_attempt={"seconds": round(summary.seconds, 3), "images": summary.images_this_run,
                      "errors": this_run.errors, "rejected": this_run.rejected,
                      "images_per_second": round(summary.images_per_second, 4),
                      "start_up_seconds": _rounded(summary.start_up_seconds, 3),
                      "images_per_second_after_start_up": _rounded(summary.images_per_second_after_start_up, 4)},
    )


def _first_batch_began(ledger: ray.actor.ActorHandle) -> float | None:
    """When the run's first batch began (the driver's time.time()), for the start-up time; None if the ledger
    cannot say (a figure of the summary, never a reason to fail a run whose rows are committed)."""
    try:
        ago = ray.get(ledger.seconds_since_first_batch.remote(), timeout=30)
    except ray.exceptions.RayError:
        logger.warning("the crash ledger did not say when the first batch began; no start-up time is reported")
        return None
    return None if ago is None else time.time() - ago


def _actor_placements(ledger: ray.actor.ActorHandle) -> list[dict[str, Any]]:
    """Where each stage actor ran (node, GPU indices, process), restarts included; empty if the ledger cannot say."""
    try:
        return ray.get(ledger.placements.remote(), timeout=30)
    except ray.exceptions.RayError:
        logger.warning("the crash ledger did not say where the stage actors ran; the manifest leaves them out")
        return []


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
