"""``karlo bench stages``: each stage alone in images/s, its model FLOPs per image (torch's FLOP counter) and the FLOP
utilisation against the device's peak (a table for known GPUs; on a CPU a matmul measured in the same run)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from karlo_model import Karlo
from pipeline.config import DEFAULT_STEPS

from .common import STAGES, ReportRow, Result, dtype_name, prompts, rate, sync

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets, per dtype; float32 is the
# CUDA-core rate (TF32 is not enabled). Matched against torch.cuda.get_device_name(), most specific first.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[torch.dtype, float]], ...] = (
    ("H200", {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9}),
    ("H100 PCIe", {torch.bfloat16: 756.0, torch.float16: 756.0, torch.float32: 51.2}),
    ("H100 NVL", {torch.bfloat16: 835.0, torch.float16: 835.0, torch.float32: 60.0}),
    ("H100", {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9}),  # SXM
    ("A100", {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 19.5}),
)


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
                return peaks[dtype] * 1e12, f"{name}: data-sheet dense {dtype_name(dtype)} peak"
        raise ValueError(f"no peak FLOP/s known for {name} in {dtype_name(dtype)}; known: "
                         f"{', '.join(k for k, _ in GPU_PEAK_TFLOPS)}")
    return measured_matmul_peak(dtype), (f"CPU, {torch.get_num_threads()} thread(s): measured {dtype_name(dtype)} "
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
    texts, seeds = prompts(n), list(range(n))
    prior_steps, decoder_steps, sr_steps = steps
    p = model.prior_stage(texts, seeds, steps=prior_steps)
    d = model.decoder_stage(p.image_embeds, p.text, p.negative, p.rng_state, steps=decoder_steps)
    return {
        "prior": lambda: model.prior_stage(texts, seeds, steps=prior_steps),
        "decoder": lambda: model.decoder_stage(p.image_embeds, p.text, p.negative, p.rng_state, steps=decoder_steps),
        "super_res": lambda: model.super_res_stage(d.image_64, d.rng_state, steps=sr_steps),
    }


def calls_at(model: Karlo, batch_sizes: dict[str, int], steps: tuple[int, int, int]
             ) -> dict[str, tuple[Callable[[], Any], int]]:
    """(call, rows) per stage at its batch size; the inputs of each batch size are made once."""
    made = {n: _stage_calls(model, n, steps) for n in set(batch_sizes.values())}
    return {name: (made[batch_sizes[name]][name], batch_sizes[name]) for name in STAGES}


def stage_rates(
    model: Karlo, batch_sizes: dict[str, int], steps: tuple[int, int, int], repeats: int
) -> dict[str, float]:
    """Each stage's standalone images/s at its batch size, in this process."""
    rates = {}
    for name, (call, n) in calls_at(model, batch_sizes, steps).items():

        def timed(call=call, n=n) -> int:
            call()
            sync(model.device)
            return n

        rates[name] = rate(timed, repeats)
    return rates


@dataclass(frozen=True)
class StageFigures:
    stage: str
    images_per_s: float
    gflop_per_image: float
    flop_share: float  # of the three stages' FLOPs per image
    flop_utilisation: float  # of the device's peak


@dataclass(frozen=True)
class StagesResult(Result):
    batch_size: int
    peak_tflops: float
    peak_source: str
    stages: list[StageFigures]

    def report_rows(self) -> Iterable[ReportRow]:
        yield "stages", "peak TFLOP/s", f"{self.peak_tflops:.4g} ({self.peak_source})"
        for row in self.stages:
            yield ("stages", f"{row.stage} (batch {self.batch_size}): images/s, GFLOP/image",
                   f"{row.images_per_s:.4g}, {row.gflop_per_image:.4g} ({row.flop_share:.0%} of the FLOPs)")
            yield "stages", f"{row.stage}: FLOP utilisation", f"{row.flop_utilisation:.2%}"


def bench_stages(
    model: Karlo,
    *,
    batch_size: int = 4,
    steps: tuple[int, int, int] = DEFAULT_STEPS,
    repeats: int = 2,
) -> StagesResult:
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
    rows = [StageFigures(stage=name, images_per_s=rates[name], gflop_per_image=flops[name] / 1e9,
                         flop_share=flops[name] / total, flop_utilisation=flops[name] * rates[name] / peak)
            for name in STAGES]
    return StagesResult(batch_size=batch_size, peak_tflops=peak / 1e12, peak_source=peak_source, stages=rows)
