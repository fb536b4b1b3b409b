"""Trial runs over the first input rows (--limit) and several images per input row (--images-per-prompt): the rows
they choose, their keys, seeds and pixels, resuming into the same OUTPUT, and the scopes a run refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from pipeline_utils import PROMPTS, STEPS, read_output, reference, write_table

from jobs.cli import main
from jobs.run_report import format_summary
from pipeline import columns as C
from pipeline.config import STAGE_NAMES, ConfigError, RunConfig, StageConfig
from pipeline.dry_run import dry_run, format_dry_run
from pipeline.reader import first_rows, plan_inputs
from pipeline.run import OutputConflict, run
from pipeline.schema import derive_key, derive_seed, expand_samples, key_from_id, prepare_batch, sample_key
from pipeline.scope import Scope

# One row per batch, one actor and one thread per stage: every image equals Karlo.generate([prompt], [seed]).
ONE_ROW = {name: StageConfig(batch_size=1) for name in STAGE_NAMES}
# Plan order: a.parquet's rows (no ids: derived keys and seeds), then b.parquet's (ids and seeds of their own).
A_PROMPTS, B_PROMPTS, B_IDS, B_SEEDS = PROMPTS[:3], PROMPTS[3:5], ["cat", "dog"], [11, 22]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trial") / "in"
    write_table(root / "a.parquet", prompt=A_PROMPTS)
    write_table(root / "b.parquet", prompt=B_PROMPTS, id=B_IDS, seed=B_SEEDS)
    return root


def planned_rows() -> list[tuple[str, str, int]]:
    """(key, prompt, seed) of every input row in plan order, by the rules a run without these options follows."""
    a = [(derive_key("a.parquet", i), p) for i, p in enumerate(A_PROMPTS)]
    return [(k, p, derive_seed(0, k)) for k, p in a] + list(zip(B_IDS, B_PROMPTS, B_SEEDS))


def config(prompts: Path, out: Path, model: str, **kwargs) -> RunConfig:
    return RunConfig(input_url=str(prompts), output_url=str(out), model=model, stages=ONE_ROW,
                     rows_per_read_task=2, rows_per_shard=2, **{**STEPS, **kwargs})


def by_key(out) -> dict[str, dict]:
    rows = out.metadata.to_pylist()
    assert len({r["key"] for r in rows}) == len(rows), "duplicate keys"
    return {r["key"]: r for r in rows}


def assert_images(out, expected: dict[str, tuple[str, int]], model: str) -> None:
    """The run's images are exactly Karlo.generate's for these (prompt, seed) per key."""
    images = out.images()
    assert sorted(images) == sorted(expected)
    keys = sorted(expected)
    want, _, _ = reference(model, [expected[k][0] for k in keys], [expected[k][1] for k in keys])
    for key, image in zip(keys, want):
        assert np.array_equal(images[key], image), key


# ---------------------------------------------------------------------------------------------- without Ray


def test_first_rows_follow_plan_order(prompts):
    plan = plan_inputs(str(prompts), rows_per_task=2)
    cut = first_rows(plan, 4)
    assert [(f.source, f.num_rows) for f in cut.files] == [("a.parquet", 3), ("b.parquet", 1)]
    assert cut.total_rows == 4 and plan.total_rows == 5
    assert first_rows(plan, 2).files[0].num_rows == 2 and len(first_rows(plan, 2).files) == 1
    assert first_rows(plan, 99).files == plan.files


def test_copies_have_own_keys_and_seeds_whatever_the_batching():
    table = pa.table({C.PROMPT: ["x", "y", ""], C.SOURCE: ["s.parquet"] * 3,
                      C.SOURCE_ROW: pa.array([0, 1, 2], pa.int64()), C.ID: ["x1", None, "z"],
                      C.SEED: pa.array([5, None, 7], pa.int64())})
    settings = dict(run_seed=3, prior_guidance_scale=4.0, decoder_guidance_scale=8.0)
    whole = expand_samples(prepare_batch(table, **settings), 3)
    parts = [expand_samples(prepare_batch(table.slice(i, 1), **settings), 3) for i in range(3)]
    assert whole.equals(pa.concat_tables(parts))
    keys, seeds = whole.column(C.KEY).to_pylist(), whole.column(C.SEED).to_pylist()
    y = derive_key("s.parquet", 1)
    assert keys[:6] == ["x1", "x1-000000000001", "x1-000000000002", y, f"{y}-000000000001", f"{y}-000000000002"]
    assert whole.column(C.SAMPLE_INDEX).to_pylist() == [0, 1, 2] * 3
    assert seeds[0] == 5 and seeds[3] == derive_seed(3, y) and len(set(seeds[:6])) == 6
    assert seeds[1] == derive_seed(5, "x1-000000000001")
    # The empty prompt is an error row in each of its copies, so that every output row is accounted for.
    assert whole.column(C.ERROR).to_pylist()[6:] == ["prompt is empty"] * 3


def test_no_id_takes_a_copy_key():
    """An id spelled like another row's copy key is sanitised, as ids spelled like derived keys are."""
    copy = sample_key("cat", 1)
    assert key_from_id(copy) != copy and key_from_id(copy).startswith(copy + "-")
    assert sample_key("cat", 0) == "cat"


def test_scope_may_widen_but_not_narrow():
    def scope(taken, n=1, limit=None):
        return Scope(input_rows=10, taken=taken, limit=limit, images_per_prompt=n)

    trial = scope(4, limit=4).record()
    assert trial == {"limit": {"limit": 4, "input_rows_taken": 4, "input_rows_left_out": 6}}
    assert scope(10).record() == {}
    assert not scope(6, limit=6).narrowing(trial) and not scope(10).narrowing(trial)
    assert "--limit 4 or more" in scope(3, limit=3).narrowing(trial)
    assert "drop --limit" in scope(3, limit=3).narrowing({})
    assert not scope(10, limit=50).narrowing({})  # a limit past the input's end takes every row
    four = scope(10, n=4).record()
    assert not scope(10, n=5).narrowing(four)
    assert "give 4 or more" in scope(10, n=2).narrowing(four)
    assert "no sample_index column" in scope(10, n=2).narrowing({})


@pytest.mark.parametrize("option", ["--limit", "--images-per-prompt"])
@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_bad_values_are_one_usage_error(tmp_path, option, value):
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "in.parquet"), str(tmp_path / "out"), option, value])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "rror" in line]
    assert len(errors) == 1 and option in errors[0] and value in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["limit", "images_per_prompt"])
@pytest.mark.parametrize("value", [0, -1, "x", 1.5, True])
def test_run_config_checks_both(name, value):
    with pytest.raises(ConfigError, match=f"{name} must be an integer >= 1"):
        RunConfig(input_url="in", output_url="out", **{name: value})


# ---------------------------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_trial_runs_resume_into_the_full_run(prompts, tmp_path, ray_local, tiny_model):
    out = tmp_path / "out"
    rows = planned_rows()

    trial = run(config(prompts, out, tiny_model, limit=2))
    assert (trial.rows_in, trial.written, trial.left_out, trial.images_this_run) == (2, 2, 3, 2)
    assert trial.complete and not (out / "_SUCCESS").exists()
    assert "3 input rows after --limit" in format_summary(trial)
    first = read_output(out)
    assert sorted(first.keys) == sorted(k for k, _, _ in rows[:2])
    assert first.manifest["status"] == "limited" and first.manifest["limit"]["input_rows_left_out"] == 3
    assert "limit" not in json.dumps(first.manifest["identity"])

    # A larger limit continues the trial: up to b.parquet's first row, as its dry run says.
    report = dry_run(config(prompts, out, tiny_model, limit=4), echo=lambda _: None)
    assert (report["input"]["rows"], report["input"]["rows_taken"], report["input"]["rows_left_out"]) == (5, 4, 1)
    assert (report["output"]["rows_committed"], report["output"]["rows_to_generate"]) == (2, 2)
    assert "--limit: the first 4 rows, 1 left out" in format_dry_run(report)
    assert not report["output"]["conflict"] and not report["output"]["narrower"]
    # The whole input: only the rows after the trial's are generated.
    full = run(config(prompts, out, tiny_model))
    assert (full.rows_in, full.resumed, full.images_this_run, full.left_out) == (5, 2, 3, 0)
    assert full.ok and (out / "_SUCCESS").is_file()
    done = read_output(out)
    assert done.manifest["status"] == "complete" and "limit" not in done.manifest
    # Keys, seeds and pixels of one full run: today's rules (no sample_index), Karlo.generate's images.
    meta = by_key(done)
    assert {k: (r["prompt"], r["seed"]) for k, r in meta.items()} == {k: (p, s) for k, p, s in rows}
    assert C.SAMPLE_INDEX not in done.metadata.column_names
    assert_images(done, {k: (p, s) for k, p, s in rows}, tiny_model)

    # OUTPUT now holds every row: a trial run would leave committed rows out of its count, and is refused.
    with pytest.raises(OutputConflict, match="a run over all 5 input rows.*--overwrite"):
        run(config(prompts, out, tiny_model, limit=3))
    narrower = dry_run(config(prompts, out, tiny_model, limit=3), echo=lambda _: None)["output"]
    assert "a run over all 5 input rows" in narrower["narrower"] and narrower["rows_to_generate"] == 0
    with pytest.raises(OutputConflict, match="one image per prompt"):
        run(config(prompts, out, tiny_model, images_per_prompt=2))


@pytest.mark.slow
def test_images_per_prompt(prompts, tmp_path, ray_local, tiny_model):
    out = tmp_path / "out"
    # A row without an id or seed (derived key and seed), and one with both.
    prompts_cd = write_table(tmp_path / "cd.parquet", prompt=PROMPTS[5:7], id=[None, "cat"], seed=[None, 11])
    derived = derive_key("cd.parquet", 0)
    rows = [(derived, PROMPTS[5], derive_seed(0, derived)), ("cat", PROMPTS[6], 11)]

    s = run(config(prompts_cd, out, tiny_model, images_per_prompt=3))
    assert (s.rows_in, s.written, s.errors) == (6, 6, 0) and s.ok
    assert "2 prompts x 3 images = 6 rows" in format_summary(s)
    meta = by_key(read_output(out))
    expected = {}
    for key, prompt, seed in rows:
        copies = [meta[sample_key(key, i)] for i in range(3)]
        assert [c["sample_index"] for c in copies] == [0, 1, 2]
        assert copies[0]["seed"] == seed and len({c["seed"] for c in copies}) == 3
        expected.update({c["key"]: (prompt, c["seed"]) for c in copies})
    assert_images(read_output(out), expected, tiny_model)  # copy 0: the one-image run's image

    # An interrupted run with more images per prompt: one shard's marker was never written. The rerun regenerates
    # that shard's rows once and adds only the new copies; fewer copies are refused.
    markers = sorted((out / "_commits").glob("*.json"))
    victim = json.loads(markers[0].read_text())
    markers[0].unlink()
    (out / "_SUCCESS").unlink()
    wider = run(config(prompts_cd, out, tiny_model, images_per_prompt=4))
    assert (wider.rows_in, wider.written, wider.resumed) == (8, 8, 6 - victim["rows"]) and wider.ok
    assert wider.images_this_run == victim["rows"] + 2
    final = by_key(read_output(out))
    assert {k: final[k]["seed"] for k in meta} == {k: r["seed"] for k, r in meta.items()}
    assert sorted(r["sample_index"] for r in final.values()) == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(OutputConflict, match="4 images per prompt"):
        run(config(prompts_cd, out, tiny_model, images_per_prompt=2))
