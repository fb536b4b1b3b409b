"""Run and per-stage settings, with defaults and a strict YAML stage-config file.

A stage-config file sets each model stage's resources; keys missing from a stage fall back to the file's
``defaults`` section, then to the built-in defaults for the run's device::

    defaults:   {device: cuda, dtype: bfloat16}
    prior:      {batch_size: 64, actors: 1, num_gpus: 0.1}
    decoder:    {batch_size: 32, actors: [1, 4], num_gpus: 0.3}
    super_res:  {batch_size: 8, actors: [2, 8], num_gpus: 0.6}
    lora:       [s3://bucket/loras/style.safetensors:0.8, {path: sr-detail/, scale: 0.5, network: super_res_last}]

The ``lora`` section lists LoRA adapters merged into the networks (karlo_model.lora), as ``--lora`` does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import yaml

from .redact import display_url

if TYPE_CHECKING:
    from karlo_model.lora import Adapter

STAGE_NAMES = ("prior", "decoder", "super_res")
# Every stage a stage-config file may set, in pipeline order: image variations replace the prior by the image encoder,
# CLIP scoring (pipeline.scoring) is an optional last stage.
ALL_STAGE_NAMES = ("prior", "image_encoder", "decoder", "super_res", "clip_score")
TASKS = ("generate", "variations")
DEVICES = ("cpu", "cuda")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
IMAGE_FORMATS = ("png", "jpeg", "webp")
OUTPUT_FORMATS = ("webdataset", "parquet")
# Sampling defaults of a run: the schedule and classifier-free guidance scales Karlo v1 alpha was released with.
PRIOR_STEPS, DECODER_STEPS, SUPER_RES_STEPS = 25, 25, 7
DEFAULT_STEPS = (PRIOR_STEPS, DECODER_STEPS, SUPER_RES_STEPS)  # prior, decoder, super-res
PRIOR_GUIDANCE_SCALE, DECODER_GUIDANCE_SCALE = 4.0, 8.0
STRENGTH = 0.8  # of init images whose row and run give none (diffusers' img2img default)

# GPU shares follow each stage's compute per image (docs/gpu.md: SR 61%, decoder 31%, prior 8%), so
# one GPU shared by the pools spends its time where the work is. The image encoder of variations stands in for the
# prior; a CLIP ViT-L/14 forward per image is under 0.1% of the generation, and its share keeps the sum at 1.
GPU_SHARES = {"prior": 0.08, "image_encoder": 0.08, "decoder": 0.3, "super_res": 0.6, "clip_score": 0.02}
GPU_BATCH = {"prior": 64, "image_encoder": 64, "decoder": 32, "super_res": 8, "clip_score": 64}


CPU_SHARE = 0.2  # Ray CPUs per CPU stage actor (one torch thread each)
LORA_SECTION = "lora"  # of a stage-config file: the run's LoRA adapters, not a stage


class ConfigError(ValueError):
    """A run or stage setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class StageConfig:
    batch_size: int
    min_actors: int = 1
    max_actors: int = 1
    num_cpus: float = CPU_SHARE
    num_gpus: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size must be an integer >= 1")
        _check(_is_int(self.min_actors) and self.min_actors >= 1, "actors: the minimum must be an integer >= 1")
        _check(_is_int(self.max_actors) and self.max_actors >= self.min_actors, "actors: max must be >= min")
        _check(_is_number(self.num_cpus) and self.num_cpus >= 0, "num_cpus must be a number >= 0")
        _check(_is_number(self.num_gpus) and self.num_gpus >= 0, "num_gpus must be a number >= 0")
        _check(self.device in DEVICES, f"device must be one of {list(DEVICES)}")
        _check(self.dtype in DTYPE_NAMES, f"dtype must be one of {list(DTYPE_NAMES)}")
        _check(self.device == "cpu" or self.num_gpus > 0, "a cuda stage needs num_gpus > 0")
        _check(self.num_gpus == 0 or self.device == "cuda", "num_gpus > 0 needs device: cuda")

    @property
    def torch_threads(self) -> int:
        """Intra-op threads for a CPU actor: the CPUs it reserved, at least one."""
        return max(1, int(self.num_cpus))


def default_stage(name: str, device: str, dtype: str) -> StageConfig:
    if device == "cuda":
        return StageConfig(batch_size=GPU_BATCH[name], num_cpus=1, num_gpus=GPU_SHARES[name], device=device,
                           dtype=dtype)
    # CPU: a fifth of a CPU and one torch thread per actor, so that the pools (CLIP scoring's included), the image
    # encoder, the read tasks and the writer fit on a 2-CPU machine without reserving every CPU (Ray Data then
    # stalls: README.md, "Stages and resources"). The decoder and super-res pools hold one actor per core from the
    # start, so that whichever stage has work gets every core: autoscaled, a pool idle while the other stage worked
    # shrank, then ran the final batches on one core. The other stages' share of the work is small; their pools
    # grow only if they fall behind.
    cores = max(1, os.cpu_count() or 1)
    return StageConfig(batch_size=4, min_actors=cores if name in ("decoder", "super_res") else 1, max_actors=cores,
                       device=device, dtype=dtype)


def parse_stage_configs(
    data: Mapping[str, Any] | None, device: str, dtype: str, names: Sequence[str] = STAGE_NAMES
) -> dict[str, StageConfig]:
    """Configs of the stages ``names`` from a parsed stage-config file (or None for the defaults)."""
    data = dict(data or {})
    unknown = set(data) - {"defaults", LORA_SECTION, *ALL_STAGE_NAMES}
    _check(not unknown, f"stage config: unknown sections {sorted(unknown)}; expected defaults, "
                        f"{', '.join(ALL_STAGE_NAMES)}, {LORA_SECTION}")
    defaults = _section(data.get("defaults"), "defaults")
    run_device = defaults.get("device", device)
    run_dtype = defaults.get("dtype", dtype)
    out = {}
    for name in names:
        values = {**defaults, **_section(data.get(name), name)}
        actors = values.pop("actors", None)
        if actors is not None:
            values["min_actors"], values["max_actors"] = _actors(actors, name)
        try:
            base = default_stage(name, values.get("device", run_device), values.get("dtype", run_dtype))
            out[name] = dataclasses.replace(base, **values)
        except ConfigError as e:
            raise ConfigError(f"stage config [{name}]: {e}") from None
    return out


def parse_adapters(data: Mapping[str, Any] | None) -> tuple[Adapter, ...]:
    """The LoRA adapters of a parsed stage-config file's ``lora`` section: each ``PATH|URL[:SCALE]`` (as
    ``--lora``) or ``{path, scale, network}``; () without one."""
    entries = (data or {}).get(LORA_SECTION)
    if entries is None:
        return ()
    _check(isinstance(entries, list), f"stage config [{LORA_SECTION}] must be a list of adapters")
    from karlo_model.lora import Adapter, AdapterError, parse_adapter  # torch: only for runs with adapters

    out = []
    for entry in entries:
        try:
            if isinstance(entry, str):
                out.append(parse_adapter(entry))
                continue
            _check(isinstance(entry, dict) and "path" in entry and not set(entry) - {"path", "scale", "network"},
                   f"stage config [{LORA_SECTION}]: an adapter is PATH[:SCALE] or {{path, scale, network}}, got "
                   f"{entry!r}")
            out.append(Adapter(entry["path"], entry.get("scale", 1.0), entry.get("network")))
        except AdapterError as e:
            raise ConfigError(f"stage config [{LORA_SECTION}]: {e}") from None
    return tuple(out)


def read_stage_config_file(text: str) -> dict[str, Any]:
    """A stage-config file's sections, parsed but not yet checked."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"stage config is not valid YAML: {e}") from None
    _check(data is None or isinstance(data, dict), "stage config must be a mapping of sections")
    return data or {}


def load_stage_config_file(
    text: str, device: str, dtype: str, names: Sequence[str] = STAGE_NAMES
) -> dict[str, StageConfig]:
    return parse_stage_configs(read_stage_config_file(text), device, dtype, names)


_STAGE_KEYS = {f.name for f in dataclasses.fields(StageConfig)} - {"min_actors", "max_actors"} | {"actors"}


def _section(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    _check(isinstance(value, dict), f"stage config [{name}] must be a mapping")
    unknown = set(value) - _STAGE_KEYS
    _check(not unknown, f"stage config [{name}]: unknown keys {sorted(unknown)}; allowed: {sorted(_STAGE_KEYS)}")
    return dict(value)


def _actors(value: Any, name: str) -> tuple[int, int]:
    """``actors: 2`` (a fixed pool) or ``actors: [1, 4]`` (autoscaling between min and max)."""
    if _is_int(value):
        return value, value
    if isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value):
        return value[0], value[1]
    raise ConfigError(f"stage config [{name}]: actors must be an integer or [min, max], got {value!r}")


def _absolute(url: str | None) -> str | None:
    """A local path made absolute here, on the driver: actors and write tasks run in other working folders, and
    on other nodes. URLs (s3://, file://, hf://, ...) are left as they are."""
    if url is None or "://" in str(url):
        return url
    return os.path.abspath(url)


@dataclass(frozen=True)
class RunConfig:
    input_url: str
    output_url: str
    model: str | None = None  # None: the embedded tiny random model
    seed: int = 0
    prior_steps: int = PRIOR_STEPS
    decoder_steps: int = DECODER_STEPS
    super_res_steps: int = SUPER_RES_STEPS
    prior_guidance_scale: float = PRIOR_GUIDANCE_SCALE
    decoder_guidance_scale: float = DECODER_GUIDANCE_SCALE
    image_format: str = "png"
    output_format: str = "webdataset"
    rows_per_shard: int = 1000
    rows_per_read_task: int = 64
    device: str = "cpu"
    dtype: str = "float32"
    overwrite: bool = False
    skip_networks: bool = False  # measurement mode: the networks stood in for (pipeline.measurement)
    task: str = "generate"  # or "variations": INPUT holds images (pipeline.variations)
    image_column: str = "image"  # variations: the column of image bytes, HF Image structs, or paths/URLs
    clip_score: bool = False  # score each image with a CLIP vision tower (pipeline.scoring)
    clip_model: str | None = None  # the tower: None picks the run's own (pipeline.scoring.clip_model_for)
    min_clip_score: float | None = None  # rows scoring below go to rejected/
    strength: float | None = None  # image-to-image: of init images whose row gives none (None: STRENGTH)
    aesthetic_model: str | None = None  # LAION aesthetic predictor weights: adds aesthetic_score (pipeline.scoring)
    min_aesthetic: float | None = None  # rows scoring below go to rejected/
    safety_checker: str | None = None  # a StableDiffusionSafetyChecker folder: adds nsfw and the concept scores
    drop_unsafe: bool = False  # flagged rows go to rejected/ (otherwise they are only flagged)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    lora: tuple[Adapter, ...] = ()  # LoRA adapters merged, in order, into the networks (karlo_model.lora)
    placement_timeout: float = 0.0  # seconds to wait for GPUs the cluster lacks or has busy (pipeline.placement)
    # Which rows the run covers (pipeline.scope), outside its settings identity: the first ``limit`` input rows
    # (None: all), and ``images_per_prompt`` output rows per input row, each with its own key and seed.
    limit: int | None = None
    images_per_prompt: int = 1
    storage_options: dict = field(default_factory=dict, repr=False)  # may hold credentials: never printed

    def __post_init__(self) -> None:
        for name in ("input_url", "output_url", "model", "clip_model", "aesthetic_model", "safety_checker"):
            object.__setattr__(self, name, _absolute(getattr(self, name)))
        if self.aesthetic_model is not None or self.safety_checker is not None:
            # The curation scores read the CLIP score stage's image embeddings.
            object.__setattr__(self, "clip_score", True)
        object.__setattr__(self, "lora", tuple(dataclasses.replace(a, source=_absolute(a.source)) for a in self.lora))
        for name in ("prior_steps", "decoder_steps", "super_res_steps"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 2, f"{name} must be an integer >= 2")
        for name in ("prior_guidance_scale", "decoder_guidance_scale"):
            v = getattr(self, name)
            _check(_is_number(v) and 0 <= v < float("inf"), f"{name} must be a finite number >= 0")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed must be an integer in [0, 2^63)")
        _check(self.image_format in IMAGE_FORMATS, f"image_format must be one of {list(IMAGE_FORMATS)}")
        _check(self.output_format in OUTPUT_FORMATS, f"output_format must be one of {list(OUTPUT_FORMATS)}")
        _check(_is_int(self.rows_per_shard) and self.rows_per_shard >= 1, "rows_per_shard must be >= 1")
        _check(_is_int(self.rows_per_read_task) and self.rows_per_read_task >= 1, "rows_per_read_task must be >= 1")
        _check(self.device in DEVICES, f"device must be one of {list(DEVICES)}")
        _check(self.dtype in DTYPE_NAMES, f"dtype must be one of {list(DTYPE_NAMES)}")
        _check(self.task in TASKS, f"task must be one of {list(TASKS)}")
        _check(isinstance(self.image_column, str) and bool(self.image_column), "image_column must be a column name")
        _check(self.min_clip_score is None or self.clip_score, "min_clip_score needs clip_score")
        _check(self.min_clip_score is None or (_is_number(self.min_clip_score) and -1 <= self.min_clip_score <= 1),
               "min_clip_score is a cosine: a number in [-1, 1]")
        _check(self.clip_model is None or self.clip_score, "clip_model needs clip_score")
        _check(self.strength is None or (_is_number(self.strength) and 0 < self.strength <= 1),
               "strength must be a number in (0, 1]")
        _check(self.strength is None or self.task == "generate", "strength is for generate with init images")
        _check(self.min_aesthetic is None or self.aesthetic_model is not None, "min_aesthetic needs aesthetic_model")
        _check(self.min_aesthetic is None or (_is_number(self.min_aesthetic) and math.isfinite(self.min_aesthetic)),
               "min_aesthetic must be a finite number")
        _check(isinstance(self.drop_unsafe, bool), "drop_unsafe must be true or false")
        _check(not self.drop_unsafe or self.safety_checker is not None, "drop_unsafe needs safety_checker")
        _check(self.limit is None or (_is_int(self.limit) and self.limit >= 1),
               f"limit must be an integer >= 1 (the number of input rows to take), got {self.limit!r}")
        _check(_is_int(self.images_per_prompt) and self.images_per_prompt >= 1,
               f"images_per_prompt must be an integer >= 1, got {self.images_per_prompt!r}")
        _check(_is_number(self.placement_timeout) and 0 <= self.placement_timeout < float("inf"),
               "placement_timeout must be a finite number of seconds >= 0")
        unknown = set(self.stages) - set(ALL_STAGE_NAMES)
        _check(not unknown, f"unknown stages {sorted(unknown)}; expected {', '.join(ALL_STAGE_NAMES)}")
        # Stages left out run with the defaults for the run's device; stages the run does not have are dropped.
        defaults = parse_stage_configs(None, self.device, self.dtype, self.stage_names)
        object.__setattr__(self, "stages", {n: self.stages.get(n, defaults[n]) for n in self.stage_names})

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The model stages of this run, in pipeline order."""
        first = "image_encoder" if self.task == "variations" else "prior"
        return (first, "decoder", "super_res") + (("clip_score",) if self.clip_score else ())

    def steps(self, stage: str) -> int:
        return getattr(self, f"{stage}_steps")

    def output_settings(self) -> dict[str, Any]:
        """Everything that changes the pixels of a row besides its prompt and seed (README.md, "Determinism and
        resuming"), and which rows are kept. ``limit`` and ``images_per_prompt`` are not here: they choose which
        rows the run has, not what a row holds, and a later run may widen them (pipeline.scope)."""
        settings = {
            "seed": self.seed,
            "prior_steps": self.prior_steps,
            "decoder_steps": self.decoder_steps,
            "super_res_steps": self.super_res_steps,
            "prior_guidance_scale": self.prior_guidance_scale,
            "decoder_guidance_scale": self.decoder_guidance_scale,
            "image_format": self.image_format,
            "output_format": self.output_format,
            "devices": {n: s.device for n, s in self.stages.items()},
            "dtypes": {n: s.dtype for n, s in self.stages.items()},
            "skip_networks": self.skip_networks,
        }
        # Optional features add keys only when used, so that the identity of runs without them stays what it was.
        if self.task == "variations":
            del settings["prior_steps"], settings["prior_guidance_scale"]  # no prior
            settings.update(task=self.task, image_column=self.image_column)
        if self.strength is not None:
            settings["strength"] = self.strength
        if self.clip_score:
            settings["clip_score"] = {"model": self.clip_model, "min_clip_score": self.min_clip_score}
        if self.aesthetic_model is not None:
            settings["aesthetic_score"] = {"model": self.aesthetic_model, "min_aesthetic": self.min_aesthetic}
        if self.safety_checker is not None:
            settings["safety_checker"] = {"model": self.safety_checker, "drop_unsafe": self.drop_unsafe}
        if self.lora:
            settings["lora"] = self.adapter_records()
        return settings

    def adapter_records(self) -> list[dict[str, Any]]:
        """Each adapter's source (without credentials), scale, network and weight hashes, for the manifest."""
        from karlo_model.lora import digest

        return [{"source": display_url(a.source), "scale": a.scale, **({"network": a.network} if a.network else {}),
                 **digest(a, self.storage_options)} for a in self.lora]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
