"""``karlo bench driver-memory``: the driver's peak RSS growth while a 100k-row prompt table streams through the
pipeline."""

from __future__ import annotations

import gc
import os
import resource
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from karlo_model import make_tiny_model
from pipeline.config import RunConfig, StageConfig
from pipeline.run import init_ray, run

from .common import STAGES, ReportRow, Result
from .pipeline import write_prompts


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


@dataclass(frozen=True)
class DriverMemoryResult(Result):
    rows: int
    rows_per_s: float
    driver_rss_before_mb: float
    driver_rss_peak_mb: float

    @property
    def driver_rss_growth_mb(self) -> float:
        return self.driver_rss_peak_mb - self.driver_rss_before_mb

    def as_dict(self) -> dict:
        return {**super().as_dict(), "driver_rss_growth_mb": self.driver_rss_growth_mb}

    def report_rows(self) -> Iterable[ReportRow]:
        yield "driver", f"rows streamed (rows/s {self.rows_per_s:.4g})", self.rows
        yield "driver", "RSS before / peak MB", f"{self.driver_rss_before_mb:.1f} / {self.driver_rss_peak_mb:.1f}"
        yield "driver", "peak RSS growth MB", self.driver_rss_growth_mb


def bench_driver_memory(*, rows: int = 100_000, rows_per_shard: int = 5000) -> DriverMemoryResult:
    """The driver's peak RSS growth while ``rows`` prompt rows stream through the whole pipeline: planning, read
    tasks, prepare, the three stages, shard writes and commit bookkeeping, all real, in measurement mode (networks
    skipped) and on the small ``tiny-alt`` preset (64 px images), so that 100k rows take minutes on 2 CPUs. What
    the driver holds per row (read-task plans, block references, per-shard results) does not depend on the
    image size, which lives in the workers and the object store."""
    init_ray()
    with tempfile.TemporaryDirectory(prefix="karlo-bench-rss-") as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", preset_name="tiny-alt")
        table = Path(tmp) / "prompts.parquet"
        write_prompts(table, rows)
        stage = StageConfig(batch_size=256, num_cpus=0.25)
        cfg = RunConfig(input_url=str(table), output_url=f"{tmp}/out", model=str(model_dir), skip_networks=True,
                        rows_per_shard=rows_per_shard, stages=dict.fromkeys(STAGES, stage))
        gc.collect()
        before = _rss_bytes()
        with RssSampler() as sampler:
            summary = run(cfg)
    if summary.written != rows:
        raise RuntimeError(f"the driver-memory run wrote {summary.written} of {rows} rows")
    return DriverMemoryResult(rows=rows, rows_per_s=summary.images_per_second, driver_rss_before_mb=before / 2**20,
                              driver_rss_peak_mb=sampler.peak / 2**20)
