"""Interruptions and faults against real ``karlo generate`` processes, each with its own local Ray: ``kill -9`` of
the driver (locally and on S3 behind a proxy that fails and drops writes), of the local Ray head, and actors that
crash or raise (pipeline.faults). After each, the same command finishes the work: every input row exactly once,
committed shards untouched, images bit-identical to an uninterrupted run. Also the crash ledger and the fault
switch on their own."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_utils import PROMPTS, file_states, read_output, reference, write_table
from processes import (
    FEW_STEPS,
    ONE_ROW_STAGES,
    generate,
    karlo_env,
    kill_driver,
    kill_local_ray,
    run_generate,
    wait_until,
)
from s3_proxy import FaultyS3Proxy

from pipeline import columns as C
from pipeline import crashes, faults
from pipeline.crashes import MAX_DEATHS

N = 8
IDS = [f"row-{i:02d}" for i in range(N)]
SEEDS = [1000 + 7 * i for i in range(N)]
ROWS_PER_SHARD = 2
# Every name a run may leave in OUTPUT: shard files under their shard id, markers, the manifest, the shard list and
# dataset card. No temporary file.
_OUTPUT_NAME = re.compile(
    r"(images/[0-9a-f]{16}\.tar|img_emb/img_emb_[0-9a-f]{16}\.npy|text_emb/text_emb_[0-9a-f]{16}\.npy|"
    r"raw_img_emb/raw_img_emb_[0-9a-f]{16}\.npy|"
    r"metadata/metadata_[0-9a-f]{16}\.parquet|errors/errors_[0-9a-f]{16}\.parquet|_commits/[0-9a-f]{16}\.json|"
    r"manifest\.json|_SUCCESS|images\.txt|README\.md)"
)


def prompts() -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else ", at night") for i in range(N)]


@pytest.fixture(scope="module")
def expected(tiny_model) -> dict[str, np.ndarray]:
    """key -> the image an uninterrupted run makes (one row per batch: Karlo.generate, one thread)."""
    images, _, _ = reference(tiny_model, prompts(), SEEDS, threads=1)
    return dict(zip(IDS, images))


@pytest.fixture
def args(tmp_path, tiny_model) -> list[str]:
    """The command line, less OUTPUT: INPUT, the tiny model, few steps, shards of two rows, one row per batch."""
    table = write_table(tmp_path / "in" / "prompts.parquet", id=IDS, prompt=prompts(), seed=SEEDS)
    stages = tmp_path / "stages.yaml"
    stages.write_text(ONE_ROW_STAGES)
    return [str(table), "--model", tiny_model, *FEW_STEPS, "--rows-per-shard", str(ROWS_PER_SHARD),
            "--stage-config", str(stages)]


def command(args: list[str], output: str) -> list[str]:
    return [args[0], output, *args[1:]]


def markers(root: Path) -> list[Path]:
    return sorted((root / "_commits").glob("*.json")) if (root / "_commits").is_dir() else []


def committed_files(root: Path) -> dict[str, tuple[int, bytes]]:
    """(mtime, bytes) of every file of the committed shards, markers included."""
    states = file_states(root)
    out = read_output(root)
    names = {f"_commits/{m['shard']}.json" for m in out.markers} | {f for m in out.markers for f in m["files"]}
    return {name: states[name] for name in names}


def assert_complete(root: Path, expected: dict[str, np.ndarray], *, attempts: int) -> None:
    """Every row exactly once, images as an uninterrupted run made them, nothing else in OUTPUT."""
    out = read_output(root)
    assert sorted(out.keys) == IDS and out.errors.num_rows == 0
    assert sum(m["rows"] for m in out.markers) == N and all(m["rows"] <= ROWS_PER_SHARD for m in out.markers)
    images = out.images()
    assert images.keys() == expected.keys()
    for key, image in expected.items():
        np.testing.assert_array_equal(images[key], image, err_msg=key)
    assert out.img_emb.shape[0] == out.text_emb.shape[0] == N
    assert out.manifest["status"] == "complete" and out.manifest["attempts"] == attempts
    assert out.manifest["counts"]["written"] == N and (root / "_SUCCESS").is_file()
    leftovers = [p for p in file_states(root) if not _OUTPUT_NAME.fullmatch(p)]
    assert not leftovers, leftovers


def interrupted(root: Path) -> dict[str, tuple[int, bytes]]:
    """What the interrupted attempt committed: some shards, not all."""
    committed = committed_files(root)
    rows = sum(m["rows"] for m in read_output(root).markers)
    assert 0 < rows < N, rows
    return committed


@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun_finishes_as_if_uninterrupted(tmp_path, args, expected):
    out = tmp_path / "out"
    with generate(command(args, str(out)), tmp_path / "first.log", karlo_env()) as g:
        wait_until(lambda: len(markers(out)) >= 1, g, 300, "committed shard")
        kill_driver(g)
        g.wait_for_workers_to_exit()
    before = interrupted(out)

    rc, log = run_generate(command(args, str(out)), tmp_path / "rerun.log", karlo_env())
    assert rc == 0, log[-5000:]
    assert re.search(r"resuming: \d+ of 8 rows are already committed", log)
    assert_complete(out, expected, attempts=2)
    assert {name: state for name, state in committed_files(out).items() if name in before} == before


@pytest.mark.slow
def test_ctrl_c_says_that_a_rerun_resumes(tmp_path, args):
    """SIGINT (Ctrl-C) mid-run: exit 130 with one line saying what is kept and how to resume, no traceback."""
    import signal

    out = tmp_path / "out"
    # The last row stalls, so that the run is still going when the signal comes, however fast the rest is.
    env = karlo_env(KARLO_FAULTS=f"super_res:{IDS[-1]}:stall")
    with generate(command(args, str(out)), tmp_path / "first.log", env, interruptible=True) as g:
        wait_until(lambda: len(markers(out)) >= 1, g, 300, "committed shard")
        g.proc.send_signal(signal.SIGINT)
        rc = g.wait(timeout=120)
        log = g.output()
    assert rc == 130, log[-5000:]
    assert log.strip().splitlines()[-1] == ("interrupted: the shards committed so far are kept; rerun the same "
                                            "command to resume")
    assert "Traceback" not in log and "Aborted!" not in log


@pytest.mark.slow
def test_local_ray_killed_mid_run_then_rerun_finishes(tmp_path, args, expected):
    """GCS and raylet die under a running driver: it fails (after Ray's GCS reconnect timeout, shortened here from
    60 s to keep the test fast) instead of hanging, and the same command then finishes the work."""
    out = tmp_path / "out"
    env = karlo_env(RAY_gcs_rpc_server_reconnect_timeout_s="10")
    with generate(command(args, str(out)), tmp_path / "first.log", env) as g:
        wait_until(lambda: len(markers(out)) >= 1, g, 300, "committed shard")
        kill_local_ray(g)
        assert g.wait(timeout=120) != 0
    before = interrupted(out)

    rc, log = run_generate(command(args, str(out)), tmp_path / "rerun.log", karlo_env())
    assert rc == 0, log[-5000:]
    assert_complete(out, expected, attempts=2)
    assert {name: state for name, state in committed_files(out).items() if name in before} == before


@pytest.mark.slow
def test_crashing_and_raising_actors(tmp_path, args, expected):
    """One decoder crash is absorbed (Ray restarts the actor, the batch is retried); a row that kills the
    super-res worker every time and a row on which the prior raises become error rows; exit code 3."""
    out = tmp_path / "out"
    state = tmp_path / "fault-state"
    state.mkdir()
    faults = "decoder:row-02:crash:1,super_res:row-05:crash,prior:row-07:raise"
    rc, log = run_generate(command(args, str(out)), tmp_path / "run.log",
                           karlo_env(KARLO_FAULTS=faults, KARLO_FAULTS_STATE=str(state)))
    assert rc == 3, log[-5000:]
    assert re.search(r"error rows\s+2", log) and "Traceback" not in log
    assert "Worker unexpectedly exits" in log  # Ray saw the worker processes die
    assert sorted(p.name for p in state.iterdir()) == ["decoder-row-02-0"]

    result = read_output(out)
    errors = {row["key"]: row for row in result.errors.to_pylist()}
    assert sorted(errors) == ["row-05", "row-07"]
    assert errors["row-05"]["error_stage"] == "super_res"
    assert errors["row-05"]["error"].startswith(f"WorkerDied: the super_res worker process died {MAX_DEATHS} times")
    assert errors["row-07"]["error_stage"] == "prior"
    assert errors["row-07"]["error"] == "InjectedFault: injected fault in stage prior on row row-07"
    # rows in = rows written + error rows, each row once; the good rows are untouched by their neighbours' faults.
    assert sorted(result.keys + list(errors)) == IDS and len(result.keys) == N - 2
    images = result.images()
    for key in result.keys:
        np.testing.assert_array_equal(images[key], expected[key], err_msg=key)
    counts = result.manifest["counts"]
    assert (counts["input_rows"], counts["written"], counts["errors"]) == (N, N - 2, 2)


@pytest.mark.slow
def test_s3_driver_killed_behind_failing_storage_then_rerun_finishes(tmp_path, args, expected, s3_bucket):
    """OUTPUT on S3 behind a proxy that answers every 4th write with 503/500 and drops every 7th connection:
    retries absorb them, a driver killed mid-run leaves no visible partial object, nothing is ever renamed
    (no server-side copy), and the rerun finishes."""
    url = f"{s3_bucket.url}/run"
    prefix = f"{s3_bucket.url[5:]}/run"
    fs = s3_bucket.fs

    def s3_markers() -> list[str]:
        fs.invalidate_cache()
        return fs.glob(f"{prefix}/_commits/*.json")

    with FaultyS3Proxy(s3_bucket.endpoint, fail_every_nth_write=4, drop_every_nth_write=7) as proxy:
        env = karlo_env(AWS_ENDPOINT_URL=proxy.url)
        with generate(command(args, url), tmp_path / "first.log", env) as g:
            wait_until(lambda: len(s3_markers()) >= 1, g, 300, "committed shard on S3")
            kill_driver(g)
            g.wait_for_workers_to_exit()
        faults_first = len(proxy.injected)
        fs.get(prefix, str(tmp_path / "interrupted"), recursive=True)
        before = interrupted(tmp_path / "interrupted")
        # Every object is whole: each Parquet file the interrupted run left (committed or not) parses.
        for path in fs.find(prefix):
            if path.endswith(".parquet"):
                pq.read_table(fs.open(path))

        rc, log = run_generate(command(args, url), tmp_path / "rerun.log", env)
        assert rc == 0, log[-5000:]
        assert faults_first > 0 and len(proxy.injected) > faults_first
        assert proxy.copies == []
    fs.invalidate_cache()
    fs.get(prefix, str(tmp_path / "done"), recursive=True)
    assert_complete(tmp_path / "done", expected, attempts=2)
    done = committed_files(tmp_path / "done")  # downloaded: compare bytes, not mtimes
    assert {name: done[name][1] for name in before} == {name: state[1] for name, state in before.items()}
    assert fs.list_multipart_uploads(s3_bucket.url[5:]) == []


# ------------------------------------------------------------------------------------------ the crash ledger


def test_crash_ledger_isolates_then_rejects_a_row_that_keeps_killing_its_worker(ray_local, tmp_path):
    import ray

    ledger = crashes.new_ledger()
    calls = []

    def stage(table: pa.Table) -> pa.Table:  # passes rows through, as a stage passes error rows
        calls.append(table.column(C.KEY).to_pylist())
        return table

    keys = ["a", "b", "c"]
    table = pa.table({C.KEY: keys, C.ERROR: ["", "", ""], C.ERROR_STAGE: ["", "", ""]})
    assert crashes.guarded(stage, table, "decoder", ledger) == table and calls == [keys]

    # An attempt died with the batch in flight: the retry runs it row by row, and all succeed.
    ray.get(ledger.begin.remote("decoder", keys))
    calls.clear()
    assert crashes.guarded(stage, table, "decoder", ledger) == table and calls == [["a"], ["b"], ["c"]]

    # "b" died with the batch, then alone until the limit: it becomes an error row without running again.
    ray.get(ledger.begin.remote("decoder", keys))
    for _ in range(MAX_DEATHS - 1):
        ray.get(ledger.begin.remote("decoder", ["b"]))
    calls.clear()
    out = crashes.guarded(stage, table, "decoder", ledger)
    assert out.column(C.KEY).to_pylist() == keys and out.column(C.ERROR_STAGE).to_pylist() == ["", "decoder", ""]
    assert out.column(C.ERROR)[1].as_py().startswith(f"WorkerDied: the decoder worker process died {MAX_DEATHS}")
    assert calls == [["a"], ["b"], ["c"]] and ray.get(ledger.begin.remote("decoder", ["b"])) == [0]
    # Counts are per stage: the same key in another stage is untouched.
    assert ray.get(ledger.begin.remote("super_res", ["b"])) == [0]


# ------------------------------------------------------------------------------------------ the fault switch


def test_fault_rules_parse_and_reject_typos():
    assert faults.parse("decoder:k1:crash:2, prior:k2:raise,super_res:k3:stall") == (
        faults.Rule("decoder", "k1", "crash", 2), faults.Rule("prior", "k2", "raise", None),
        faults.Rule("super_res", "k3", "stall", None))
    for bad in ["decoder:k1", "decoder:k1:explode", "decoder:k1:raise:0", ":k1:raise", "decoder:k1:raise:x"]:
        with pytest.raises(ValueError, match="KARLO_FAULTS"):
            faults.parse(bad)


def test_fault_switch_fires_only_on_its_stage_and_key_and_counts(monkeypatch, tmp_path):
    faults.inject("prior", ["k2"])  # unset: nothing happens
    monkeypatch.setenv(faults.ENV, "prior:k2:raise:2")
    monkeypatch.setenv(faults.STATE_ENV, str(tmp_path))
    faults.inject("decoder", ["k2"])
    faults.inject("prior", ["k1", "k3"])
    for _ in range(2):
        with pytest.raises(faults.InjectedFault, match="injected fault in stage prior on row k2"):
            faults.inject("prior", ["k1", "k2"])
    faults.inject("prior", ["k2"])  # fired twice: spent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior-k2-0", "prior-k2-1"]


def test_a_manifest_left_half_written_is_removed(tmp_path):
    """A driver killed while writing the manifest leaves its temporary file beside the folders."""
    from pipeline.sinks import remove_uncommitted

    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / ".tmp-manifest.json-0123456789ab").write_text("{\"iden")
    (tmp_path / "notes.txt").write_text("not ours")
    assert remove_uncommitted(str(tmp_path)) == [".tmp-manifest.json-0123456789ab"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "notes.txt"]


def test_a_batch_runs_unguarded_when_the_crash_ledger_does_not_answer(ray_local, monkeypatch):
    import ray

    @ray.remote(num_cpus=0)
    class Silent:
        def begin(self, stage, keys):
            import time

            time.sleep(30)

    monkeypatch.setattr(crashes, "LEDGER_TIMEOUT_S", 1)
    table = pa.table({C.KEY: ["a", "b"], C.ERROR: ["", ""], C.ERROR_STAGE: ["", ""]})
    silent = Silent.remote()
    assert crashes.guarded(lambda t: t.append_column("x", pa.array([1, 2])), table, "decoder", silent).column(
        "x").to_pylist() == [1, 2]
    ray.kill(silent)


# ------------------------------------------------------------------------------------------ infrastructure failures


def _disk_full() -> Exception:
    """A write task's ENOSPC as the driver receives it: Ray's task error, whose message is the worker's traceback,
    with the OSError as its cause."""
    import ray.exceptions

    cause = OSError(28, "No space left on device", "/out/images/0123456789abcdef.tar")
    return ray.exceptions.RayTaskError("write", "Traceback (most recent call last):\n  ...\n" + str(cause),
                                       cause).as_instanceof_cause()


@pytest.mark.parametrize("verbose", [False, True])
def test_disk_full_is_one_line_and_exit_1(tmp_path, monkeypatch, verbose):
    from click.testing import CliRunner

    from jobs.cli import main
    from pipeline import run as run_module

    def full_disk(*args, **kwargs):
        raise _disk_full()

    monkeypatch.setattr(run_module, "run", full_disk)
    table = write_table(tmp_path / "t.parquet", prompt=["a cat"])
    result = CliRunner().invoke(main, [*(["-v"] if verbose else []), "generate", str(table), str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last == ("error: OSError: [Errno 28] No space left on device: '/out/images/0123456789abcdef.tar' "
                    "(rerun the same command to resume)")
    assert ("Traceback" in result.output) == verbose


def test_ray_that_does_not_start_is_one_line_and_exit_1(tmp_path, tiny_model, monkeypatch):
    """Found before OUTPUT is touched, so the rerun starts clean."""
    from click.testing import CliRunner

    from jobs.cli import main
    from pipeline import run as run_module

    def no_ray(echo=None):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(run_module, "init_ray", no_ray)
    table = write_table(tmp_path / "t.parquet", prompt=["a cat"])
    result = CliRunner().invoke(main, ["generate", str(table), str(tmp_path / "out"), "--model", tiny_model])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        "error: Ray failed to start: Exception: The current node timed out during startup. This could happen "
        "because some of the raylet failed to startup or the GCS has become overloaded. (rerun the same command "
        "to resume)"]
    assert not (tmp_path / "out").exists()
