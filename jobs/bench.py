"""Benchmarks behind ``karlo bench``. Every figure is a rate measured in one run, reported with a ratio against a
reference measured in the same run on the same machine, since absolute times on shared machines are noisy.

* model: ``Karlo.generate`` against diffusers' ``UnCLIPPipeline`` on the same weights and device, per batch size;
* stages: each stage alone in images/s, its model FLOPs per image (torch's FLOP counter) and the FLOP utilisation
  against the device's peak (a table for known GPUs; on a CPU a matmul measured in the same run);
* pipeline: a real run's images/s against the bound the stage rates set, and the data plane (networks skipped,
  PNG encoding and shard writes real) against the PNG-encode bound of the same images on the same cores;
* driver memory: the driver's peak RSS growth while a 100k-row prompt table streams through the pipeline.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import resource
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from karlo_model import Karlo, make_tiny_model, preset

PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen, studio lighting",
    "an isometric illustration of a tiny city",
)
STAGES = ("prior", "decoder", "super_res")
# Data-plane measurement: enough rows that the fixed start-up (Ray, actor processes) weighs little, in blocks of
# DATA_PLANE_BATCH rows.
DATA_PLANE_ROWS = 20_000
DATA_PLANE_BATCH = 256

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets, per dtype; float32 is the
# CUDA-core rate (TF32 is not enabled). Matched against torch.cuda.get_device_name(), most specific first.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[torch.dtype, float]], ...] = (
    ("H200", {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9}),
    ("H100 PCIe", {torch.bfloat16: 756.0, torch.float16: 756.0, torch.float32: 51.2}),
    ("H100 NVL", {torch.bfloat16: 835.0, torch.float16: 835.0, torch.float32: 60.0}),
    ("H100", {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9}),  # SXM
    ("A100", {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 19.5}),
)


def _prompts(n: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]}, variation {i}" for i in range(n)]


def _rate(fn: Callable[[], int], repeats: int) -> float:
    """Median items/s over ``repeats`` timed calls, after one untimed warm-up call."""
    fn()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSource:
    """A diffusers-format repo on disk, or a preset's shapes with random weights built on the device."""

    model_dir: str | None = None
    preset: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.model_dir is None) == (self.preset is None):
            raise ValueError("give either a model folder or a preset with random weights")

    def load(self, device: str, dtype: torch.dtype, *, fast: bool | None, compile: bool) -> Karlo:
        if self.model_dir is not None:
            return Karlo.from_pretrained(self.model_dir, device=device, dtype=dtype, fast=fast, compile=compile)
        return Karlo.from_config(preset(self.preset), device, dtype, seed=self.seed, fast=fast, compile=compile)

    def describe(self) -> str:
        return self.model_dir if self.model_dir is not None else f"{self.preset} (random weights)"


def diffusers_pipeline(model: Karlo, dtype: torch.dtype):
    """diffusers' UnCLIPPipeline holding copies of ``model``'s weights, on its device in ``dtype``. Built from the
    in-memory model, so a full-size random model needs no checkpoint on disk."""
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    classes = {"prior": PriorTransformer, "decoder": UNet2DConditionModel, "text_proj": UnCLIPTextProjModel,
               "super_res_first": UNet2DModel, "super_res_last": UNet2DModel}
    parts: dict[str, Any] = {}
    for name, cls in classes.items():
        with torch.device(model.device):
            net = cls.from_config(getattr(model.config, name).to_dict())
        net.load_state_dict(model.modules[name].state_dict())  # strict: the key layouts are the same
        parts[name] = net
    schedulers = {name: UnCLIPScheduler.from_config(getattr(model.config, name).to_dict())
                  for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")}
    pipe = UnCLIPPipeline(text_encoder=copy.deepcopy(model.modules["text_encoder"]), tokenizer=model.tokenizer,
                          **parts, **schedulers)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=model.device, dtype=dtype)


def bench_model(
    source: ModelSource,
    *,
    batch_sizes: tuple[int, ...] = (1, 4, 8),
    steps: tuple[int, int, int] = (25, 25, 7),
    repeats: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    reference_dtype: torch.dtype | None = None,
    fast: bool | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """images/s of Karlo.generate and of diffusers' UnCLIPPipeline (in ``reference_dtype``, default ``dtype``) on
    the same weights, per batch size; the ratios at batch 1 and at each one's best batch size."""
    ours = source.load(device, dtype, fast=fast, compile=compile)
    theirs = diffusers_pipeline(ours, reference_dtype or dtype)
    prior_steps, decoder_steps, sr_steps = steps
    rows = []
    for b in batch_sizes:
        prompts, seeds = _prompts(b), list(range(b))

        def run_ours() -> int:
            ours.generate(prompts, seeds, prior_steps=prior_steps, decoder_steps=decoder_steps,
                          super_res_steps=sr_steps)
            _sync(ours.device)
            return b

        def run_theirs() -> int:
            with torch.no_grad():
                theirs(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                       prior_num_inference_steps=prior_steps, decoder_num_inference_steps=decoder_steps,
                       super_res_num_inference_steps=sr_steps, output_type="np")
            _sync(ours.device)
            return b

        ours_rate, theirs_rate = _rate(run_ours, repeats), _rate(run_theirs, repeats)
        rows.append({"batch": b, "karlo_images_per_s": ours_rate, "diffusers_images_per_s": theirs_rate,
                     "ratio": ours_rate / theirs_rate})
    best_ours = max(rows, key=lambda r: r["karlo_images_per_s"])
    best_theirs = max(rows, key=lambda r: r["diffusers_images_per_s"])
    summary = {
        "model": source.describe(),
        "device": str(ours.device),
        "karlo": {"dtype": _name(dtype), "fast": ours.fast, "compile": compile},
        "diffusers_dtype": _name(reference_dtype or dtype),
        "best_karlo_batch": best_ours["batch"],
        "best_diffusers_batch": best_theirs["batch"],
        "best_ratio": best_ours["karlo_images_per_s"] / best_theirs["diffusers_images_per_s"],
    }
    if rows[0]["batch"] == 1:
        summary["batch_1_ratio"] = rows[0]["ratio"]
    return {"batches": rows, **summary}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------- stages


def _count_cpu_attention() -> None:
    """torch's FLOP counter knows the CUDA attention kernels; count the CPU one with the same formula."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(op, get_raw=True)(flop_counter.sdpa_flop)  # already shape-wrapped


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for ``device`` in ``dtype``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_TFLOPS:
            if key in name and dtype in peaks:
                return peaks[dtype] * 1e12, f"{name}: data-sheet dense {_name(dtype)} peak"
        raise ValueError(f"no peak FLOP/s known for {name} in {_name(dtype)}; known: "
                         f"{', '.join(k for k, _ in GPU_PEAK_TFLOPS)}")
    return measured_matmul_peak(dtype), (f"CPU, {torch.get_num_threads()} thread(s): measured {_name(dtype)} "
                                         "matmul, same run")


def measured_matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` n x n matmuls on the CPU with the current thread count."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _stage_calls(model: Karlo, n: int, steps: tuple[int, int, int]) -> dict[str, Callable[[], Any]]:
    """One call per stage on a batch of ``n`` rows; the later stages' inputs are made once, here."""
    prompts, seeds = _prompts(n), list(range(n))
    prior_steps, decoder_steps, sr_steps = steps
    p = model.prior_stage(prompts, seeds, steps=prior_steps)
    d = model.decoder_stage(p.image_embeds, p.text, p.negative, p.rng_state, steps=decoder_steps)
    return {
        "prior": lambda: model.prior_stage(prompts, seeds, steps=prior_steps),
        "decoder": lambda: model.decoder_stage(p.image_embeds, p.text, p.negative, p.rng_state, steps=decoder_steps),
        "super_res": lambda: model.super_res_stage(d.image_64, d.rng_state, steps=sr_steps),
    }


def _calls_at(model: Karlo, batch_sizes: dict[str, int], steps: tuple[int, int, int]
              ) -> dict[str, tuple[Callable[[], Any], int]]:
    """(call, rows) per stage at its batch size; the inputs of each batch size are made once."""
    made = {n: _stage_calls(model, n, steps) for n in set(batch_sizes.values())}
    return {name: (made[batch_sizes[name]][name], batch_sizes[name]) for name in STAGES}


def stage_rates(
    model: Karlo, batch_sizes: dict[str, int], steps: tuple[int, int, int], repeats: int
) -> dict[str, float]:
    """Each stage's standalone images/s at its batch size, in this process."""
    rates = {}
    for name, (call, n) in _calls_at(model, batch_sizes, steps).items():

        def timed(call=call, n=n) -> int:
            call()
            _sync(model.device)
            return n

        rates[name] = _rate(timed, repeats)
    return rates


def _pool_worker(model_dir: str, dtype: torch.dtype, batch_sizes: dict[str, int], steps: tuple[int, int, int],
                 repeats: int, threads: int, barrier: Any) -> dict[str, tuple[float, float, int]]:
    """One CPU actor's share of ``pool_stage_rates``: per stage (start, end, images) on the monotonic clock, which
    all processes of the machine share."""
    torch.set_num_threads(threads)
    model = Karlo.from_pretrained(model_dir, dtype=dtype)
    out = {}
    for name, (call, n) in _calls_at(model, batch_sizes, steps).items():
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


def _mean_rate(*rates: float) -> float:
    """The rate of the measurements together: the mean of their seconds per item."""
    return len(rates) / sum(1 / r for r in rates)


def generate_rate(model: Karlo, batch_size: int, steps: tuple[int, int, int], repeats: int) -> float:
    """images/s of an in-process ``Karlo.generate`` loop at ``batch_size`` (torch's default threads)."""
    prompts, seeds = _prompts(batch_size), list(range(batch_size))
    prior_steps, decoder_steps, sr_steps = steps

    def timed() -> int:
        model.generate(prompts, seeds, prior_steps=prior_steps, decoder_steps=decoder_steps,
                       super_res_steps=sr_steps)
        _sync(model.device)
        return batch_size

    return _rate(timed, repeats)


def bench_stages(
    model: Karlo,
    *,
    batch_size: int = 4,
    steps: tuple[int, int, int] = (25, 25, 7),
    repeats: int = 2,
) -> dict[str, Any]:
    """Each stage alone at ``batch_size``: images/s, model FLOPs per image (matmuls, convolutions and attention,
    counted by torch.utils.flop_counter on one image with guidance) and FLOP utilisation against the peak."""
    _count_cpu_attention()
    peak, peak_source = device_peak(model.device, model.dtype)
    flops = {}
    for name, call in _stage_calls(model, 1, steps).items():
        with FlopCounterMode(display=False) as counter:
            call()
        flops[name] = counter.get_total_flops()
    rates = stage_rates(model, dict.fromkeys(STAGES, batch_size), steps, repeats)
    total = sum(flops.values())
    rows = [{"stage": name, "images_per_s": rates[name], "gflop_per_image": flops[name] / 1e9,
             "flop_share": flops[name] / total, "flop_utilisation": flops[name] * rates[name] / peak}
            for name in STAGES]
    return {"batch_size": batch_size, "peak_tflops": peak / 1e12, "peak_source": peak_source, "stages": rows}


# ---------------------------------------------------------------------------------------------- pipeline


def _write_prompts(path: Path, n: int) -> None:
    pq.write_table(pa.table({"prompt": _prompts(n), "seed": list(range(n))}), path)


def _encode_png_noise(args: tuple[int, int, int]) -> int:
    from pipeline.sinks import encode_image

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


def _stage_configs(device: str, dtype: str, batch_size: int | None) -> dict:
    """The run device's default stage configs, at one batch size if given."""
    import dataclasses

    from pipeline.config import parse_stage_configs

    stages = parse_stage_configs(None, device, dtype)
    if batch_size is None:
        return stages
    return {name: dataclasses.replace(s, batch_size=batch_size) for name, s in stages.items()}


def bench_pipeline(
    model_dir: str,
    *,
    rows: int = 64,
    batch_size: int | None = None,
    steps: tuple[int, int, int] = (25, 25, 7),
    data_plane_rows: int = DATA_PLANE_ROWS,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 2,
) -> dict[str, Any]:
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
    from pipeline.config import RunConfig, StageConfig
    from pipeline.run import init_ray, run
    from karlo_model import DTYPES

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

    # The bounds are measured before and after the runs they bound, and averaged: a shared machine's speed drifts
    # by several per cent over minutes.
    pool_before = pool_rates()
    init_ray()
    with tempfile.TemporaryDirectory(prefix="karlo-bench-") as tmp:
        table = Path(tmp) / "prompts.parquet"
        _write_prompts(table, rows)
        common = dict(model=model_dir, prior_steps=prior_steps, decoder_steps=decoder_steps,
                      super_res_steps=sr_steps, device=device, dtype=dtype)
        full = run(RunConfig(input_url=str(table), output_url=f"{tmp}/full", stages=stages, **common))
        pipeline_rate = full.images_per_second
        pipeline_after = full.images_per_second_after_start_up or float("nan")
        pool_after = pool_rates()
        model = Karlo.from_pretrained(model_dir, device=device, dtype=DTYPES[dtype])
        generate_after = generate_rate(model, batch_sizes["decoder"], steps, repeats)
        generate = _mean_rate(generate_before, generate_after)
        del model
        _release_device_memory(device)
        pool = {name: _mean_rate(pool_before[name], pool_after[name]) for name in STAGES}
        shared_bound = 1 / sum(1 / r for r in pool.values())
        slowest = min(pool, key=pool.get)

        data_table = Path(tmp) / "data_plane.parquet"
        _write_prompts(data_table, data_plane_rows)
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
        plane_after = plane.images_per_second_after_start_up or float("nan")
        bound_after = png_bound()
        bound = _mean_rate(bound_before, bound_after)
    return {
        "rows": rows,
        "batch_sizes": batch_sizes,
        "actors_per_stage_pool": slots,
        "stage_images_per_s": pool,
        "stage_images_per_s_before_after": {name: [pool_before[name], pool_after[name]] for name in STAGES},
        "stage_images_per_s_one_actor": one_actor,
        "slowest_stage": slowest,
        "slowest_stage_images_per_s": pool[slowest],
        "compute_bound_images_per_s": shared_bound,
        "ideal_bound_images_per_s": slots / sum(1 / r for r in one_actor.values()),
        "pipeline_images_per_s": pipeline_rate,
        "pipeline_efficiency": pipeline_rate / shared_bound,
        "generate_images_per_s": generate,
        "generate_images_per_s_before_after": [generate_before, generate_after],
        "pipeline_over_generate": pipeline_rate / generate,
        "pipeline_start_up_s": full.start_up_seconds,
        "pipeline_images_per_s_after_start_up": pipeline_after,
        "pipeline_efficiency_after_start_up": pipeline_after / shared_bound,
        "pipeline_over_generate_after_start_up": pipeline_after / generate,
        "data_plane_rows": data_plane_rows,
        "data_plane_rows_per_s": plane.images_per_second,
        "png_encode_bound_per_s": bound,
        "png_encode_bound_before_after": [bound_before, bound_after],
        "data_plane_efficiency": plane.images_per_second / bound,
        "data_plane_start_up_s": plane.start_up_seconds,
        "data_plane_rows_per_s_after_start_up": plane_after,
        "data_plane_efficiency_after_start_up": plane_after / bound,
        "data_plane_first_commit_s": first_commit,
        "data_plane_sustained_rows_per_s": sustained,
        "data_plane_sustained_efficiency": sustained / bound,
    }


def commit_timeline(output_dir: Path, started: float) -> tuple[float, float]:
    """(seconds from ``started`` to the first shard commit, sustained rows/s) of a local run.

    The whole-run rate of a short run mixes a fixed start-up (Ray, one process per actor, the first shard's rows
    crossing every stage) with the rate at which the pipeline streams once it is full, which is what a long run
    sees. The commit markers' modification times separate them. Sustained: the rows committed from the commit
    that passes a quarter of the rows to the one that passes three quarters, over the time between the two; the
    pipeline is full at both ends, so neither the start-up nor the drain at the end counts.
    """
    markers = (output_dir / "_commits").glob("*.json")
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


# ---------------------------------------------------------------------------------------------- driver memory


def _rss_bytes() -> int:
    """This process's resident set size now (Linux /proc); elsewhere its peak so far, an upper bound."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class RssSampler:
    """Samples the process's RSS every ``interval`` seconds on a thread; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def bench_driver_memory(*, rows: int = 100_000, rows_per_shard: int = 5000) -> dict[str, Any]:
    """The driver's peak RSS growth while ``rows`` prompt rows stream through the whole pipeline: planning, read
    tasks, prepare, the three stages, shard writes and commit bookkeeping, all real, in measurement mode (networks
    skipped) and on the small ``tiny-alt`` preset (64 px images), so that 100k rows take minutes on 2 CPUs. What
    the driver holds per row (read-task plans, block references, per-shard results) does not depend on the
    image size, which lives in the workers and the object store."""
    from pipeline.config import RunConfig, StageConfig
    from pipeline.run import init_ray, run

    init_ray()
    with tempfile.TemporaryDirectory(prefix="karlo-bench-rss-") as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", preset_name="tiny-alt")
        table = Path(tmp) / "prompts.parquet"
        _write_prompts(table, rows)
        stage = StageConfig(batch_size=256, num_cpus=0.25)
        cfg = RunConfig(input_url=str(table), output_url=f"{tmp}/out", model=str(model_dir), skip_networks=True,
                        rows_per_shard=rows_per_shard, stages=dict.fromkeys(STAGES, stage))
        gc.collect()
        before = _rss_bytes()
        with RssSampler() as sampler:
            summary = run(cfg)
    if summary.written != rows:
        raise RuntimeError(f"the driver-memory run wrote {summary.written} of {rows} rows")
    return {
        "rows": rows,
        "rows_per_s": summary.images_per_second,
        "driver_rss_before_mb": before / 2**20,
        "driver_rss_peak_mb": sampler.peak / 2**20,
        "driver_rss_growth_mb": (sampler.peak - before) / 2**20,
    }


# ---------------------------------------------------------------------------------------------- the suite


def bench_all(
    source: ModelSource,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    reference_dtype: torch.dtype | None = None,
    fast: bool | None = None,
    compile: bool = False,
    batch_sizes: tuple[int, ...] = (1, 4, 8),
    stage_batch_size: int = 4,
    steps: tuple[int, int, int] = (25, 25, 7),
    repeats: int = 2,
    pipeline_rows: int = 64,
    data_plane_rows: int = DATA_PLANE_ROWS,
    driver_rows: int = 100_000,
    sections: tuple[str, ...] = ("model", "stages", "pipeline", "driver_memory"),
) -> dict[str, Any]:
    """The whole suite; the pipeline sections need a model folder (actors load it) and run on the CPU's defaults
    unless ``device`` is cuda."""
    from karlo_model import DTYPES

    names = {v: k for k, v in DTYPES.items()}
    out: dict[str, Any] = {}
    if "model" in sections:
        out["model"] = bench_model(source, batch_sizes=batch_sizes, steps=steps, repeats=repeats, device=device,
                                   dtype=dtype, reference_dtype=reference_dtype, fast=fast, compile=compile)
    if "stages" in sections:
        model = source.load(device, dtype, fast=fast, compile=compile)
        out["stages"] = bench_stages(model, batch_size=stage_batch_size, steps=steps, repeats=repeats)
        del model
    if "pipeline" in sections:
        if source.model_dir is None:
            raise ValueError("the pipeline benchmark loads the model in Ray actors: give a model folder")
        out["pipeline"] = bench_pipeline(source.model_dir, rows=pipeline_rows, steps=steps,
                                         data_plane_rows=data_plane_rows, device=device, dtype=names[dtype],
                                         repeats=repeats,
                                         batch_size=stage_batch_size if device == "cpu" else None)
    if "driver_memory" in sections:
        out["driver_memory"] = bench_driver_memory(rows=driver_rows)
    return out


def format_report(result: dict[str, Any]) -> str:
    """One plain-text table: section, figure, value."""
    lines = [f"{'section':<14}{'figure':<52}value"]

    def add(section: str, figure: str, value: Any) -> None:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{section:<14}{figure:<52}{text}")

    model = result.get("model")
    if model:
        add("model", "model", model["model"])
        add("model", "karlo / diffusers dtype", f"{model['karlo']['dtype']} (fast={model['karlo']['fast']}, "
                                                f"compile={model['karlo']['compile']}) / {model['diffusers_dtype']}")
        for row in model["batches"]:
            add("model", f"batch {row['batch']}: karlo / diffusers images/s",
                f"{row['karlo_images_per_s']:.4g} / {row['diffusers_images_per_s']:.4g}  ratio {row['ratio']:.3f}")
        if "batch_1_ratio" in model:
            add("model", "ratio at batch 1", model["batch_1_ratio"])
        add("model", f"ratio best/best (batch {model['best_karlo_batch']} / {model['best_diffusers_batch']})",
            model["best_ratio"])
    stages = result.get("stages")
    if stages:
        add("stages", "peak TFLOP/s", f"{stages['peak_tflops']:.4g} ({stages['peak_source']})")
        for row in stages["stages"]:
            add("stages", f"{row['stage']} (batch {stages['batch_size']}): images/s, GFLOP/image",
                f"{row['images_per_s']:.4g}, {row['gflop_per_image']:.4g} ({row['flop_share']:.0%} of the FLOPs)")
            add("stages", f"{row['stage']}: FLOP utilisation", f"{row['flop_utilisation']:.2%}")
    pipe = result.get("pipeline")
    if pipe:
        for name, rate in pipe["stage_images_per_s"].items():
            add("pipeline", f"{name} alone, batch {pipe['batch_sizes'][name]}: pool / 1 actor images/s",
                f"{rate:.4g} / {pipe['stage_images_per_s_one_actor'][name]:.4g}")
        rows = (
            ("pipeline", f"slowest stage ({pipe['slowest_stage']})", "slowest_stage_images_per_s"),
            ("pipeline", "compute bound images/s (shared device)", "compute_bound_images_per_s"),
            ("pipeline", f"pipeline images/s ({pipe['rows']} rows)", "pipeline_images_per_s"),
            ("pipeline", "pipeline efficiency", "pipeline_efficiency"),
            ("pipeline", "ideal bound (one actor's rate x actors)", "ideal_bound_images_per_s"),
            ("pipeline", "in-process generate images/s", "generate_images_per_s"),
            ("pipeline", "pipeline / in-process generate", "pipeline_over_generate"),
            ("pipeline", "start-up s (until the first batch began)", "pipeline_start_up_s"),
            ("pipeline", "images/s after start-up", "pipeline_images_per_s_after_start_up"),
            ("pipeline", "efficiency after start-up", "pipeline_efficiency_after_start_up"),
            ("pipeline", "after start-up / in-process generate", "pipeline_over_generate_after_start_up"),
            ("data plane", f"rows/s ({pipe['data_plane_rows']} rows, networks skipped)", "data_plane_rows_per_s"),
            ("data plane", "PNG-encode bound rows/s", "png_encode_bound_per_s"),
            ("data plane", "data-plane efficiency", "data_plane_efficiency"),
            ("data plane", "start-up s (until the first batch began)", "data_plane_start_up_s"),
            ("data plane", "rows/s after start-up", "data_plane_rows_per_s_after_start_up"),
            ("data plane", "efficiency after start-up", "data_plane_efficiency_after_start_up"),
            ("data plane", "seconds to the first shard commit", "data_plane_first_commit_s"),
            ("data plane", "sustained rows/s (middle half of the commits)", "data_plane_sustained_rows_per_s"),
            ("data plane", "sustained efficiency", "data_plane_sustained_efficiency"),
        )
        for section, figure, key in rows:
            add(section, figure, pipe[key])
    mem = result.get("driver_memory")
    if mem:
        add("driver", f"rows streamed (rows/s {mem['rows_per_s']:.4g})", mem["rows"])
        add("driver", "RSS before / peak MB", f"{mem['driver_rss_before_mb']:.1f} / {mem['driver_rss_peak_mb']:.1f}")
        add("driver", "peak RSS growth MB", mem["driver_rss_growth_mb"])
    return "\n".join(lines)
