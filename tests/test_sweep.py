"""Sweeps: spec validation and grid points, seeds-per-prompt expansion, the summary, and a 4-point sweep on the
tiny model run through the console script, killed mid-way and resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from pipeline_utils import PROMPTS, STEPS, file_states, read_output, write_table

from jobs.cli import main
from jobs.sweep.runner import expand_prompts
from jobs.sweep.spec import load_spec, parse_spec, points
from jobs.sweep.summary import markdown, summarize
from pipeline.config import ConfigError
from pipeline.schema import derive_seed

REPO = Path(__file__).resolve().parents[1]


def spec(tmp_path, **changes) -> dict:
    base = {"prompts": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "sweep"), "settings": dict(STEPS),
            "grid": {"prior_guidance_scale": [2.0, 4.0], "decoder_guidance_scale": [4, 8.5]}}
    return {**base, **changes}


def test_grid_points_names_and_order(tmp_path):
    s = parse_spec(spec(tmp_path, settings={}, grid={"prior_guidance_scale": [2.0, 4.0],
                                                     "steps": [[3, 3, 2], [4, 4, 3]], "seeds_per_prompt": [1, 2]}))
    grid = points(s)
    assert [p.name for p in grid] == [
        "pg2_steps3-3-2_n1", "pg2_steps3-3-2_n2", "pg2_steps4-4-3_n1", "pg2_steps4-4-3_n2",
        "pg4_steps3-3-2_n1", "pg4_steps3-3-2_n2", "pg4_steps4-4-3_n1", "pg4_steps4-4-3_n2",
    ]
    p = grid[3]
    assert (p.settings["prior_steps"], p.settings["decoder_steps"], p.settings["super_res_steps"]) == (4, 4, 3)
    assert p.settings["decoder_guidance_scale"] == 8.0 and p.seeds_per_prompt == 2  # defaults filled in
    assert p.as_dict(s)["settings"]["prompts"] == str(tmp_path / "prompts.parquet")


def test_image_to_image_strength_is_an_axis(tmp_path):
    grid = points(parse_spec(spec(tmp_path, grid={"strength": [0.3, 0.9]})))
    assert [p.name for p in grid] == ["s0.3", "s0.9"] and [p.settings["strength"] for p in grid] == [0.3, 0.9]
    with pytest.raises(ConfigError, match="strength must be a number in"):
        points(parse_spec(spec(tmp_path, grid={"strength": [0.5, 1.5]})))


def test_prompt_sets_and_models_are_axes(tmp_path):
    s = parse_spec(spec(tmp_path, prompts={"a": "s3://b/a.parquet", "b": "s3://b/b/"},
                        models={"tiny": None, "real": "s3://b/karlo"}, grid={"seed": [0, 1]}))
    names = [p.name for p in points(s)]
    assert names[:3] == ["a_tiny_seed0", "a_tiny_seed1", "a_real_seed0"] and len(names) == 8
    assert parse_spec(spec(tmp_path, grid={})).models == {"tiny": None}
    assert [p.name for p in points(parse_spec(spec(tmp_path, grid={})))] == ["default"]


def test_relative_paths_resolve_against_the_spec_file(tmp_path):
    (tmp_path / "specs").mkdir()
    path = tmp_path / "specs" / "s.yaml"
    path.write_text(yaml.safe_dump({"prompts": "../p.parquet", "output": "out", "model": "s3://b/m"}))
    s = load_spec(str(path))
    assert s.prompts == {"p": str(tmp_path / "p.parquet")} and s.output == str(tmp_path / "specs" / "out")
    assert s.models == {"m": "s3://b/m"}


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown keys ['colour']"),
    ({"grid": {"guidance": [1]}}, "unknown grid axis 'guidance'"),
    ({"grid": {"prior_guidance_scale": []}}, "grid.prior_guidance_scale must be a non-empty list"),
    ({"grid": {"seed": [1, 1]}}, "grid.seed has repeated values"),
    ({"settings": {}, "grid": {"steps": [[3, 3]]}}, "grid.steps values are [prior, decoder, super_res]"),
    ({"grid": {"steps": [[3, 3, 2]]}}, "do not also set them one by one"),
    ({"grid": {"seeds_per_prompt": [0]}}, "seeds_per_prompt values must be integers >= 1"),
    ({"grid": {"prior_guidance_scale": [-1.0]}}, "sweep point pg-1: prior_guidance_scale must be a finite number"),
    ({"grid": {"prior_guidance_scale": [2, 2.0]}}, "two grid points would both be named 'pg2'"),
    ({"settings": {"input_url": "x"}}, "unknown settings ['input_url']"),
    ({"model": None, "models": {"a": None}}, "give `model` or `models`, not both"),
    ({"stages": {"prior": {"batch": 1}}}, "unknown keys ['batch']"),
    ({"prompts": {"a/b": "x"}}, "prompts name 'a/b' may only use"),
])
def test_spec_errors(tmp_path, change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        points(parse_spec(spec(tmp_path, **change)))


def test_sweep_command_usage_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path, grid={"guidance": [1]})))
    result = CliRunner().invoke(main, ["sweep", str(path)])
    assert result.exit_code == 2 and "unknown grid axis 'guidance'" in result.output
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "sweep spec not found" in result.output
    path.write_text(yaml.safe_dump(spec(tmp_path)))  # prompts.parquet does not exist
    result = CliRunner().invoke(main, ["sweep", str(path)])
    assert result.exit_code == 2 and "error: input does not exist" in result.output
    assert not (tmp_path / "sweep").exists()


def test_expand_prompts(tmp_path):
    write_table(tmp_path / "in" / "a.parquet", prompt=["a cat", "a dog"], id=["cat", None], seed=[5, None],
                extra=[1, 2])
    dest = expand_prompts(str(tmp_path / "in"), 3, str(tmp_path / "x3"))
    t = pq.read_table(Path(dest) / "a.parquet").to_pydict()
    derived = t["prompt_key"][3]
    assert t["prompt"] == ["a cat"] * 3 + ["a dog"] * 3 and t["extra"] == [1] * 3 + [2] * 3
    assert t["id"] == ["cat-0", "cat-1", "cat-2", f"{derived}-0", f"{derived}-1", f"{derived}-2"]
    assert t["seed"] == [5, derive_seed(5, "cat-1"), derive_seed(5, "cat-2"), None, None, None]
    assert t["sample_index"] == [0, 1, 2] * 2
    assert t["prompt_key"][:3] == ["cat"] * 3
    # Rows seeded 1 and 2: no copy of one shares the seed of a copy of the other (seed + i would, 1 + 1 = 2 + 0).
    write_table(tmp_path / "near" / "n.parquet", prompt=["a", "b"], id=["a", "b"], seed=[1, 2])
    near = pq.read_table(Path(expand_prompts(str(tmp_path / "near"), 4, str(tmp_path / "n4"))) / "n.parquet")
    assert len(set(near.column("seed").to_pylist())) == 8
    write_table(tmp_path / "bad" / "b.parquet", prompt=["a"], id=[""])
    with pytest.raises(ConfigError, match="b.parquet row 0: id is empty"):
        expand_prompts(str(tmp_path / "bad"), 2, str(tmp_path / "y"))
    write_table(tmp_path / "clash" / "c.parquet", prompt=["a"], sample_index=[0])
    with pytest.raises(ConfigError, match="rename them in the prompt table"):
        expand_prompts(str(tmp_path / "clash"), 2, str(tmp_path / "z"))


def test_summary_reads_manifests_and_clip_scores(tmp_path):
    s = parse_spec(spec(tmp_path, grid={"seed": [0, 1, 2]}))
    grid = points(s)
    done = tmp_path / "sweep" / "seed0"
    (done / "metadata").mkdir(parents=True)
    (done / "manifest.json").write_text(json.dumps({
        "counts": {"input_rows": 4, "written": 3, "errors": 1},
        "last_attempt": {"images_per_second": 1.5, "seconds": 2.0}}))
    (done / "_SUCCESS").write_text("{}")
    pq.write_table(pa.table({"key": ["a", "b"], "clip_score": [0.25, 0.35]}), done / "metadata" / "metadata_0.parquet")
    pq.write_table(pa.table({"key": ["c"], "clip_score": [None]}, schema=pa.schema(
        [("key", pa.string()), ("clip_score", pa.float64())])), done / "metadata" / "metadata_1.parquet")
    # A shard whose writer died before its marker: not part of the run, its scores not in the mean.
    pq.write_table(pa.table({"key": ["d"], "clip_score": [1.0]}), done / "metadata" / "metadata_2.parquet")
    (done / "_commits").mkdir()  # the summary reads committed shards only
    for i, rows in enumerate((2, 1)):
        (done / "_commits" / f"{i:016x}.json").write_text(json.dumps(
            {"shard": f"{i:016x}", "rows": rows, "errors": 0, "files": [f"metadata/metadata_{i}.parquet"], "bytes": 0}))
    (tmp_path / "sweep" / "seed1").mkdir()
    (tmp_path / "sweep" / "seed1" / "manifest.json").write_text(json.dumps({"input_rows": 4, "status": "running"}))
    table = summarize(s, grid, {"seed2": "conflict"})
    rows = table.to_pylist()
    assert table.column_names[:3] == ["point", "seed", "status"]
    assert rows[0]["status"] == "complete" and rows[0]["errors"] == 1 and rows[0]["images_per_second"] == 1.5
    assert rows[0]["clip_score"] == pytest.approx(0.30)
    assert rows[1]["status"] == "incomplete" and rows[1]["rows"] == 4 and rows[1]["clip_score"] is None
    assert rows[2]["status"] == "failed" and rows[2]["message"] == "conflict"
    md = markdown(table)
    assert md.splitlines()[0].startswith("| point | seed | status | rows |")
    assert "| seed0 | 0 | complete | 4 | 3 | 1 | 1.5 | 2 | 0.3 |" in md


def _sweep(args, env, **kw):
    karlo_bin = Path(sys.executable).with_name("karlo")
    return subprocess.Popen([str(karlo_bin), "sweep", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


@pytest.mark.slow
def test_sweep_end_to_end_interrupted_and_resumed(tmp_path, tiny_model):
    """Four points on the tiny model; the sweep is killed while the third point runs, then rerun: finished points
    are left alone, the interrupted one resumes, and the summary covers all four."""
    write_table(tmp_path / "prompts.parquet", prompt=PROMPTS[:3], id=["a", "b", "c"])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path, prompts="prompts.parquet", output="sweep",
                                        settings={**STEPS, "rows_per_shard": 1},
                                        grid={"prior_guidance_scale": [2.0, 4.0], "seeds_per_prompt": [1, 2]})))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    root = tmp_path / "sweep"
    names = ["pg2_n1", "pg2_n2", "pg4_n1", "pg4_n2"]

    proc = _sweep([str(path)], env)
    deadline = time.time() + 600
    while not (root / names[2] / "manifest.json").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    proc.stdout.close()
    assert (root / names[1] / "_SUCCESS").is_file() and not (root / names[2] / "_SUCCESS").exists()
    before = {n: file_states(root / n) for n in names[:2]}

    proc = _sweep([str(path)], env)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    assert f"[1/4] {names[0]}: finished earlier, skipped" in out and f"[2/4] {names[1]}: finished earlier" in out
    assert f"[3/4] {names[2]}: running" in out
    assert {n: file_states(root / n) for n in names[:2]} == before

    sweep = json.loads((root / "sweep.json").read_text())
    assert [p["name"] for p in sweep["points"]] == names
    assert sweep["points"][1]["settings"]["seeds_per_prompt"] == 2
    assert sweep["points"][2]["settings"]["prior_guidance_scale"] == 4.0
    summary = pq.read_table(root / "summary.parquet").to_pylist()
    assert [(r["point"], r["status"], r["rows"], r["written"], r["errors"]) for r in summary] == [
        ("pg2_n1", "complete", 3, 3, 0), ("pg2_n2", "complete", 6, 6, 0),
        ("pg4_n1", "complete", 3, 3, 0), ("pg4_n2", "complete", 6, 6, 0)]
    assert all(r["images_per_second"] > 0 for r in summary)
    assert (root / "summary.md").read_text() == markdown(pq.read_table(root / "summary.parquet"))

    resumed = read_output(root / names[2])
    assert resumed.manifest["attempts"] == 2 and sorted(resumed.keys) == ["a", "b", "c"]
    doubled = read_output(root / names[3])
    assert sorted(doubled.keys) == ["a-0", "a-1", "b-0", "b-1", "c-0", "c-1"]
    rows = doubled.metadata.to_pydict()
    assert sorted(zip(rows["prompt_key"], rows["sample_index"])) == [(k, i) for k in "abc" for i in (0, 1)]
    assert len(set(rows["seed"])) == 6
    assert doubled.manifest["identity"]["settings"]["prior_guidance_scale"] == 4.0

    # A changed setting that keeps the point names: finished points are not silently reused.
    path.write_text(yaml.safe_dump(spec(tmp_path, prompts="prompts.parquet", output="sweep",
                                        settings={**STEPS, "rows_per_shard": 1, "decoder_guidance_scale": 5.0},
                                        grid={"prior_guidance_scale": [2.0, 4.0], "seeds_per_prompt": [1, 2]})))
    result = subprocess.run([str(Path(sys.executable).with_name("karlo")), "sweep", str(path)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert "holds a finished run with other settings (settings.decoder_guidance_scale: 8.0 -> 5.0" in result.stderr
    assert "| pg2_n1 | 2 | 1 | failed |" in result.stdout
    assert {n: file_states(root / n) for n in names[:2]} == before
