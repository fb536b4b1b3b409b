"""The ``karlo`` command: a real run through the console script, every usage error a user can make, and
make-tiny-model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from pipeline_utils import read_output, write_table

from jobs.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "prompts.parquet"
FEW_STEPS = ["--prior-steps", "3", "--decoder-steps", "3", "--super-res-steps", "2"]


def karlo(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_usage_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.slow
def test_generate_example_with_the_console_script(tmp_path, tiny_model):
    """The embedded default on a laptop: `karlo generate` starts its own Ray and uses the tiny random model
    (already built into KARLO_CACHE by this session)."""
    karlo_bin = Path(sys.executable).with_name("karlo")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "out"
    proc = subprocess.run([str(karlo_bin), "generate", str(EXAMPLE), str(out), *FEW_STEPS], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    assert "Using the embedded tiny model (tiny-random-v1) with RANDOM weights" in proc.stderr
    assert "--model" in proc.stderr
    assert "rows read        8" in proc.stdout
    assert "images written   8" in proc.stdout and "error rows       0" in proc.stdout
    assert f"output           {out}" in proc.stdout and "images/s" in proc.stdout
    assert "Traceback" not in proc.stderr
    # Without a terminal, stderr holds our lines: no Ray start-up notes, progress blocks or advisory warnings.
    for chatter in ("Started a local Ray instance", "Token authentication", "logging_progress", "Execution plan",
                    "only received", "Progress bars disabled"):
        assert chatter not in proc.stderr, chatter
    others = [line for line in proc.stderr.splitlines() if not line.startswith("[karlo]")]
    assert len(others) <= 4, proc.stderr  # the random-weights note, the Ray line, Ray's core-worker line

    result = read_output(out)
    example = pq.read_table(EXAMPLE).to_pylist()
    assert sorted(result.keys) == sorted(r["id"] for r in example)
    assert (out / "_SUCCESS").is_file() and result.manifest["counts"]["written"] == 8
    assert result.manifest["identity"]["model"]["model"] == tiny_model
    assert len(list((out / "images").glob("*.tar"))) >= 1

    # A rerun of the finished run, and one with other settings, are answered from OUTPUT alone: with RAY_ADDRESS
    # naming no cluster, starting Ray would fail.
    no_ray = {**env, "RAY_ADDRESS": "127.0.0.1:9"}
    again = subprocess.run([str(karlo_bin), "generate", str(EXAMPLE), str(out), *FEW_STEPS], env=no_ray, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-5000:]
    assert "resuming: 8 of 8 rows are already committed" in again.stderr and "images written   8" in again.stdout
    refused = subprocess.run([str(karlo_bin), "generate", str(EXAMPLE), str(out), *FEW_STEPS, "--seed", "5"],
                             env=no_ray, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "already holds a run with different settings" in refused.stderr, \
        refused.stderr[-5000:]


def test_missing_input(tmp_path):
    result = karlo("generate", str(tmp_path / "nope.parquet"), str(tmp_path / "out"), *FEW_STEPS)
    assert_usage_error(result, f"error: input does not exist: {tmp_path / 'nope.parquet'}")
    assert not (tmp_path / "out").exists()


def test_table_without_prompt_column(tmp_path):
    table = write_table(tmp_path / "t.parquet", text=["a cat"], seed=[1])
    result = karlo("generate", str(table), str(tmp_path / "out"), *FEW_STEPS)
    assert_usage_error(result, "has no 'prompt' column; its columns are: text, seed")


def test_empty_folder_input(tmp_path):
    (tmp_path / "in").mkdir()
    result = karlo("generate", str(tmp_path / "in"), str(tmp_path / "out"))
    assert_usage_error(result, "error: no Parquet files found at")


def test_not_parquet_input(tmp_path):
    bad = tmp_path / "prompts.parquet"
    bad.write_text("prompt\na cat\n")
    result = karlo("generate", str(bad), str(tmp_path / "out"))
    assert_usage_error(result, "could be read: prompts.parquet: not a Parquet file")


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("prior: {batchsize: 2}\n", "Error: stage config [prior]: unknown keys ['batchsize']"),
        ("prior: {batch_size: 2\n", "Error: stage config is not valid YAML"),
        ("decoder: {device: tpu}\n", "Error: stage config [decoder]: device must be one of ['cpu', 'cuda']"),
        ("gpu: {}\n", "Error: stage config: unknown sections ['gpu']"),
    ],
)
def test_bad_stage_config(tmp_path, yaml_text, message):
    path = tmp_path / "stages.yaml"
    path.write_text(yaml_text)
    result = karlo("generate", str(EXAMPLE), str(tmp_path / "out"), "--stage-config", str(path))
    assert_usage_error(result, message)
    assert not (tmp_path / "out").exists()


def test_stage_config_file_missing(tmp_path):
    result = karlo("generate", str(EXAMPLE), str(tmp_path / "out"), "--stage-config", str(tmp_path / "no.yaml"))
    assert_usage_error(result, "does not exist")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prior-steps", "1"], "Error: prior_steps must be an integer >= 2"),
        (["--decoder-guidance-scale", "nan"], "Error: decoder_guidance_scale must be a finite number >= 0"),
        (["--prior-guidance-scale", "-1"], "Error: prior_guidance_scale must be a finite number >= 0"),
        (["--seed", "-1"], "Error: seed must be an integer in [0, 2^63)"),
        (["--rows-per-shard", "0"], "Error: rows_per_shard must be >= 1"),
        (["--image-format", "gif"], "Invalid value for '--image-format'"),
        (["--device", "tpu"], "Invalid value for '--device'"),
    ],
)
def test_bad_settings(tmp_path, args, message):
    result = karlo("generate", str(EXAMPLE), str(tmp_path / "out"), *args)
    assert_usage_error(result, message)


def test_gpu_stages_without_gpus_fail_before_any_work(tmp_path, ray_local, tiny_model):
    """A stage config for a GPU machine, run where Ray has no GPU: a clear error, and nothing left in OUTPUT
    that would make the corrected rerun look like a different run."""
    path = tmp_path / "stages.yaml"
    path.write_text("defaults: {device: cuda}\n")
    out = tmp_path / "out"
    result = karlo("generate", str(EXAMPLE), str(out), "--model", tiny_model, "--stage-config", str(path))
    assert_usage_error(result, "error: the stage actors need 1 GPU (prior 1 x 0.08, decoder 1 x 0.3, super_res 1 x 0.6 GPU per actor, "
                                     "packed so that each GPU holds its share of every stage) but the Ray cluster has 0")
    assert not out.exists() or not any(out.iterdir())


def test_output_conflict_is_a_usage_error(tmp_path, ray_local, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"identity": {"input": "elsewhere.parquet"}}))
    result = karlo("generate", str(EXAMPLE), str(out), "--model", tiny_model, *FEW_STEPS)
    assert_usage_error(result, f"error: {out} already holds a run with different settings")
    assert "--overwrite" in result.output


def test_make_tiny_model_writes_a_loadable_model(tmp_path, tiny_model):
    from karlo_model import Karlo

    target = tmp_path / "model"
    result = karlo("make-tiny-model", str(target))
    assert result.exit_code == 0, result.output
    assert f"wrote a random-weight tiny Karlo model to {target}" in result.output
    model = Karlo.from_pretrained(target)
    out = model.generate(["a cat"], [0], prior_steps=2, decoder_steps=2, super_res_steps=2)
    assert out.images.shape == (1, 256, 256, 3) and out.images.dtype == np.uint8
    # Seed 0 of the tiny preset is the embedded default model, byte for byte.
    ours = sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())
    assert ours == sorted(p.relative_to(tiny_model) for p in Path(tiny_model).rglob("*") if p.is_file())
    for rel in ours:
        assert (target / rel).read_bytes() == (Path(tiny_model) / rel).read_bytes(), rel


def test_make_tiny_model_other_seed_and_preset(tmp_path):
    from karlo_model import Karlo

    result = karlo("make-tiny-model", str(tmp_path / "alt"), "--seed", "3", "--preset", "tiny-alt")
    assert result.exit_code == 0, result.output
    model = Karlo.from_pretrained(tmp_path / "alt", stages=("prior",))
    assert json.loads((tmp_path / "alt" / "model_index.json").read_text())["_karlo_seed"] == 3
    assert model.config.prior.embedding_dim == 24
    result = karlo("make-tiny-model", str(tmp_path / "x"), "--preset", "huge")
    assert result.exit_code == 2 and "Invalid value for '--preset'" in result.output
    shutil.rmtree(tmp_path / "alt")
