"""Sweep specs: the prompt tables, output root, model(s), shared settings and grid of one sweep, and its points.

A spec (YAML)::

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
      lora_scale: [0, 0.5, 1]                        # the scale of every adapter in stages' lora section
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import yaml

from pipeline.config import LORA_SECTION, ConfigError, RunConfig, parse_adapters, parse_stage_configs
from pipeline.redact import display_url

SWEEP_FILE = "sweep.json"  # in the output root: the spec and the points in grid order
# Settings of RunConfig a spec may set; the rest (input, output, model, stages) come from their own keys. A point
# makes several images per prompt with the seeds_per_prompt axis (its copies are rows of an expanded table, with a
# prompt_key that groups them across points), not images_per_prompt; and a point covers its whole prompt table,
# so that a finished point is one with _SUCCESS: no limit.
SETTINGS = tuple(f.name for f in dataclasses.fields(RunConfig)
                 if f.name not in ("input_url", "output_url", "model", "stages", "lora", "storage_options",
                                   "overwrite", "limit", "images_per_prompt"))
SPEC_KEYS = {"name", "prompts", "output", "model", "models", "settings", "stages", "stage_config", "grid"}
STEPS_AXIS, SAMPLES_AXIS, LORA_SCALE_AXIS = "steps", "seeds_per_prompt", "lora_scale"
# Short names of the usual axes in point names: pg4_dg8_steps25-25-7_n4.
ABBREVIATIONS = {"prior_guidance_scale": "pg", "decoder_guidance_scale": "dg", "prior_steps": "ps",
                 "decoder_steps": "ds", "super_res_steps": "ss", "strength": "s", STEPS_AXIS: "steps",
                 SAMPLES_AXIS: "n", "min_aesthetic": "aes", "drop_unsafe": "drop-unsafe", LORA_SCALE_AXIS: "lora"}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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
        model_url = spec.models[self.model]
        adapters = point_adapters(spec, self)
        lora = {"lora": [{"source": display_url(a.source), "scale": a.scale} for a in adapters]} if adapters else {}
        return {
            "name": self.name,
            "settings": {"prompts": display_url(spec.prompts[self.prompts]),
                         "model": display_url(model_url) if model_url else None,
                         SAMPLES_AXIS: self.seeds_per_prompt, **self.settings, **lora},
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
    if stages and stages.get(LORA_SECTION):  # adapter paths, like the spec's others, relative to the spec's folder
        stages = {**stages, LORA_SECTION: [{"path": _resolve(a.source, base), "scale": a.scale, "network": a.network}
                                           for a in parse_adapters(stages)]}
    grid = data.get("grid") or {}
    _check(isinstance(grid, dict), "sweep spec: grid must be a mapping of axis to a list of values")
    allowed_axes = set(SETTINGS) | {STEPS_AXIS, SAMPLES_AXIS, LORA_SCALE_AXIS}
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
    if LORA_SCALE_AXIS in grid:
        _check(bool(parse_adapters(stages)), "sweep spec: grid.lora_scale needs adapters in the stages' lora section")
        for v in grid[LORA_SCALE_AXIS]:
            _check(isinstance(v, (int, float)) and not isinstance(v, bool),
                   f"sweep spec: lora_scale values must be numbers, got {v!r}")
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


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "-".join(format_value(v) for v in value)
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
        name = "_".join(f"{ABBREVIATIONS.get(a, '' if a in ('prompts', 'model') else a)}{format_value(v)}"
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


def point_adapters(spec: SweepSpec, point: Point) -> tuple:
    """The LoRA adapters of the spec's stages, each at the point's lora_scale when that is an axis."""
    adapters = parse_adapters(spec.stages)
    if LORA_SCALE_AXIS not in point.axes:
        return adapters
    return tuple(dataclasses.replace(a, scale=point.axes[LORA_SCALE_AXIS]) for a in adapters)


def run_config(spec: SweepSpec, point: Point, *, input_url: str, output_url: str,
               overwrite: bool = False) -> RunConfig:
    settings = dict(point.settings)
    device, dtype = settings.get("device", "cpu"), settings.get("dtype", "float32")
    stages = parse_stage_configs(spec.stages, device, dtype) if spec.stages is not None else {}
    return RunConfig(input_url=input_url, output_url=output_url, model=spec.models[point.model], stages=stages,
                     lora=point_adapters(spec, point), overwrite=overwrite, **settings)
