"""Running a sweep: one normal run per grid point, one after another in this driver, then the summary.

The output root holds ``<point-name>/`` (a normal run: manifest.json, images/, ...), ``sweep.json`` (the spec and
the points in grid order), ``summary.parquet`` and ``summary.md``. Points run one after another in one driver
(docs/sweeps.md says why); a finished point is skipped on a rerun and an unfinished one resumes.
``seeds_per_prompt: k > 1`` generates k images per prompt from a copy of the prompt table with k rows per prompt
(ids ``<key>-<i>``, columns ``prompt_key`` and ``sample_index``), written once under ``_inputs/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.exit_codes import EXIT_POINT_FAILED, EXIT_ROW_ERRORS
from pipeline import columns as C
from pipeline.config import ConfigError
from pipeline.embedded import default_model
from pipeline.manifest import identity_changes, identity_of_run, model_identity, now
from pipeline.outputs import is_finished, output_filesystem, read_manifest
from pipeline.reader import InputError, plan_inputs
from pipeline.redact import display_url
from pipeline.run import OutputConflict, init_ray, run
from pipeline.schema import SEED_LIMIT, copy_seed, make_key
from pipeline.sinks import open_atomic, write_json_atomic

from .spec import SWEEP_FILE, SweepSpec, points, run_config
from .summary import SUMMARY_MD, SUMMARY_PARQUET, markdown, summarize

logger = logging.getLogger(__name__)

INPUTS_DIR = "_inputs"  # expanded prompt tables for seeds_per_prompt > 1
PROMPT_KEY, SAMPLE_INDEX = "prompt_key", C.SAMPLE_INDEX


def expand_prompts(url: str, samples: int, dest: str) -> str:
    """Write a copy of the prompt table(s) at ``url`` with ``samples`` rows per row into ``dest``; returns dest.

    Copy i of a row gets the id ``<key>-<i>`` (key: the row's id, or the key the pipeline derives for it) and,
    when the row has a seed, that seed for copy 0 (the image a one-sample point makes) and a seed derived from the
    seed and the copy's id for the others: ``seed + i`` would give rows seeded 1 and 2 the same noise for copies
    1 and 0. Rows without a seed get distinct seeds from their distinct ids. An id or
    seed the pipeline would reject is refused here, since its copies could not be told apart.
    """
    plan = plan_inputs(url)
    fs, root = output_filesystem(dest)
    for f in plan.files:
        with fsspec.open(f.url, "rb") as fh:
            table = pq.read_table(fh)
        if PROMPT_KEY in table.column_names or SAMPLE_INDEX in table.column_names:
            raise ConfigError(f"{plan.url}: columns {PROMPT_KEY!r} and {SAMPLE_INDEX!r} are written by "
                              "seeds_per_prompt; rename them in the prompt table")
        ids = table.column(C.ID).to_pylist() if C.ID in table.column_names else [None] * table.num_rows
        seeds = table.column(C.SEED).to_pylist() if C.SEED in table.column_names else None
        keys, new_ids, new_seeds = [], [], []
        for row, ident in enumerate(ids):
            where = f"{plan.url}: {f.source} row {row}"
            try:
                key = make_key(ident, f.source, row)
            except ValueError as e:
                raise ConfigError(f"seeds_per_prompt: {where}: {e}") from None
            seed = seeds[row] if seeds is not None else None
            if not (seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT)):
                raise ConfigError(f"seeds_per_prompt: {where}: seed must be an integer in [0, 2**63), got {seed!r}")
            keys += [key] * samples
            new_ids += [f"{key}-{i}" for i in range(samples)]
            new_seeds += [None if seed is None else copy_seed(seed, i, new_ids[-samples + i]) for i in range(samples)]
        take = pa.array([row for row in range(table.num_rows) for _ in range(samples)], pa.int64())
        out = table.take(take)
        out = _set(out, C.ID, pa.array(new_ids, pa.string()))
        if seeds is not None:
            out = _set(out, C.SEED, pa.array(new_seeds, pa.int64()))
        out = out.append_column(PROMPT_KEY, pa.array(keys, pa.string()))
        out = out.append_column(SAMPLE_INDEX, pa.array([i for _ in range(table.num_rows) for i in range(samples)],
                                                       pa.int32()))
        with open_atomic(fs, f"{root}/{f.source}") as fh:
            pq.write_table(out, fh)
    return dest


def _set(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, column) if i >= 0 else table.append_column(name, column)


@dataclass
class SweepResult:
    root: str
    summary: pa.Table
    failures: dict[str, str]  # point name -> why it could not run

    @property
    def exit_code(self) -> int:
        if self.failures:
            return EXIT_POINT_FAILED
        rows = self.summary.to_pylist()
        return 0 if all(r["status"] == "complete" and r["errors"] == 0 for r in rows) else EXIT_ROW_ERRORS


def run_sweep(spec: SweepSpec, *, overwrite: bool = False, echo: Callable[[str], None] = logger.info) -> SweepResult:
    """Run every point of the sweep one after another in this driver; see the module docstring."""
    grid = points(spec)
    for url in spec.prompts.values():
        plan_inputs(url)  # fail on unusable prompt tables before any point runs
    fs, root = output_filesystem(spec.output)
    fs.makedirs(root, exist_ok=True)
    write_json_atomic(fs, f"{root}/{SWEEP_FILE}", {"spec": spec.as_dict(), "points": [p.as_dict(spec) for p in grid],
                                                   "updated": now()})
    failures: dict[str, str] = {}
    identities: dict[str | None, dict] = {}
    inputs: dict[tuple[str, int], str] = {}
    try:
        for i, point in enumerate(grid, 1):
            out_url = f"{spec.output.rstrip('/')}/{point.name}"
            input_url = spec.prompts[point.prompts]
            if point.seeds_per_prompt > 1:
                input_url = f"{spec.output.rstrip('/')}/{INPUTS_DIR}/{point.prompts}-x{point.seeds_per_prompt}"
            cfg = run_config(spec, point, input_url=input_url, output_url=out_url, overwrite=overwrite)
            model_url = spec.models[point.model]
            if model_url not in identities:
                identities[model_url] = model_identity(model_url or default_model())
            folder = f"{root}/{point.name}"
            done = read_manifest(fs, folder) if is_finished(fs, folder) else None
            if done is not None:
                expected = identity_of_run(cfg.input_url, identities[model_url], cfg.output_settings())
                diff = identity_changes(done, expected)
                if not diff:
                    echo(f"[{i}/{len(grid)}] {point.name}: finished earlier, skipped")
                    continue
                if not overwrite:
                    failures[point.name] = (f"{display_url(out_url)} holds a finished run with other settings "
                                            f"({diff}); use --overwrite to replace it")
                    echo(f"[{i}/{len(grid)}] {point.name}: {failures[point.name]}")
                    continue
            if point.seeds_per_prompt > 1 and (point.prompts, point.seeds_per_prompt) not in inputs:
                inputs[(point.prompts, point.seeds_per_prompt)] = expand_prompts(
                    spec.prompts[point.prompts], point.seeds_per_prompt, input_url)
            echo(f"[{i}/{len(grid)}] {point.name}: running")
            init_ray()
            try:
                summary = run(cfg, echo=echo)
            except (InputError, ConfigError, OutputConflict) as e:
                failures[point.name] = str(e)
                echo(f"[{i}/{len(grid)}] {point.name}: {e}")
                continue
            echo(f"[{i}/{len(grid)}] {point.name}: {summary.written} images, {summary.errors} error rows, "
                 f"{summary.images_per_second:.2f} images/s")
    finally:
        table = summarize(spec, grid, failures)
        write_summary(fs, root, table)
    return SweepResult(root=spec.output, summary=table, failures=failures)


def write_summary(fs: fsspec.AbstractFileSystem, root: str, table: pa.Table) -> None:
    with open_atomic(fs, f"{root}/{SUMMARY_PARQUET}") as f:
        pq.write_table(table, f)
    with open_atomic(fs, f"{root}/{SUMMARY_MD}") as f:
        f.write(markdown(table).encode("utf-8"))
