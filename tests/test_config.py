"""Run settings and the YAML stage-config file: defaults, overrides and every message a user can get."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest

from pipeline.config import (
    GPU_BATCH,
    GPU_SHARES,
    STAGE_NAMES,
    ConfigError,
    RunConfig,
    StageConfig,
    load_stage_config_file,
    parse_stage_configs,
)
from pipeline.encode import ENCODE_CPUS


def load(text: str, device: str = "cpu", dtype: str = "float32") -> dict[str, StageConfig]:
    return load_stage_config_file(text, device, dtype)


def load_error(text: str, device: str = "cpu", dtype: str = "float32") -> str:
    with pytest.raises(ConfigError) as e:
        load(text, device, dtype)
    return str(e.value)


# ---------------------------------------------------------------------------------------------- stage configs


def test_cpu_defaults_fit_two_cpus():
    stages = parse_stage_configs(None, "cpu", "float32")
    assert list(stages) == list(STAGE_NAMES)
    cores = os.cpu_count()
    for name, s in stages.items():
        assert s == StageConfig(batch_size=4, min_actors=cores if name in ("decoder", "super_res") else 1,
                                max_actors=cores, num_cpus=0.2, num_gpus=0.0, device="cpu", dtype="float32")
        assert s.torch_threads == 1


@pytest.mark.parametrize("names", [STAGE_NAMES + ("clip_score",), ("image_encoder", "decoder", "super_res", "clip_score")])
def test_cpu_defaults_leave_half_a_cpu_on_two_cpus(monkeypatch, names):
    """Every pool at its minimum, CLIP scoring's included, plus one image encoder, leave the 0.5 CPU the read and
    prepare tasks need on a 2-CPU machine (pipeline.run.check_resources)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    stages = parse_stage_configs(None, "cpu", "float32", names)
    assert sum(s.num_cpus * s.min_actors for s in stages.values()) + ENCODE_CPUS + 0.5 <= 2


def test_cuda_defaults_share_one_gpu_by_compute():
    stages = parse_stage_configs(None, "cuda", "bfloat16")
    for name, s in stages.items():
        assert (s.device, s.dtype, s.num_gpus, s.batch_size) == ("cuda", "bfloat16", GPU_SHARES[name], GPU_BATCH[name])
    assert sum(s.num_gpus for s in stages.values()) <= 1.0
    assert stages["super_res"].num_gpus > stages["decoder"].num_gpus > stages["prior"].num_gpus


def test_empty_file_gives_the_defaults():
    assert load("") == parse_stage_configs(None, "cpu", "float32")
    assert load("# nothing\n") == parse_stage_configs(None, "cpu", "float32")
    assert load("prior:\n") == parse_stage_configs(None, "cpu", "float32")


def test_per_stage_override_leaves_the_others_alone():
    stages = load("decoder:\n  batch_size: 2\n  num_cpus: 0.5\n")
    default = parse_stage_configs(None, "cpu", "float32")
    assert stages["decoder"] == dataclasses.replace(default["decoder"], batch_size=2, num_cpus=0.5)
    assert stages["prior"] == default["prior"] and stages["super_res"] == default["super_res"]


def test_defaults_section_then_stage_sections():
    text = """
defaults:   {device: cuda, dtype: float16, batch_size: 16}
prior:      {batch_size: 64, actors: 1, num_gpus: 0.1}
decoder:    {actors: [1, 4], num_gpus: 0.3}
super_res:  {batch_size: 8, actors: [2, 8], num_gpus: 0.6}
"""
    stages = load(text)  # the file's defaults beat the run's device and dtype
    assert stages["prior"] == StageConfig(64, 1, 1, num_cpus=1, num_gpus=0.1, device="cuda", dtype="float16")
    assert stages["decoder"] == StageConfig(16, 1, 4, num_cpus=1, num_gpus=0.3, device="cuda", dtype="float16")
    assert stages["super_res"] == StageConfig(8, 2, 8, num_cpus=1, num_gpus=0.6, device="cuda", dtype="float16")


def test_stage_device_picks_that_device_defaults():
    stages = load("super_res: {device: cuda}\n")
    assert stages["super_res"].num_gpus == GPU_SHARES["super_res"]
    assert stages["super_res"].batch_size == GPU_BATCH["super_res"]
    assert stages["prior"].device == "cpu" and stages["prior"].num_gpus == 0


@pytest.mark.parametrize(
    "actors, expected",
    [("3", (3, 3)), ("[1, 4]", (1, 4)), ("[2, 2]", (2, 2))],
)
def test_actors_fixed_or_autoscaling(actors, expected):
    s = load(f"prior: {{actors: {actors}}}\n")["prior"]
    assert (s.min_actors, s.max_actors) == expected


def test_fractional_cpus_give_one_torch_thread_and_whole_cpus_theirs():
    stages = load("prior: {num_cpus: 0.25}\ndecoder: {num_cpus: 2}\nsuper_res: {num_cpus: 0}\n")
    assert [stages[n].torch_threads for n in STAGE_NAMES] == [1, 2, 1]


@pytest.mark.parametrize(
    "text, message",
    [
        ("priors: {batch_size: 2}\n",
         "stage config: unknown sections ['priors']; expected defaults, prior, image_encoder, decoder, super_res, clip_score"),
        ("prior: {batchsize: 2}\n", "stage config [prior]: unknown keys ['batchsize']; allowed: "),
        ("defaults: {gpus: 1}\n", "stage config [defaults]: unknown keys ['gpus']"),
        ("prior: {min_actors: 2}\n", "stage config [prior]: unknown keys ['min_actors']"),
        ("prior: 3\n", "stage config [prior] must be a mapping"),
        ("- prior\n- decoder\n", "stage config must be a mapping of sections"),
        ("just text\n", "stage config must be a mapping of sections"),
        ('decoder: {batch_size: "8"}\n', "stage config [decoder]: batch_size must be an integer >= 1"),
        ("decoder: {batch_size: 8.0}\n", "stage config [decoder]: batch_size must be an integer >= 1"),
        ("decoder: {batch_size: true}\n", "stage config [decoder]: batch_size must be an integer >= 1"),
        ("decoder: {batch_size: 0}\n", "stage config [decoder]: batch_size must be an integer >= 1"),
        ("prior: {num_gpus: -1}\n", "stage config [prior]: num_gpus must be a number >= 0"),
        ("prior: {num_cpus: -0.5}\n", "stage config [prior]: num_cpus must be a number >= 0"),
        ('prior: {num_cpus: "1"}\n', "stage config [prior]: num_cpus must be a number >= 0"),
        ("super_res: {device: tpu}\n", "stage config [super_res]: device must be one of ['cpu', 'cuda']"),
        ("super_res: {dtype: fp16}\n",
         "stage config [super_res]: dtype must be one of ['float32', 'bfloat16', 'float16']"),
        ("super_res: {device: cuda, num_gpus: 0}\n", "stage config [super_res]: a cuda stage needs num_gpus > 0"),
        ("defaults: {device: cuda, num_gpus: 0}\n", "stage config [prior]: a cuda stage needs num_gpus > 0"),
        ("prior: {num_gpus: 0.5}\n", "stage config [prior]: num_gpus > 0 needs device: cuda"),
        ("prior: {actors: two}\n", "stage config [prior]: actors must be an integer or [min, max], got 'two'"),
        ("prior: {actors: [1, 2, 3]}\n", "stage config [prior]: actors must be an integer or [min, max], got [1, 2, 3]"),
        ("prior: {actors: [1.5, 2]}\n", "stage config [prior]: actors must be an integer or [min, max]"),
        ("prior: {actors: [4, 1]}\n", "stage config [prior]: actors: max must be >= min"),
        ("prior: {actors: 0}\n", "stage config [prior]: actors: the minimum must be an integer >= 1"),
    ],
)
def test_stage_config_errors(text, message):
    assert message in load_error(text)


def test_stage_config_error_from_the_run_device():
    # --device cuda with a stage that forces no GPU.
    assert load_error("decoder: {num_gpus: 0}\n", device="cuda") == (
        "stage config [decoder]: a cuda stage needs num_gpus > 0"
    )


@pytest.mark.parametrize("text", ["prior: {batch_size: 2\n", "prior:\n  batch_size: 2\n decoder: 1\n", "a: b: c\n"])
def test_invalid_yaml(text):
    message = load_error(text)
    assert message.startswith("stage config is not valid YAML: ")
    assert "line" in message  # the parser's position helps find the mistake


def test_stage_config_direct_construction_is_checked():
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        StageConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"actors: max must be >= min"):
        StageConfig(batch_size=1, min_actors=3, max_actors=2)


# ---------------------------------------------------------------------------------------------- run config


def run_config(**kwargs) -> RunConfig:
    kwargs.setdefault("input_url", "prompts.parquet")
    kwargs.setdefault("output_url", "out")
    return RunConfig(**kwargs)


def run_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        run_config(**kwargs)
    return str(e.value)


def test_run_defaults():
    cfg = run_config()
    assert (cfg.prior_steps, cfg.decoder_steps, cfg.super_res_steps) == (25, 25, 7)
    assert (cfg.prior_guidance_scale, cfg.decoder_guidance_scale) == (4.0, 8.0)
    assert (cfg.image_format, cfg.output_format, cfg.device, cfg.dtype) == ("png", "webdataset", "cpu", "float32")
    assert cfg.model is None and not cfg.overwrite
    assert cfg.stages == parse_stage_configs(None, "cpu", "float32")
    assert [cfg.steps(n) for n in STAGE_NAMES] == [25, 25, 7]


def test_run_device_and_dtype_set_the_default_stages():
    cfg = run_config(device="cuda", dtype="bfloat16")
    assert cfg.stages == parse_stage_configs(None, "cuda", "bfloat16")
    assert cfg.output_settings()["devices"] == {n: "cuda" for n in STAGE_NAMES}
    assert cfg.output_settings()["dtypes"] == {n: "bfloat16" for n in STAGE_NAMES}


def test_missing_stages_take_the_defaults():
    cfg = run_config(stages={"decoder": StageConfig(batch_size=2)})
    assert list(cfg.stages) == list(STAGE_NAMES)
    assert cfg.stages["decoder"].batch_size == 2
    assert cfg.stages["prior"] == parse_stage_configs(None, "cpu", "float32")["prior"]


def test_unknown_stage_name():
    assert run_error(stages={"upscaler": StageConfig(batch_size=2)}) == (
        "unknown stages ['upscaler']; expected prior, image_encoder, decoder, super_res, clip_score"
    )


def test_output_settings_hold_what_changes_pixels():
    a, b = run_config(), run_config(decoder_guidance_scale=5.0)
    assert a.output_settings() != b.output_settings()
    # Resources do not change a row's image (README.md: a row's image depends on its prompt, seed, settings and model): batch size and actors stay out of the identity.
    c = run_config(stages={n: StageConfig(batch_size=1, min_actors=1, max_actors=3) for n in STAGE_NAMES})
    assert c.output_settings() == a.output_settings()
    assert run_config(rows_per_shard=10).output_settings() == a.output_settings()


def test_storage_options_stay_out_of_the_repr():
    cfg = run_config(storage_options={"key": "AKIAEXAMPLE", "secret": "s3cr3t-value"})
    assert "s3cr3t" not in repr(cfg) and "AKIAEXAMPLE" not in repr(cfg)


@pytest.mark.parametrize("name", ["prior_steps", "decoder_steps", "super_res_steps"])
@pytest.mark.parametrize("value", [1, 0, -3, 2.5, "10", True])
def test_bad_steps(name, value):
    assert run_error(**{name: value}) == f"{name} must be an integer >= 2"


def test_two_steps_is_the_minimum():
    assert run_config(prior_steps=2, decoder_steps=2, super_res_steps=2).super_res_steps == 2


@pytest.mark.parametrize("name", ["prior_guidance_scale", "decoder_guidance_scale"])
@pytest.mark.parametrize("value", [math.nan, -1.0, -0.001, math.inf, "4", None, False])
def test_bad_guidance(name, value):
    assert run_error(**{name: value}) == f"{name} must be a finite number >= 0"


@pytest.mark.parametrize("value", [0, 0.0, 1, 7.5])
def test_guidance_accepts_finite_non_negative(value):
    assert run_config(prior_guidance_scale=value).prior_guidance_scale == value


@pytest.mark.parametrize("value", [-1, 2**63, 1.0, "7", None, True])
def test_bad_seed(value):
    assert run_error(seed=value) == "seed must be an integer in [0, 2^63)"


def test_seed_range():
    assert run_config(seed=2**63 - 1).seed == 2**63 - 1
    assert run_config(seed=0).seed == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_format="gif"), "image_format must be one of ['png', 'jpeg', 'webp']"),
        (dict(image_format="jpg"), "image_format must be one of ['png', 'jpeg', 'webp']"),
        (dict(output_format="tar"), "output_format must be one of ['webdataset', 'parquet']"),
        (dict(rows_per_shard=0), "rows_per_shard must be >= 1"),
        (dict(rows_per_shard=1.5), "rows_per_shard must be >= 1"),
        (dict(rows_per_read_task=0), "rows_per_read_task must be >= 1"),
        (dict(device="tpu"), "device must be one of ['cpu', 'cuda']"),
        (dict(dtype="float64"), "dtype must be one of ['float32', 'bfloat16', 'float16']"),
    ],
)
def test_bad_run_settings(kwargs, message):
    assert run_error(**kwargs) == message
