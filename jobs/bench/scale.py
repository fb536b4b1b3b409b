"""``karlo bench scale``: planning, resume and the duplicate-id pass at 10^7 and 10^8 rows, up to the first batch.

For each size it builds a prompt table with ids (a few per cent of them repeating an earlier row's id) in files
of a million rows, and an OUTPUT that holds half of the rows committed as a killed run leaves them: commit
markers and key-only metadata tables, no images, every hundredth shard of the committed half missing (the shards
in flight when the run died). Then a fresh process runs the real steps of a resumed run (plan the input from its
footers, read the coverage from the markers, find the repeated ids on the cluster, read and prepare) until the
first prepared batch, and reports each step's seconds, the driver's peak RSS growth and each kind of Ray worker's
peak RSS and peak private memory (sampled from /proc every 0.1 s: Linux only). Private memory leaves out what
every process maps and the machine holds once: shared libraries (~90 MB in a Ray worker) and the object store's
pages a worker has read or written.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue as queue_module
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import columns as C
from pipeline.config import RunConfig
from pipeline.coverage import INPUT_ROWS, contains

from .common import ReportRow, Result
from .driver_memory import RssSampler, _rss_bytes

FILE_ROWS = 1_000_000
BLOCK_ROWS = 64  # the default rows_per_read_task: a committed shard lists its blocks' intervals
MISSING_EVERY = 100  # every 100th committed shard is missing: in flight when the run died


def _ids(start: int, n: int, rng: np.random.Generator, duplicates: float) -> pa.Array:
    """Ids of plan rows [start, start + n): "r<row>", a ``duplicates`` share of them an earlier row's id."""
    number = np.arange(start, start + n, dtype=np.int64)
    repeat = rng.random(n) < duplicates
    number[repeat] = (rng.random(int(repeat.sum())) * number[repeat]).astype(np.int64)
    return pc.binary_join_element_wise("r", pc.cast(pa.array(number), pa.string()), "")


def build_input(folder: Path, rows: int, duplicates: float, seed: int = 0) -> None:
    """``rows`` prompt rows with ids in files of FILE_ROWS rows (one row group each, pyarrow's default size)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, start in enumerate(range(0, rows, FILE_ROWS)):
        ids = _ids(start, min(FILE_ROWS, rows - start), rng, duplicates)
        prompts = pc.binary_join_element_wise("a photograph of scene ", ids, "")
        pq.write_table(pa.table({C.PROMPT: prompts, C.ID: ids}), folder / f"part-{i:05d}.parquet",
                       row_group_size=FILE_ROWS)


def build_output(root: Path, cfg: RunConfig, committed: float, rows_per_shard: int) -> int:
    """OUTPUT holding the first ``committed`` share of the planned rows as a killed resumable run leaves them;
    returns the committed rows. The keys in the tables are the rows' places: resume does not read them."""
    from pipeline.run import plan_run

    p = plan_run(cfg)
    (root / "_commits").mkdir(parents=True)
    (root / "metadata").mkdir()
    (root / "manifest.json").write_text(json.dumps({"identity": p.identity, **p.scope.record()}))
    limit, done, shard, written = int(p.input.total_rows * committed), 0, 0, 0
    for f in p.input.files:
        for start in range(0, f.num_rows, rows_per_shard):
            if done >= limit:
                return written
            stop = min(f.num_rows, start + rows_per_shard)
            shard += 1
            done += stop - start
            if shard % MISSING_EVERY:
                _write_shard(root, f"{shard:016x}", f.source, start, stop)
                written += stop - start
    return written


def _write_shard(root: Path, shard: str, source: str, start: int, stop: int) -> None:
    rows = pa.array(np.arange(start, stop, dtype=np.int64))
    keys = pc.binary_join_element_wise(f"{source.replace('/', '_')}-", pc.cast(rows, pa.string()), "")
    name = f"metadata/metadata_{shard}.parquet"
    pq.write_table(pa.table({C.KEY: keys, C.SOURCE: [source] * len(rows), C.SOURCE_ROW: rows}), root / name)
    blocks = [x for a in range(start, stop, BLOCK_ROWS) for x in (a, min(stop, a + BLOCK_ROWS))]
    marker = {"shard": shard, "rows": stop - start, "errors": 0, "rejected": 0, "files": [name], "bytes": 0,
              INPUT_ROWS: [[source, 0, blocks]]}
    (root / "_commits" / f"{shard}.json").write_text(json.dumps(marker))


class WorkerRss:
    """The peak RSS and peak private memory (RssAnon: neither shared libraries nor object-store pages) of each Ray
    worker process, sampled on a thread, by what the process was running (Ray titles a worker
    ``ray::<task or actor>``)."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peaks: dict[str, tuple[int, int]] = {}  # title -> (RSS, RssAnon) bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read(200).split(b"\0")[0].decode(errors="replace")
                    if not title.startswith("ray::") or title == "ray::IDLE":
                        continue  # an idle worker's RSS is what its last task left
                    with open(f"/proc/{pid}/status") as f:
                        kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
                              if k in ("VmRSS", "RssAnon")}
                    rss, anon = self.peaks.get(title, (0, 0))
                    self.peaks[title] = (max(rss, kb["VmRSS"] * 1024), max(anon, kb["RssAnon"] * 1024))
                except (OSError, KeyError):
                    continue  # the process ended

    def peak(self, which: int) -> tuple[str, int]:
        """(what the process ran, bytes) of the largest RSS (``which`` 0) or private memory (1); ("", 0) if none."""
        return max(((t, p[which]) for t, p in self.peaks.items()), key=lambda item: item[1], default=("", 0))

    def __enter__(self) -> WorkerRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def measure(cfg: RunConfig) -> dict[str, Any]:
    """A resumed run's steps up to its first prepared batch, in this process: seconds per step and peak RSS."""
    from pipeline.duplicates import find_duplicates
    from pipeline.outputs import output_filesystem, read_coverage
    from pipeline.run import _previous_run, init_ray, plan_run, prepared_rows

    seconds = {}
    t = time.perf_counter()
    init_ray()
    seconds["ray"] = time.perf_counter() - t
    # The driver's growth from here on: what the run holds, not the libraries Ray loaded.
    before = _rss_bytes()
    with RssSampler() as driver, WorkerRss() as workers:
        t = time.perf_counter()
        p = plan_run(cfg)
        fs, root = output_filesystem(cfg.output_url)
        previous, _ = _previous_run(cfg, fs, root, p.identity, p.scope)
        if previous is None:
            raise RuntimeError(f"{cfg.output_url} holds no run for the plan to resume")
        seconds["plan"], t = time.perf_counter() - t, time.perf_counter()
        done = read_coverage(fs, root)
        seconds["resume"], t = time.perf_counter() - t, time.perf_counter()
        duplicates = find_duplicates(p.input)
        seconds["duplicates"], t = time.perf_counter() - t, time.perf_counter()
        batch = next(iter(prepared_rows(p, done, duplicates).iter_batches(batch_size=None, batch_format="pyarrow")))
        seconds["first_batch"] = time.perf_counter() - t
    # The first batch holds rows still to make, and the repeats in it are error rows.
    sources, rows = np.array(batch.column(C.SOURCE).to_pylist()), batch.column(C.SOURCE_ROW).to_numpy()
    if any(contains(done.of(source, 0), rows[sources == source]).any() for source in set(sources)):
        raise RuntimeError("the first prepared batch holds committed rows")
    return {"rows": p.input.total_rows, "committed": done.rows, "repeats": duplicates.repeats,
            "first_batch_rows": batch.num_rows, "seconds": seconds,
            "driver_rss_growth_mb": (driver.peak - before) / 2**20,
            "workers_mb": {t: (rss / 2**20, anon / 2**20) for t, (rss, anon) in workers.peaks.items()},
            "first_batch_errors": sum(1 for e in batch.column(C.ERROR).to_pylist() if e)}


def _measure_in_child(cfg: RunConfig, out: Any) -> None:
    out.put(measure(cfg))


@dataclass(frozen=True)
class ScaleResult(Result):
    sizes: list[dict[str, Any]]

    def report_rows(self) -> Iterable[ReportRow]:
        for size in self.sizes:
            m = size["rows"] / 1e6
            s = size["seconds"]
            label = f"{m:g}M rows"
            yield "scale", f"{label}: committed / repeated ids", f"{size['committed']:,} / {size['repeats']:,}"
            yield "scale", f"{label}: Ray start s", s["ray"]
            for step in ("plan", "resume", "duplicates", "first_batch"):
                yield "scale", f"{label}: {step} s (per 1M rows)", f"{s[step]:.2f} ({s[step] / m:.3f})"
            yield "scale", f"{label}: to first batch s (Ray start too)", sum(s.values())
            yield "scale", f"{label}: driver peak RSS growth MB", size["driver_rss_growth_mb"]
            for title, (rss, anon) in sorted(size["workers_mb"].items(), key=lambda item: -item[1][1]):
                task = title.removeprefix("ray::").split("->")[0]  # a fused read task: its read operator
                yield "scale", f"{label}: {task} peak RSS / private MB", f"{rss:.0f} / {anon:.0f}"


def bench_scale(work: Path, *, sizes: tuple[int, ...] = (10_000_000, 100_000_000), duplicates: float = 0.03,
                committed: float = 0.5, rows_per_shard: int = 1000) -> ScaleResult:
    """Build (or reuse, under ``work``) each size's input and half-committed OUTPUT, then measure a resumed run's
    way to its first batch in a fresh process, so that the driver's RSS is the run's alone."""
    results = []
    for rows in sizes:
        folder = work / f"rows-{rows}"
        cfg = RunConfig(input_url=str(folder / "input"), output_url=str(folder / "output"),
                        rows_per_shard=rows_per_shard)
        if not (folder / "output" / "manifest.json").exists():
            build_input(folder / "input", rows, duplicates)
            build_output(folder / "output", cfg, committed, rows_per_shard)
        results.append(_in_fresh_process(cfg))
    return ScaleResult(results)


def _in_fresh_process(cfg: RunConfig) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=_measure_in_child, args=(cfg, queue))
    child.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not child.is_alive():
                raise RuntimeError(f"the measuring process failed (exit code {child.exitcode})") from None
    child.join()
    return result
