"""``karlo bench pipeline``: a real run's images/s against the bound the stage rates set, and the data plane (networks
skipped, PNG encoding and shard writes real) against the PNG-encode bound of the same images on the same cores."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from karlo_model import DTYPES, Karlo
from pipeline import columns as C
from pipeline.config import DEFAULT_STEPS, RunConfig, StageConfig, parse_stage_configs
from pipeline.outputs import COMMITS_DIR
from pipeline.run import RunSummary, init_ray, run
from pipeline.sinks import encode_image

from .common import STAGES, ReportRow, Result, mean_rate, prompts, rate, sync
from .stages import calls_at, stage_rates

# Data-plane measurement: enough rows that the fixed start-up (Ray, actor processes) weighs little, in blocks of
# DATA_PLANE_BATCH rows.
DATA_PLANE_ROWS = 20_000
DATA_PLANE_BATCH = 256


def write_prompts(path: Path, n: int) -> None:
    pq.write_table(pa.table({C.PROMPT: prompts(n), C.SEED: list(range(n))}), path)


def _pool_worker(model_dir: str, dtype: torch.dtype, batch_sizes: dict[str, int], steps: tuple[int, int, int],
                 repeats: int, threads: int, barrier: Any) -> dict[str, tuple[float, float, int]]:
    """One CPU actor's share of ``pool_stage_rates``: per stage (start, end, images) on the monotonic clock, which
    all processes of the machine share."""
    torch.set_num_threads(threads)
    model = Karlo.from_pretrained(model_dir, dtype=dtype)
    out = {}
    for name, (call, n) in calls_at(model, batch_sizes, steps).items():
        call()  # warm-up
        barrier.wait()  # every worker runs this stage at the same time
        start, done = time.monotonic(), 0
        while done < repeats * n or time.monotonic() - start < 1.0:
            call()
            done += n
        out[name] = (start, time.monotonic(), done)
    return out


def pool_stage_rates(model_dir: str, dtype: torch.dtype, batch_sizes: dict[str, int], steps: tuple[int, int, int],
                     repeats: int, *, workers: int, threads: int) -> dict[str, float]:
    """Each stage's standalone images/s as a pool of ``workers`` CPU actors (``threads`` torch threads each) runs
    it: all of them at once, in their own processes, like the pipeline's pool on these cores.

    Processes sharing a CPU's caches and memory bandwidth may each run a network slower than one process alone,
    and then one actor's rate times the number of cores sets a bound no pool reaches; measured this way, the bound
    holds whatever the machine does.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # torch's thread pools do not survive fork
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        barrier = manager.Barrier(workers)
        jobs = [pool.submit(_pool_worker, model_dir, dtype, batch_sizes, steps, repeats, threads, barrier)
                for _ in range(workers)]
        spans = [job.result() for job in jobs]
    return {name: sum(s[name][2] for s in spans) / (max(s[name][1] for s in spans) - min(s[name][0] for s in spans))
            for name in STAGES}


def _release_device_memory(device: str) -> None:
    """Hand a dropped model's GPU memory back to the device, for the actors that run next."""
    if device == "cuda":
        torch.cuda.empty_cache()


def generate_rate(model: Karlo, batch_size: int, steps: tuple[int, int, int], repeats: int) -> float:
    """images/s of an in-process ``Karlo.generate`` loop at ``batch_size`` (torch's default threads)."""
    texts, seeds = prompts(batch_size), list(range(batch_size))
    prior_steps, decoder_steps, sr_steps = steps

    def timed() -> int:
        model.generate(texts, seeds, prior_steps=prior_steps, decoder_steps=decoder_steps,
                       super_res_steps=sr_steps)
        sync(model.device)
        return batch_size

    return rate(timed, repeats)


def _encode_png_noise(args: tuple[int, int, int]) -> int:
    start, count, size = args
    for seed in range(start, start + count):
        encode_image(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8), "png")
    return count


def png_encode_bound(rows: int, size: int, workers: int) -> float:
    """images/s at which ``workers`` processes draw and PNG-encode the noise images the measurement mode makes:
    the most any pipeline could write on these cores."""
    chunk = max(1, rows // (4 * workers))
    jobs = [(s, min(chunk, rows - s), size) for s in range(0, rows, chunk)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_encode_png_noise, jobs[:workers]))  # warm the workers up
        t = time.perf_counter()
        done = sum(pool.map(_encode_png_noise, jobs))
        return done / (time.perf_counter() - t)


def _stage_configs(device: str, dtype: str, batch_size: int | None) -> dict[str, StageConfig]:
    """The run device's default stage configs, at one batch size if given."""
    stages = parse_stage_configs(None, device, dtype)
    if batch_size is None:
        return stages
    return {name: dataclasses.replace(s, batch_size=batch_size) for name, s in stages.items()}


def commit_timeline(output_dir: Path, started: float) -> tuple[float, float]:
    """(seconds from ``started`` to the first shard commit, sustained rows/s) of a local run.

    The whole-run rate of a short run mixes a fixed start-up (Ray, one process per actor, the first shard's rows
    crossing every stage) with the rate at which the pipeline streams once it is full, which is what a long run
    sees. The commit markers' modification times separate them. Sustained: the rows committed from the commit
    that passes a quarter of the rows to the one that passes three quarters, over the time between the two; the
    pipeline is full at both ends, so neither the start-up nor the drain at the end counts.
    """
    markers = (output_dir / COMMITS_DIR).glob("*.json")
    marks = sorted((p.stat().st_mtime, json.loads(p.read_text())["rows"]) for p in markers)
    if not marks:
        return float("nan"), float("nan")
    times = [t for t, _ in marks]
    done = np.cumsum([rows for _, rows in marks])
    q1 = int(np.searchsorted(done, done[-1] / 4))
    q3 = int(np.searchsorted(done, 3 * done[-1] / 4))
    if times[q3] <= times[q1]:
        return times[0] - started, float("nan")
    return times[0] - started, float(done[q3] - done[q1]) / (times[q3] - times[q1])


@dataclass(frozen=True)
class Bracketed:
    """A reference rate measured before and after the run it bounds: a shared machine's speed drifts by several per
    cent over minutes, so the two are averaged."""

    before: float
    after: float

    @property
    def rate(self) -> float:
        return mean_rate(self.before, self.after)


@dataclass(frozen=True)
class RunRates:
    """A pipeline run's whole-run rate, its start-up (until the first batch began) and its rate after it."""

    per_s: float
    start_up_s: float | None
    after_start_up: float  # nan when the run cannot tell

    @classmethod
    def of(cls, summary: RunSummary) -> RunRates:
        return cls(summary.images_per_second, summary.start_up_seconds,
                   summary.images_per_second_after_start_up or float("nan"))


@dataclass(frozen=True)
class PipelineResult(Result):
    """The pipeline against the stages' bounds, and the data plane against the PNG-encode bound."""

    rows: int
    batch_sizes: dict[str, int]
    actors_per_stage_pool: int
    pools: dict[str, Bracketed]  # each stage's rate as its pool runs it alone
    one_actor: dict[str, float]  # each stage's rate in one actor
    generate: Bracketed  # an in-process Karlo.generate loop
    pipeline: RunRates
    data_plane_rows: int
    data_plane: RunRates
    png_bound: Bracketed
    data_plane_first_commit_s: float
    data_plane_sustained_rows_per_s: float

    @property
    def stage_rates(self) -> dict[str, float]:
        return {name: self.pools[name].rate for name in STAGES}

    @property
    def slowest_stage(self) -> str:
        rates = self.stage_rates
        return min(rates, key=rates.get)

    @property
    def compute_bound(self) -> float:
        """Stages sharing one device do no better than it running their networks back to back."""
        return 1 / sum(1 / r for r in self.stage_rates.values())

    @property
    def ideal_bound(self) -> float:
        return self.actors_per_stage_pool / sum(1 / r for r in self.one_actor.values())

    def as_dict(self) -> dict[str, Any]:
        pipe, plane, bound, generate = self.pipeline, self.data_plane, self.png_bound.rate, self.generate.rate
        stage_rates = self.stage_rates
        return {
            "rows": self.rows,
            "batch_sizes": dict(self.batch_sizes),
            "actors_per_stage_pool": self.actors_per_stage_pool,
            "stage_images_per_s": stage_rates,
            "stage_images_per_s_before_after": {n: [b.before, b.after] for n, b in self.pools.items()},
            "stage_images_per_s_one_actor": dict(self.one_actor),
            "slowest_stage": self.slowest_stage,
            "slowest_stage_images_per_s": stage_rates[self.slowest_stage],
            "compute_bound_images_per_s": self.compute_bound,
            "ideal_bound_images_per_s": self.ideal_bound,
            "pipeline_images_per_s": pipe.per_s,
            "pipeline_efficiency": pipe.per_s / self.compute_bound,
            "generate_images_per_s": generate,
            "generate_images_per_s_before_after": [self.generate.before, self.generate.after],
            "pipeline_over_generate": pipe.per_s / generate,
            "pipeline_start_up_s": pipe.start_up_s,
            "pipeline_images_per_s_after_start_up": pipe.after_start_up,
            "pipeline_efficiency_after_start_up": pipe.after_start_up / self.compute_bound,
            "pipeline_over_generate_after_start_up": pipe.after_start_up / generate,
            "data_plane_rows": self.data_plane_rows,
            "data_plane_rows_per_s": plane.per_s,
            "png_encode_bound_per_s": bound,
            "png_encode_bound_before_after": [self.png_bound.before, self.png_bound.after],
            "data_plane_efficiency": plane.per_s / bound,
            "data_plane_start_up_s": plane.start_up_s,
            "data_plane_rows_per_s_after_start_up": plane.after_start_up,
            "data_plane_efficiency_after_start_up": plane.after_start_up / bound,
            "data_plane_first_commit_s": self.data_plane_first_commit_s,
            "data_plane_sustained_rows_per_s": self.data_plane_sustained_rows_per_s,
            "data_plane_sustained_efficiency": self.data_plane_sustained_rows_per_s / bound,
        }

    def report_rows(self) -> Iterable[ReportRow]:
        figures = self.as_dict()
        for name, rate_ in figures["stage_images_per_s"].items():
            yield ("pipeline", f"{name} alone, batch {self.batch_sizes[name]}: pool / 1 actor images/s",
                   f"{rate_:.4g} / {self.one_actor[name]:.4g}")
        labels = (
            ("pipeline", f"slowest stage ({self.slowest_stage})", "slowest_stage_images_per_s"),
            ("pipeline", "compute bound images/s (shared device)", "compute_bound_images_per_s"),
            ("pipeline", f"pipeline images/s ({self.rows} rows)", "pipeline_images_per_s"),
            ("pipeline", "pipeline efficiency", "pipeline_efficiency"),
            ("pipeline", "ideal bound (one actor's rate x actors)", "ideal_bound_images_per_s"),
            ("pipeline", "in-process generate images/s", "generate_images_per_s"),
            ("pipeline", "pipeline / in-process generate", "pipeline_over_generate"),
            ("pipeline", "start-up s (until the first batch began)", "pipeline_start_up_s"),
            ("pipeline", "images/s after start-up", "pipeline_images_per_s_after_start_up"),
            ("pipeline", "efficiency after start-up", "pipeline_efficiency_after_start_up"),
            ("pipeline", "after start-up / in-process generate", "pipeline_over_generate_after_start_up"),
            ("data plane", f"rows/s ({self.data_plane_rows} rows, networks skipped)", "data_plane_rows_per_s"),
            ("data plane", "PNG-encode bound rows/s", "png_encode_bound_per_s"),
            ("data plane", "data-plane efficiency", "data_plane_efficiency"),
            ("data plane", "start-up s (until the first batch began)", "data_plane_start_up_s"),
            ("data plane", "rows/s after start-up", "data_plane_rows_per_s_after_start_up"),
            ("data plane", "efficiency after start-up", "data_plane_efficiency_after_start_up"),
            ("data plane", "seconds to the first shard commit", "data_plane_first_commit_s"),
            ("data plane", "sustained rows/s (middle half of the commits)", "data_plane_sustained_rows_per_s"),
            ("data plane", "sustained efficiency", "data_plane_sustained_efficiency"),
        )
        for section, figure, key in labels:
            yield section, figure, figures[key]


def bench_pipeline(
    model_dir: str,
    *,
    rows: int = 64,
    batch_size: int | None = None,
    steps: tuple[int, int, int] = DEFAULT_STEPS,
    data_plane_rows: int = DATA_PLANE_ROWS,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 2,
) -> PipelineResult:
    """Pipeline efficiency: a real run's images/s over the bound the stages' standalone rates set at the same
    settings (stage batch sizes, device, dtype, torch threads and number of CPU actors), and data-plane efficiency:
    measurement-mode rows/s over the PNG-encode bound of the same images, all measured in this run.

    The bound: stages that share one device (a CPU's cores, one GPU) can together do no better than the device
    running their networks back to back, ``1 / sum(1 / stage rate)``, each stage's rate measured as its pool
    runs it alone: on a CPU one single-thread actor per core, all at once (``pool_stage_rates``); on a GPU one
    process. With a device per stage it is the slowest stage's rate, also reported. Also reported: the bound
    from one CPU actor's rate times the cores, and an in-process ``Karlo.generate`` loop's rate. Each reference
    is measured before and after the run it is compared with, and the two averaged.

    The references are rates of processes that already started and loaded their models. A run's whole-run rate
    also pays its start-up (Ray's worker processes, imports, model loads) once, so each run is also compared by
    its rate from its first batch on (``RunSummary.images_per_second_after_start_up``), the rate a long run
    approaches; the start-up is reported beside it.
    """
    prior_steps, decoder_steps, sr_steps = steps
    stages = _stage_configs(device, dtype, batch_size)
    batch_sizes = {name: s.batch_size for name, s in stages.items()}
    slots = (os.cpu_count() or 1) if device == "cpu" else 1
    threads = torch.get_num_threads()
    actor_threads = stages["super_res"].torch_threads if device == "cpu" else threads
    model = Karlo.from_pretrained(model_dir, device=device, dtype=DTYPES[dtype])
    torch.set_num_threads(actor_threads)
    try:
        one_actor = stage_rates(model, batch_sizes, steps, repeats)
    finally:
        torch.set_num_threads(threads)
    generate_before = generate_rate(model, batch_sizes["decoder"], steps, repeats)
    image_size = model.config.image_size
    del model  # its memory (GPU memory on cuda) goes to the pipeline's actors
    _release_device_memory(device)

    def pool_rates() -> dict[str, float]:
        if slots == 1:
            return one_actor
        return pool_stage_rates(model_dir, DTYPES[dtype], batch_sizes, steps, repeats, workers=slots,
                                threads=actor_threads)

    # The bounds are measured before and after the runs they bound (Bracketed).
    pool_before = pool_rates()
    init_ray()
    with tempfile.TemporaryDirectory(prefix="karlo-bench-") as tmp:
        table = Path(tmp) / "prompts.parquet"
        write_prompts(table, rows)
        common = dict(model=model_dir, prior_steps=prior_steps, decoder_steps=decoder_steps,
                      super_res_steps=sr_steps, device=device, dtype=dtype)
        full = run(RunConfig(input_url=str(table), output_url=f"{tmp}/full", stages=stages, **common))
        pool_after = pool_rates()
        model = Karlo.from_pretrained(model_dir, device=device, dtype=DTYPES[dtype])
        generate_after = generate_rate(model, batch_sizes["decoder"], steps, repeats)
        del model
        _release_device_memory(device)

        data_table = Path(tmp) / "data_plane.parquet"
        write_prompts(data_table, data_plane_rows)
        # Synthetic stages cost almost nothing: one CPU actor each, so the cores go to encoding and writing rather
        # than to starting more actor processes; blocks of a few hundred rows keep Ray Data's per-block work (the
        # driver's scheduling, object transfers, the ledger) small next to the encoding.
        data_stage = StageConfig(batch_size=DATA_PLANE_BATCH)
        png_bound = partial(png_encode_bound, min(data_plane_rows, 1000), image_size, os.cpu_count() or 1)
        bound_before = png_bound()
        plane_started = time.time()
        plane = run(RunConfig(input_url=str(data_table), output_url=f"{tmp}/plane", skip_networks=True,
                              rows_per_shard=500, stages=dict.fromkeys(STAGES, data_stage),
                              **dict(common, device="cpu", dtype="float32")))
        first_commit, sustained = commit_timeline(Path(tmp) / "plane", plane_started)
        bound_after = png_bound()
    return PipelineResult(
        rows=rows,
        batch_sizes=batch_sizes,
        actors_per_stage_pool=slots,
        pools={name: Bracketed(pool_before[name], pool_after[name]) for name in STAGES},
        one_actor=one_actor,
        generate=Bracketed(generate_before, generate_after),
        pipeline=RunRates.of(full),
        data_plane_rows=data_plane_rows,
        data_plane=RunRates.of(plane),
        png_bound=Bracketed(bound_before, bound_after),
        data_plane_first_commit_s=first_commit,
        data_plane_sustained_rows_per_s=sustained,
    )
