"""``karlo bench all``: the sections in one run."""

from __future__ import annotations

import torch

from karlo_model import DTYPES
from pipeline.config import DEFAULT_STEPS

from .common import Result
from .driver_memory import bench_driver_memory
from .model import ModelSource, bench_model
from .pipeline import DATA_PLANE_ROWS, bench_pipeline
from .stages import bench_stages

SECTIONS = ("model", "stages", "pipeline", "driver_memory")


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
    steps: tuple[int, int, int] = DEFAULT_STEPS,
    repeats: int = 2,
    pipeline_rows: int = 64,
    data_plane_rows: int = DATA_PLANE_ROWS,
    driver_rows: int = 100_000,
    sections: tuple[str, ...] = SECTIONS,
) -> dict[str, Result]:
    """The whole suite; the pipeline sections need a model folder (actors load it) and run on the CPU's defaults
    unless ``device`` is cuda."""
    names = {v: k for k, v in DTYPES.items()}
    out: dict[str, Result] = {}
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
