"""Benchmarks behind ``karlo bench``. Every figure is a rate measured in one run, reported with a ratio against a
reference measured in the same run on the same machine, since absolute times on shared machines are noisy.

* :mod:`~jobs.bench.model`: ``Karlo.generate`` against diffusers' ``UnCLIPPipeline`` on the same weights and
  device, per batch size;
* :mod:`~jobs.bench.stages`: each stage alone in images/s, its model FLOPs per image (torch's FLOP counter) and
  the FLOP utilisation against the device's peak (a table for known GPUs; on a CPU a matmul measured in the same
  run);
* :mod:`~jobs.bench.pipeline`: a real run's images/s against the bound the stage rates set, and the data plane
  (networks skipped, PNG encoding and shard writes real) against the PNG-encode bound of the same images on the
  same cores;
* :mod:`~jobs.bench.driver_memory`: the driver's peak RSS growth while a 100k-row prompt table streams through the
  pipeline.

Each section returns a result object (:class:`~jobs.bench.common.Result`) that renders its own report rows and
its JSON figures; docs/benchmarks.md records the measurements.
"""

from .common import STAGES, Result, as_json, format_report
from .driver_memory import DriverMemoryResult, RssSampler, _rss_bytes, bench_driver_memory
from .model import ModelResult, ModelSource, bench_model, diffusers_pipeline
from .pipeline import PipelineResult, bench_pipeline, commit_timeline, png_encode_bound
from .stages import StagesResult, _count_cpu_attention, bench_stages, device_peak
from .suite import SECTIONS, bench_all

__all__ = [
    "SECTIONS",
    "STAGES",
    "DriverMemoryResult",
    "ModelResult",
    "ModelSource",
    "PipelineResult",
    "Result",
    "RssSampler",
    "StagesResult",
    "_count_cpu_attention",  # the FLOP-count tests register the CPU attention kernel too
    "_rss_bytes",
    "as_json",
    "bench_all",
    "bench_driver_memory",
    "bench_model",
    "bench_pipeline",
    "bench_stages",
    "commit_timeline",
    "device_peak",
    "diffusers_pipeline",
    "format_report",
    "png_encode_bound",
]
