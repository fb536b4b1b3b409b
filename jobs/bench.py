"""Benchmarks behind ``karlo bench``. Every figure is a rate measured in one run, reported with a ratio against a
reference measured in the same run on the same machine, since absolute times on shared machines are noisy."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from karlo_model import Karlo

PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen, studio lighting",
    "an isometric illustration of a tiny city",
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


def load_diffusers_pipeline(model_dir: str, device: str, dtype: torch.dtype):
    """diffusers' UnCLIPPipeline on the same files, each component loaded with its own class (diffusers 0.42
    cannot resolve text_proj through model_index.json)."""
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(model_dir)
    pipe = UnCLIPPipeline(
        prior=PriorTransformer.from_pretrained(root / "prior"),
        decoder=UNet2DConditionModel.from_pretrained(root / "decoder"),
        text_proj=UnCLIPTextProjModel.from_pretrained(root / "text_proj"),
        super_res_first=UNet2DModel.from_pretrained(root / "super_res_first"),
        super_res_last=UNet2DModel.from_pretrained(root / "super_res_last"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        prior_scheduler=UnCLIPScheduler.from_pretrained(root / "prior_scheduler"),
        decoder_scheduler=UnCLIPScheduler.from_pretrained(root / "decoder_scheduler"),
        super_res_scheduler=UnCLIPScheduler.from_pretrained(root / "super_res_scheduler"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def bench_model(
    model_dir: str,
    *,
    batch_sizes: tuple[int, ...] = (1, 8),
    steps: tuple[int, int, int] = (25, 25, 7),
    repeats: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, Any]]:
    """images/s of Karlo.generate and of diffusers' UnCLIPPipeline on the same weights, per batch size."""
    ours = Karlo.from_pretrained(model_dir, device=device, dtype=dtype)
    theirs = load_diffusers_pipeline(model_dir, device, dtype)
    prior_steps, decoder_steps, sr_steps = steps
    results = []
    for b in batch_sizes:
        prompts, seeds = _prompts(b), list(range(b))

        def run_ours() -> int:
            ours.generate(prompts, seeds, prior_steps=prior_steps, decoder_steps=decoder_steps,
                          super_res_steps=sr_steps)
            _sync(device)
            return b

        def run_theirs() -> int:
            with torch.no_grad():
                theirs(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                       prior_num_inference_steps=prior_steps, decoder_num_inference_steps=decoder_steps,
                       super_res_num_inference_steps=sr_steps, output_type="np")
            _sync(device)
            return b

        ours_rate, theirs_rate = _rate(run_ours, repeats), _rate(run_theirs, repeats)
        results.append({"batch": b, "karlo_images_per_s": ours_rate, "diffusers_images_per_s": theirs_rate,
                        "ratio": ours_rate / theirs_rate})
    return results


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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


def bench_pipeline(
    model_dir: str,
    *,
    rows: int = 64,
    batch_size: int = 4,
    steps: tuple[int, int, int] = (25, 25, 7),
    data_plane_rows: int = 6000,
) -> dict[str, Any]:
    """Pipeline efficiency (pipeline images/s over an in-process Karlo.generate loop at the same batch size) and
    data-plane efficiency (measurement-mode rows/s over the PNG-encode bound of the same images)."""
    from pipeline.config import RunConfig, StageConfig
    from pipeline.run import init_ray, run

    prior_steps, decoder_steps, sr_steps = steps
    init_ray()
    with tempfile.TemporaryDirectory(prefix="karlo-bench-") as tmp:
        table = Path(tmp) / "prompts.parquet"
        _write_prompts(table, rows)
        model = Karlo.from_pretrained(model_dir)
        prompts = _prompts(rows)

        def loop() -> int:
            for i in range(0, rows, batch_size):
                model.generate(prompts[i : i + batch_size], list(range(i, min(i + batch_size, rows))),
                               prior_steps=prior_steps, decoder_steps=decoder_steps, super_res_steps=sr_steps)
            return rows

        t = time.perf_counter()
        in_process = loop() / (time.perf_counter() - t)

        stage = StageConfig(batch_size=batch_size, num_cpus=0.25, max_actors=os.cpu_count() or 1)
        stages = {"prior": stage, "decoder": stage, "super_res": stage}
        common = dict(model=model_dir, prior_steps=prior_steps, decoder_steps=decoder_steps,
                      super_res_steps=sr_steps, stages=stages)
        full = run(RunConfig(input_url=str(table), output_url=f"{tmp}/full", **common))
        pipeline_rate = full.images_per_second

        data_table = Path(tmp) / "data_plane.parquet"
        _write_prompts(data_table, data_plane_rows)
        # Synthetic stages cost almost nothing: one actor each, so the cores go to encoding and writing rather
        # than to starting more actor processes.
        data_stage = StageConfig(batch_size=64, num_cpus=0.25)
        plane = run(RunConfig(input_url=str(data_table), output_url=f"{tmp}/plane", skip_networks=True,
                              rows_per_shard=500, **dict(common, stages=dict.fromkeys(stages, data_stage))))
        size = model.config.image_size
        bound = png_encode_bound(min(data_plane_rows, 1000), size, os.cpu_count() or 1)
    return {
        "rows": rows,
        "batch_size": batch_size,
        "in_process_images_per_s": in_process,
        "pipeline_images_per_s": pipeline_rate,
        "pipeline_efficiency": pipeline_rate / in_process,
        "data_plane_rows": data_plane_rows,
        "data_plane_rows_per_s": plane.images_per_second,
        "png_encode_bound_per_s": bound,
        "data_plane_efficiency": plane.images_per_second / bound,
    }
