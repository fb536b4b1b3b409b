"""Sweeps: one spec, a grid of generation settings, one normal run per grid point, and a summary across points.

A spec (YAML) names the prompt tables, the output root, the model(s), settings shared by every point and the
grid::

    name: guidance
    prompts: s3://bucket/prompts/drawbench.parquet   # or {drawbench: URL, parti: URL}: one axis
    output: s3://bucket/sweeps/guidance
    model: s3://bucket/models/karlo-v1-alpha         # or models: {name: URL, ...}: one axis; null: tiny model
    settings: {seed: 0, device: cuda, dtype: bfloat16}  # any `karlo generate` setting
    stage_config: stages.yaml                        # or stages: {...} inline
    grid:
      prior_guidance_scale: [2, 4]
      decoder_guidance_scale: [4, 8]
      steps: [[25, 25, 7], [10, 10, 5]]              # prior, decoder, super-res
      seeds_per_prompt: [1, 4]

The output root holds ``<point-name>/`` (a normal run: manifest.json, images/, ...), ``sweep.json`` (the spec and
the points in grid order), ``summary.parquet`` and ``summary.md``. Points run one after another in one driver
(docs/sweeps.md says why); a finished point is skipped on a rerun and an unfinished one resumes.
``seeds_per_prompt: k > 1`` generates k images per prompt from a copy of the prompt table with k rows per prompt
(ids ``<key>-<i>``, columns ``prompt_key`` and ``sample_index``), written once under ``_inputs/``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import posixpath
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from pipeline.config import ConfigError, RunConfig, parse_stage_configs

# The pipeline's reader, manifest and sinks import Ray Data and torch (seconds): they are imported where used, so
# that `karlo --help` and the other commands start fast.

logger = logging.getLogger(__name__)

SWEEP_FILE, SUMMARY_PARQUET, SUMMARY_MD = "sweep.json", "summary.parquet", "summary.md"
INPUTS_DIR = "_inputs"  # expanded prompt tables for seeds_per_prompt > 1
PROMPT_KEY, SAMPLE_INDEX = "prompt_key", "sample_index"
CLIP_SCORE = "clip_score"  # a metadata column of runs with CLIP scoring; its mean goes into the summary

# Settings of RunConfig a spec may set; the rest (input, output, model, stages) come from their own keys.
SETTINGS = tuple(f.name for f in dataclasses.fields(RunConfig)
                 if f.name not in ("input_url", "output_url", "model", "stages", "storage_options", "overwrite"))
SPEC_KEYS = {"name", "prompts", "output", "model", "models", "settings", "stages", "stage_config", "grid"}
STEPS_AXIS, SAMPLES_AXIS = "steps", "seeds_per_prompt"
# Short names of the usual axes in point names: pg4_dg8_steps25-25-7_n4.
ABBREVIATIONS = {"prior_guidance_scale": "pg", "decoder_guidance_scale": "dg", "prior_steps": "ps",
                 "decoder_steps": "ds", "super_res_steps": "ss", STEPS_AXIS: "steps", SAMPLES_AXIS: "n"}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

EXIT_POINT_FAILED = 2  # a point could not run (conflicting output, unusable input)
EXIT_ROW_ERRORS = 3  # every point ran, but some rows became error rows or are missing


@dataclass(frozen=True)
class SweepSpec:
    name: str
    prompts: dict[str, str]  # prompt-set name -> URL
    output: str
    models: dict[str, str | None]  # model name -> URL (None: the embedded tiny model)
    settings: dict[str, Any]
    stages: dict[str, Any] | None  # a parsed stage-config mapping
    grid: dict[str, list[Any]]  # axis -> values, in spec order

    def as_dict(self) -> dict[str, Any]:
        """The spec as recorded in sweep.json: URLs without credentials."""
        from pipeline.reader import display_url
        
        return {
            "name": self.name,
            "prompts": {k: display_url(v) for k, v in self.prompts.items()},
            "output": display_url(self.output),
            "models": {k: (display_url(v) if v else None) for k, v in self.models.items()},
            "settings": self.settings,
            "stages": self.stages,
            "grid": self.grid,
        }


@dataclass(frozen=True)
class Point:
    name: str
    prompts: str  # prompt-set name
    model: str  # model name
    seeds_per_prompt: int
    settings: dict[str, Any]  # RunConfig settings of this point
    axes: dict[str, Any]  # this point's value on each axis that varies, for names and the summary

    def as_dict(self, spec: SweepSpec) -> dict[str, Any]:
        from pipeline.reader import display_url
        
        model_url = spec.models[self.model]
        return {
            "name": self.name,
            "settings": {"prompts": display_url(spec.prompts[self.prompts]),
                         "model": display_url(model_url) if model_url else None,
                         SAMPLES_AXIS: self.seeds_per_prompt, **self.settings},
        }


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _resolve(url: str, base: Path | None) -> str:
    """Relative local paths in a spec file are relative to the spec's folder."""
    if base is None or "://" in url or Path(url).is_absolute():
        return url
    return str((base / url).resolve())


def _named(value: Any, key: str, base: Path | None, allow_none: bool = False) -> dict[str, Any]:
    """``URL`` or ``{name: URL, ...}`` -> {name: URL}; a single URL is named after its last path part."""
    if isinstance(value, dict):
        _check(bool(value), f"sweep spec: {key} is empty")
        out = {}
        for name, url in value.items():
            _check(isinstance(name, str) and _NAME_UNSAFE.sub("", name) == name and name not in (".", ".."),
                   f"sweep spec: {key} name {name!r} may only use letters, digits, '.', '_' and '-'")
            _check(isinstance(url, str) or (allow_none and url is None), f"sweep spec: {key}.{name} must be a URL")
            out[name] = _resolve(url, base) if url else None
        return out
    if value is None and allow_none:
        return {"tiny": None}
    _check(isinstance(value, str) and value != "", f"sweep spec: {key} must be a URL or a mapping of name to URL")
    stem = posixpath.basename(value.rstrip("/").split("://", 1)[-1]).split(".")[0] or key
    return {_NAME_UNSAFE.sub("-", stem): _resolve(value, base)}


def parse_spec(data: Any, base: Path | None = None) -> SweepSpec:
    """Validate a parsed spec; ``base`` is the folder relative local paths are resolved against."""
    from pipeline.reader import display_url
    
    _check(isinstance(data, dict), "sweep spec must be a mapping")
    unknown = set(data) - SPEC_KEYS
    _check(not unknown, f"sweep spec: unknown keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    _check("prompts" in data and "output" in data, "sweep spec needs `prompts` and `output`")
    _check(not ("model" in data and "models" in data), "sweep spec: give `model` or `models`, not both")
    _check(not ("stages" in data and "stage_config" in data), "sweep spec: give `stages` or `stage_config`, not both")
    _check(isinstance(data["output"], str) and data["output"] != "", "sweep spec: output must be a URL")
    settings = data.get("settings") or {}
    _check(isinstance(settings, dict), "sweep spec: settings must be a mapping")
    bad = set(settings) - set(SETTINGS)
    _check(not bad, f"sweep spec: unknown settings {sorted(bad)}; allowed: {sorted(SETTINGS)}")
    stages = data.get("stages")
    if "stage_config" in data:
        path = _resolve(data["stage_config"], base)
        try:
            with fsspec.open(path, "r") as f:
                stages = yaml.safe_load(f.read()) or {}
        except FileNotFoundError:
            raise ConfigError(f"sweep spec: stage_config not found: {display_url(path)}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"sweep spec: stage_config is not valid YAML: {e}") from None
    _check(stages is None or isinstance(stages, dict), "sweep spec: stages must be a mapping (stage-config format)")
    grid = data.get("grid") or {}
    _check(isinstance(grid, dict), "sweep spec: grid must be a mapping of axis to a list of values")
    allowed_axes = set(SETTINGS) | {STEPS_AXIS, SAMPLES_AXIS}
    for axis, values in grid.items():
        _check(axis in allowed_axes, f"sweep spec: unknown grid axis {axis!r}; allowed: {sorted(allowed_axes)}")
        _check(isinstance(values, list) and values, f"sweep spec: grid.{axis} must be a non-empty list")
        _check(axis not in settings, f"sweep spec: {axis} is both a setting and a grid axis")
        _check(len({json.dumps(v, sort_keys=True) for v in values}) == len(values),
               f"sweep spec: grid.{axis} has repeated values")
    if STEPS_AXIS in grid:
        _check(not {"prior_steps", "decoder_steps", "super_res_steps"} & (set(grid) | set(settings)),
               "sweep spec: grid.steps sets all three step counts; do not also set them one by one")
        for v in grid[STEPS_AXIS]:
            _check(isinstance(v, list) and len(v) == 3, f"sweep spec: grid.steps values are [prior, decoder, "
                                                        f"super_res], got {v!r}")
    for v in grid.get(SAMPLES_AXIS, []):
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
               f"sweep spec: seeds_per_prompt values must be integers >= 1, got {v!r}")
    name = data.get("name") or posixpath.basename(data["output"].rstrip("/"))
    return SweepSpec(
        name=str(name),
        prompts=_named(data["prompts"], "prompts", base),
        output=_resolve(data["output"], base),
        models=_named(data.get("models", data.get("model")), "models" if "models" in data else "model", base,
                      allow_none=True),
        settings=dict(settings),
        stages=stages,
        grid={k: list(v) for k, v in grid.items()},
    )


def load_spec(url: str) -> SweepSpec:
    """Read a spec file (local path or fsspec URL)."""
    from pipeline.reader import display_url
    
    try:
        with fsspec.open(url, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"sweep spec not found: {display_url(url)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep spec is not valid YAML: {e}") from None
    return parse_spec(data, None if "://" in url else Path(url).resolve().parent)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "-".join(_show(v) for v in value)
    return str(value)


def points(spec: SweepSpec) -> list[Point]:
    """Every grid point, in grid order (prompt sets, then models, then the grid axes in spec order), each checked
    by building its RunConfig, so a bad value fails before anything runs."""
    axes: dict[str, list[Any]] = {}
    if len(spec.prompts) > 1:
        axes["prompts"] = list(spec.prompts)
    if len(spec.models) > 1:
        axes["model"] = list(spec.models)
    axes.update(spec.grid)
    out, names = [], set()
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        settings = dict(spec.settings)
        for axis, value in values.items():
            if axis == STEPS_AXIS:
                settings.update(zip(("prior_steps", "decoder_steps", "super_res_steps"), value))
            elif axis in SETTINGS:
                settings[axis] = value
        name = "_".join(f"{ABBREVIATIONS.get(a, '' if a in ('prompts', 'model') else a)}{_show(v)}"
                        for a, v in values.items()) or "default"
        name = _NAME_UNSAFE.sub("-", name)
        _check(name not in names, f"sweep spec: two grid points would both be named {name!r}")
        names.add(name)
        point = Point(name=name, prompts=values.get("prompts", next(iter(spec.prompts))),
                      model=values.get("model", next(iter(spec.models))),
                      seeds_per_prompt=values.get(SAMPLES_AXIS, 1), settings=settings, axes=values)
        try:
            cfg = run_config(spec, point, input_url="", output_url="")
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"sweep point {name}: {e}") from None
        # Recorded with every default filled in, so sweep.json tells the whole settings of each point.
        out.append(dataclasses.replace(point, settings={k: getattr(cfg, k) for k in SETTINGS}))
    return out


def run_config(spec: SweepSpec, point: Point, *, input_url: str, output_url: str,
               overwrite: bool = False) -> RunConfig:
    settings = dict(point.settings)
    device, dtype = settings.get("device", "cpu"), settings.get("dtype", "float32")
    stages = parse_stage_configs(spec.stages, device, dtype) if spec.stages is not None else {}
    return RunConfig(input_url=input_url, output_url=output_url, model=spec.models[point.model], stages=stages,
                     overwrite=overwrite, **settings)


def expand_prompts(url: str, samples: int, dest: str) -> str:
    """Write a copy of the prompt table(s) at ``url`` with ``samples`` rows per row into ``dest``; returns dest.

    Copy i of a row gets the id ``<key>-<i>`` (key: the row's id, or the key the pipeline derives for it) and,
    when the row has a seed, seed + i; rows without a seed get distinct seeds from their distinct keys. An id or
    seed the pipeline would reject is refused here, since its copies could not be told apart.
    """
    from pipeline.reader import plan_inputs
    from pipeline.schema import SEED_LIMIT, make_key
    from pipeline.sinks import open_atomic, output_filesystem
    
    plan = plan_inputs(url)
    fs, root = output_filesystem(dest)
    for f in plan.files:
        with fsspec.open(f.url, "rb") as fh:
            table = pq.read_table(fh)
        _check(PROMPT_KEY not in table.column_names and SAMPLE_INDEX not in table.column_names,
               f"{plan.url}: columns {PROMPT_KEY!r} and {SAMPLE_INDEX!r} are written by seeds_per_prompt; "
               "rename them in the prompt table")
        ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * table.num_rows
        seeds = table.column("seed").to_pylist() if "seed" in table.column_names else None
        keys, new_ids, new_seeds = [], [], []
        for row, ident in enumerate(ids):
            where = f"{plan.url}: {f.source} row {row}"
            try:
                key = make_key(ident, f.source, row)
            except ValueError as e:
                raise ConfigError(f"seeds_per_prompt: {where}: {e}") from None
            seed = seeds[row] if seeds is not None else None
            _check(seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT),
                   f"seeds_per_prompt: {where}: seed must be an integer in [0, 2**63), got {seed!r}")
            keys += [key] * samples
            new_ids += [f"{key}-{i}" for i in range(samples)]
            new_seeds += [None if seed is None else (seed + i) % SEED_LIMIT for i in range(samples)]
        take = pa.array([row for row in range(table.num_rows) for _ in range(samples)], pa.int64())
        out = table.take(take)
        out = _set(out, "id", pa.array(new_ids, pa.string()))
        if seeds is not None:
            out = _set(out, "seed", pa.array(new_seeds, pa.int64()))
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
    from pipeline.manifest import differences, identity_of_run, model_identity, now
    from pipeline.reader import InputError, display_url, plan_inputs
    from pipeline.run import OutputConflict, default_model, init_ray, run
    from pipeline.sinks import output_filesystem, write_json_atomic
    
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
            done = _finished(fs, f"{root}/{point.name}")
            if done is not None:
                expected = identity_of_run(cfg.input_url, identities[model_url], cfg.output_settings())
                diff = differences(done.get("identity", {}), expected)
                if not diff:
                    echo(f"[{i}/{len(grid)}] {point.name}: finished earlier, skipped")
                    continue
                if not overwrite:
                    failures[point.name] = (f"{display_url(out_url)} holds a finished run with other settings ("
                                            + "; ".join(diff[:5]) + "); use --overwrite to replace it")
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


def _finished(fs: fsspec.AbstractFileSystem, folder: str) -> dict | None:
    """The manifest of a finished run in ``folder``, else None."""
    from pipeline.manifest import MANIFEST, SUCCESS
    
    if not fs.exists(f"{folder}/{SUCCESS}") or not fs.exists(f"{folder}/{MANIFEST}"):
        return None
    return json.loads(fs.cat_file(f"{folder}/{MANIFEST}"))


def _clip_score_mean(fs: fsspec.AbstractFileSystem, folder: str) -> float | None:
    """Mean of the metadata's clip_score column, when the run scored its images."""
    from pipeline.sinks import METADATA_DIR
    
    names = sorted(p for p in fs.glob(f"{folder}/{METADATA_DIR}/*.parquet"))
    total, count = 0.0, 0
    for path in names:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if CLIP_SCORE not in pf.schema_arrow.names:
                return None
            column = pf.read(columns=[CLIP_SCORE]).column(CLIP_SCORE).drop_null()
        total += float(pc.sum(column).as_py() or 0.0)
        count += len(column)
    return total / count if count else None


SUMMARY_SCHEMA = pa.schema([
    ("point", pa.string()),
    ("status", pa.string()),  # complete | incomplete | failed | not run
    ("rows", pa.int64()),  # input rows
    ("written", pa.int64()),
    ("errors", pa.int64()),
    ("images_per_second", pa.float64()),  # of the point's last attempt
    ("seconds", pa.float64()),
    ("clip_score", pa.float64()),  # mean over written rows; null without CLIP scoring
    ("settings", pa.string()),  # the point's settings as JSON
    ("message", pa.string()),
])


def summarize(spec: SweepSpec, grid: list[Point], failures: dict[str, str]) -> pa.Table:
    """One row per point, read back from each point's manifest and metadata."""
    from pipeline.manifest import MANIFEST, SUCCESS
    from pipeline.sinks import output_filesystem
    
    fs, root = output_filesystem(spec.output)
    rows = []
    for point in grid:
        folder = f"{root}/{point.name}"
        manifest = json.loads(fs.cat_file(f"{folder}/{MANIFEST}")) if fs.exists(f"{folder}/{MANIFEST}") else None
        counts = (manifest or {}).get("counts", {})
        attempt = (manifest or {}).get("last_attempt", {})
        if point.name in failures:
            status = "failed"
        elif manifest is None:
            status = "not run"
        else:
            status = "complete" if fs.exists(f"{folder}/{SUCCESS}") else "incomplete"
        rows.append({
            "point": point.name,
            "status": status,
            "rows": counts.get("input_rows", (manifest or {}).get("input_rows")),
            "written": counts.get("written"),
            "errors": counts.get("errors"),
            "images_per_second": attempt.get("images_per_second"),
            "seconds": attempt.get("seconds"),
            "clip_score": _clip_score_mean(fs, folder) if manifest else None,
            "settings": json.dumps(point.as_dict(spec)["settings"], sort_keys=True),
            "message": failures.get(point.name, ""),
        })
    axes = list(grid[0].axes) if grid else []
    table = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    for j, axis in enumerate(axes):  # one column per axis, after the point name
        table = table.add_column(1 + j, axis, pa.array([_show(p.axes[axis]) for p in grid], pa.string()))
    return table


def markdown(table: pa.Table) -> str:
    """The summary as a Markdown table (the settings JSON left out: the axis columns show what varies)."""
    columns = [c for c in table.column_names if c != "settings"]

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.select(columns).to_pylist():
        lines.append("| " + " | ".join(cell(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_summary(fs: fsspec.AbstractFileSystem, root: str, table: pa.Table) -> None:
    from pipeline.sinks import open_atomic
    
    with open_atomic(fs, f"{root}/{SUMMARY_PARQUET}") as f:
        pq.write_table(table, f)
    with open_atomic(fs, f"{root}/{SUMMARY_MD}") as f:
        f.write(markdown(table).encode("utf-8"))


@click.command("sweep")
@click.argument("spec_url", metavar="SPEC")
@click.option("--output", default=None, metavar="URL", help="Output root (default: the spec's `output`).")
@click.option("--overwrite", is_flag=True, help="Replace points whose folder holds a run with other settings.")
@click.option("--dry-run", is_flag=True, help="Print the grid points and exit.")
def sweep_cmd(spec_url: str, output: str | None, overwrite: bool, dry_run: bool) -> None:
    """Run every grid point of the sweep SPEC (YAML, local or fsspec URL) into OUTPUT/<point>/, then write
    sweep.json, summary.parquet and summary.md there. Rerunning skips finished points and resumes the others.

    Exit code: 0 every point complete without error rows; 2 unusable spec, or a point could not run; 3 some rows
    became error rows.
    """
    from pipeline.reader import InputError, display_url

    try:
        spec = load_spec(spec_url)
        if output:
            spec = dataclasses.replace(spec, output=output)
        grid = points(spec)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if dry_run:
        for p in grid:
            click.echo(f"{p.name}\t{json.dumps(p.as_dict(spec)['settings'], sort_keys=True)}")
        return
    try:
        result = run_sweep(spec, overwrite=overwrite, echo=lambda m: click.echo(m, err=True))
    except (InputError, ConfigError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_POINT_FAILED)
    click.echo(markdown(result.summary), nl=False)
    click.echo(f"summary: {display_url(result.root)}/{SUMMARY_MD}")
    sys.exit(result.exit_code)
