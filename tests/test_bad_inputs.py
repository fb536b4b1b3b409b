"""The bad-input catalogue through ``karlo generate``: each bad input gives a clear error (exit 2, nothing written)
or error rows (exit 3), loses no row, and never writes outside OUTPUT. Every run checks
rows in = rows written + error rows.

Covered elsewhere, and not repeated here:
- missing ``prompt`` column, INPUT that does not exist, an empty folder, a non-Parquet single file, unknown
  stage-config keys and values: tests/test_cli.py; every stage-config type rule: tests/test_config.py;
- null, empty and whitespace-only prompts, a negative seed, a NaN guidance scale, end to end:
  tests/test_pipeline.py::test_invalid_rows_become_errors_and_exit_code_3;
- each id, seed, prompt and guidance rule on its own (float and string seeds, bool and float ids, ...):
  tests/test_schema.py; corrupt footers, reserved columns, incompatible types: tests/test_reader.py;
- damaged and pickled weight files at load time: tests/test_weights.py.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner
from pipeline_utils import PROMPTS, Payload, read_output, write_table
from processes import FEW_STEPS
from s3_proxy import FaultyS3Proxy

from jobs.cli import main
from pipeline.schema import SEED_LIMIT

# 80 words: more than CLIP's 77 tokens.
LONG_PROMPT = " ".join(["a very detailed painting of a quiet harbour"] * 10)


def karlo(*args: str):
    return CliRunner().invoke(main, ["generate", *args])


def assert_usage_error(result, message: str, output: Path | None = None) -> None:
    """Exit 2 with the message, no traceback, and nothing written to OUTPUT (so nothing to lose or redo)."""
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    if output is not None:
        assert not output.exists() or not [p for p in output.rglob("*") if p.is_file()]


def assert_accounted(out, rows_in: int) -> None:
    """rows in = rows written + error rows, each key once, and the manifest agrees."""
    keys = out.keys + out.error_keys
    assert len(keys) == len(set(keys)) == rows_in
    counts = out.manifest["counts"]
    assert (counts["input_rows"], counts["written"] + counts["errors"]) == (rows_in, rows_in)


def assert_inside(output: Path) -> None:
    """Every file a run wrote is under OUTPUT in one of its folders, with a plain shard-style name."""
    folders = {"images", "img_emb", "text_emb", "raw_img_emb", "metadata", "errors", "_commits"}
    for path in output.rglob("*"):
        rel = path.relative_to(output)
        if path.is_file() and len(rel.parts) > 1:
            assert len(rel.parts) == 2 and rel.parts[0] in folders and rel.name.isascii(), rel


# ------------------------------------------------------------------------------------------ rows that become errors


@pytest.mark.slow
def test_bad_rows_ids_seeds_and_files_in_one_input(tmp_path, ray_local, tiny_model):
    """One folder: unsafe ids, a long prompt, seeds at and beyond int64, bad prompts, an id repeated in another
    file (another read task), a corrupt file, a truncated file, an empty table and a file that is not Parquet."""
    inp = tmp_path / "in"
    ids = ["good-0", "../../escape", "/abs/path", "dots.in.id", "tab\tand\x01ctrl", "naïve-日本", "x" * 1000,
           "long", "twin", "null-prompt", "empty-prompt", "spaces"]
    prompts = PROMPTS[:7] + [LONG_PROMPT, PROMPTS[7], None, "", " \t\n "]
    seeds = pa.array([1, 2, 3, None, 5, 2**63 - 1, 7, 8, 9, 10, 11, 12], pa.uint64())
    write_table(inp / "a.parquet", id=ids, prompt=prompts, seed=seeds)
    write_table(inp / "b.parquet", id=["twin", "good-0", "big-seed"], prompt=["a twin", "a repeat", "a big seed"],
                seed=pa.array([20, 21, SEED_LIMIT], pa.uint64()))
    write_table(inp / "c_empty.parquet", id=pa.array([], pa.string()), prompt=pa.array([], pa.string()))
    (inp / "d_corrupt.parquet").write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    good = (inp / "a.parquet").read_bytes()
    (inp / "e_truncated.parquet").write_bytes(good[: len(good) // 2])
    (inp / "notes.txt").write_text("not a table")
    out = tmp_path / "out"

    result = karlo(str(inp), str(out), "--model", tiny_model, *FEW_STEPS, "--rows-per-shard", "4")
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert "unreadable file  d_corrupt.parquet: corrupt Parquet footer" in result.output
    assert "unreadable file  e_truncated.parquet: not a Parquet file (no PAR1 marker at its end)" in result.output

    o = read_output(out)
    assert_accounted(o, 15)
    assert_inside(out)
    assert [b[0] for b in o.manifest["bad_files"]] == ["d_corrupt.parquet", "e_truncated.parquet"]
    errors = {(r["source"], r["source_row"]): r for r in o.errors.to_pylist()}
    assert {k: r["error"] for k, r in errors.items()} == {
        ("a.parquet", 9): "prompt is null",
        ("a.parquet", 10): "prompt is empty",
        ("a.parquet", 11): "prompt is only whitespace",
        ("b.parquet", 0): "duplicate id 'twin': row 8 of 'a.parquet' has the same key 'twin'",
        ("b.parquet", 1): "duplicate id 'good-0': row 0 of 'a.parquet' has the same key 'good-0'",
        ("b.parquet", 2): f"seed must be an integer in [0, 2**63), got {SEED_LIMIT}",
    }
    assert {r["error_stage"] for r in errors.values()} == {"prepare"}
    rows = {(r["source"], r["source_row"]): r for r in o.metadata.to_pylist()}
    assert rows[("a.parquet", 8)]["key"] == "twin" and rows[("a.parquet", 0)]["key"] == "good-0"
    # Unsafe ids: sanitised and hash-suffixed keys, the id itself kept in the metadata.
    for i in range(1, 7):
        key = rows[("a.parquet", i)]["key"]
        assert "/" not in key and "." not in key and key.isascii() and key.isprintable() and len(key) <= 77, key
        assert rows[("a.parquet", i)]["id"] == ids[i]
    assert rows[("a.parquet", 5)]["seed"] == 2**63 - 1 and rows[("a.parquet", 3)]["seed"] is not None
    # The long prompt is truncated to 77 tokens for the model, flagged, and kept whole in the metadata.
    flagged = {k for k, r in rows.items() if r["prompt_truncated"]}
    assert flagged == {("a.parquet", 7)} and rows[("a.parquet", 7)]["prompt"] == LONG_PROMPT
    assert o.manifest["status"] == "complete" and (out / "_SUCCESS").is_file()

    # Resuming finds every row committed, the repeated ids included, and adds nothing.
    again = karlo(str(inp), str(out), "--model", tiny_model, *FEW_STEPS, "--rows-per-shard", "4")
    assert again.exit_code == 3, again.output
    assert "resuming: 15 of 15 rows are already committed" in again.output
    assert_accounted(read_output(out), 15)


def test_ids_spelled_like_the_keys_of_other_rows(tmp_path, ray_local, tiny_model):
    """Ids spelled like another row's derived key or sanitised id get keys of their own; a real repeat is an
    error row naming the first row. One row per shard, where a shared key would also share the shard id, and a
    rerun resumes with every row committed once."""
    from pipeline.schema import derive_key, key_from_id

    ids = [None, derive_key("t.parquet", 0), "a b", key_from_id("a b"), "dup", "dup"]
    table = write_table(tmp_path / "in" / "t.parquet", id=pa.array(ids, pa.string()), prompt=PROMPTS[: len(ids)])
    out = tmp_path / "out"
    for _ in range(2):
        result = karlo(str(table), str(out), "--model", tiny_model, *FEW_STEPS, "--rows-per-shard", "1")
        assert result.exit_code == 3, result.output
        assert "Traceback" not in result.output
        o = read_output(out)
        assert_accounted(o, len(ids))
        assert [(r["source_row"], r["error"]) for r in o.errors.to_pylist()] == [
            (5, "duplicate id 'dup': row 4 of 't.parquet' has the same key 'dup'")]
        assert not [p for p in out.rglob(".tmp-*")]
    assert "resuming: 6 of 6 rows are already committed" in result.output


def test_damaged_data_pages_behind_a_sound_footer(tmp_path, ray_local, tiny_model):
    """The plan reads footers only, so a file with damaged pages is found by its read task: its rows become error
    rows and the file is named as unreadable, while the other file's rows are generated; a rerun says the same."""
    import pyarrow.parquet as pq

    write_table(tmp_path / "in" / "a.parquet", prompt=PROMPTS[:2])
    damaged = write_table(tmp_path / "in" / "b.parquet", prompt=[p * 20 for p in PROMPTS[:3]])
    data = bytearray(damaged.read_bytes())
    start = pq.ParquetFile(damaged).metadata.row_group(0).column(0).data_page_offset
    data[start : start + 64] = bytes(b ^ 0x5A for b in data[start : start + 64])
    damaged.write_bytes(bytes(data))
    out = tmp_path / "out"
    for _ in range(2):
        result = karlo(str(tmp_path / "in"), str(out), "--model", tiny_model, *FEW_STEPS)
        assert result.exit_code == 3, result.output
        assert "Traceback" not in result.output
        assert "unreadable file  b.parquet: damaged Parquet data: OSError: " in result.output
        o = read_output(out)
        assert_accounted(o, 5)
        assert sorted(o.metadata.column("source").to_pylist()) == ["a.parquet"] * 2
        assert {(r["source"], r["error_stage"]) for r in o.errors.to_pylist()} == {("b.parquet", "read")}
        assert [b[0] for b in o.manifest["bad_files"]] == ["b.parquet"]


def test_output_inside_input_and_a_file_with_a_repeated_column(tmp_path, ray_local, tiny_model):
    """OUTPUT inside the INPUT folder resumes (its metadata tables are not read as prompts on the rerun), and a
    file whose columns share a name is named as unreadable instead of failing every read task."""
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    write_table(data / "a.parquet", prompt=PROMPTS[:2])
    pq.write_table(pa.Table.from_arrays([pa.array(PROMPTS[2:4]), pa.array([1, 2]), pa.array([3, 4])],
                                        names=["prompt", "n", "n"]), data / "b.parquet")
    out = data / "out"
    for attempt in range(2):
        result = karlo(str(data), str(out), "--model", tiny_model, *FEW_STEPS)
        assert result.exit_code == 3, result.output
        assert "Traceback" not in result.output
        assert "unreadable file  b.parquet: column 'n' appears 2 times (column names must be unique)" in result.output
        o = read_output(out)
        assert_accounted(o, 2)
        assert o.manifest["attempts"] == attempt + 1
    assert "resuming: 2 of 2 rows are already committed" in result.output


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4, 5, 6, 7), (7, 6, 5, 4, 3, 2, 1, 0), (3, 0, 6, 1, 4, 7, 2, 5)])
def test_guidance_values_that_are_not_finite_numbers_one_row_per_block(tmp_path, ray_local, tiny_model, order):
    """NaN, infinite and negative guidance scales are error rows on the first run, whatever the order of the rows
    and however they fall into blocks: one row per read task, batch and shard, so some blocks hold only error
    rows, some only nulls in the guidance columns."""
    from processes import ONE_ROW_STAGES

    from pipeline.config import ALL_STAGE_NAMES, RunConfig, load_stage_config_file
    from pipeline.run import run

    nan, inf = float("nan"), float("inf")
    prior = [nan, inf, -1.0, None, 4.0, None, -inf, 2.0]
    decoder = [None, 8.0, None, nan, -0.5, inf, None, 1.0]
    table = write_table(tmp_path / "t.parquet", id=[f"r{i}" for i in order], prompt=[PROMPTS[i] for i in order],
                        prior_guidance_scale=pa.array([prior[i] for i in order], pa.float64()),
                        decoder_guidance_scale=pa.array([decoder[i] for i in order], pa.float64()))
    out = tmp_path / "out"
    cfg = RunConfig(input_url=str(table), output_url=str(out), model=tiny_model, prior_steps=3, decoder_steps=3,
                    super_res_steps=2, rows_per_read_task=1, rows_per_shard=1,
                    stages=load_stage_config_file(ONE_ROW_STAGES, "cpu", "float32", ALL_STAGE_NAMES))
    summary = run(cfg)
    assert (summary.rows_in, summary.written, summary.errors) == (8, 1, 7)
    o = read_output(out)
    assert_accounted(o, 8)
    assert o.keys == ["r7"]
    errors = {r["key"]: r["error"] for r in o.errors.to_pylist()}
    assert errors["r0"] == "prior_guidance_scale must be a finite number >= 0, got nan"
    assert errors["r4"] == "decoder_guidance_scale must be a finite number >= 0, got -0.5"


def test_pass_through_columns_of_types_json_lacks(tmp_path, ray_local, tiny_model):
    """Extension (uuid), half-float, duration, decimal, large binary, dictionary and map columns reach the
    metadata with their types and the per-sample JSON in a readable form, instead of failing every write task
    after the images were generated."""
    import decimal
    import uuid

    ids = [uuid.UUID(int=i + 1) for i in range(2)]
    columns = dict(
        prompt=PROMPTS[:2],
        ref=pa.array([u.bytes for u in ids], pa.uuid()),
        weight=pa.array([0.5, None], pa.float16()),
        took=pa.array([1_500_000_000, 2], pa.duration("ns")),
        price=pa.array([decimal.Decimal("1.25"), None], pa.decimal128(5, 2)),
        blob=pa.array([b"\x00\x01", b""], pa.large_binary()),
        style=pa.array(["oil", "ink"]).dictionary_encode(),
        tags=pa.array([[("a", 1)], []], pa.map_(pa.string(), pa.int64())),
    )
    table = write_table(tmp_path / "t.parquet", **columns)
    out = tmp_path / "out"
    result = karlo(str(table), str(out), "--model", tiny_model, *FEW_STEPS)
    assert result.exit_code == 0, result.output
    o = read_output(out)
    assert_accounted(o, 2)
    for name, column in columns.items():
        if name != "prompt":
            assert o.metadata.schema.field(name).type == column.type, name
    with tarfile.open(next((out / "images").glob("*.tar"))) as tar:
        samples = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    first = next(s for s in samples if s["prompt"] == PROMPTS[0])
    assert uuid.UUID(first["ref"]) == ids[0] and first["weight"] == 0.5 and first["took"] == 1.5
    assert first["price"] == "1.25" and first["blob"] == "AAE=" and first["style"] == "oil"
    assert first["tags"] == [["a", 1]]


def test_pass_through_column_no_metadata_file_can_hold():
    """A type Parquet cannot store (reachable when tables come from other readers than Parquet files) is found
    from the schema alone, before any work."""
    from pipeline.shards import unwritable_columns

    schema = pa.schema([("prompt", pa.string()), ("ref", pa.uuid()), ("span", pa.month_day_nano_interval())])
    assert unwritable_columns(schema) == [
        "span (month_day_nano_interval): Unhandled type for Arrow to Parquet schema conversion: "
        "month_day_nano_interval"]


def test_relative_paths_are_resolved_on_the_driver(tmp_path, ray_local, tiny_model, monkeypatch):
    """INPUT, OUTPUT and --model relative to the driver's working folder, which the actors and write tasks do
    not share: everything lands in OUTPUT as the user meant, and the manifest names absolute paths."""
    shutil.copytree(tiny_model, tmp_path / "model")
    write_table(tmp_path / "in" / "t.parquet", prompt=PROMPTS[:2])
    monkeypatch.chdir(tmp_path)
    result = karlo("in", "out", "--model", "model", *FEW_STEPS)
    assert result.exit_code == 0, result.output
    o = read_output(tmp_path / "out")
    assert_accounted(o, 2)
    assert o.manifest["identity"]["input"] == str(tmp_path / "in")
    assert o.manifest["identity"]["model"]["model"] == str(tmp_path / "model")


def test_values_of_the_wrong_type_become_error_rows(tmp_path, ray_local, tiny_model):
    table = write_table(tmp_path / "t.parquet", prompt=[5, 6], seed=[1.5, 2.0])
    out = tmp_path / "out"
    result = karlo(str(table), str(out), "--model", tiny_model, *FEW_STEPS)
    assert result.exit_code == 3, result.output
    o = read_output(out)
    assert_accounted(o, 2)
    assert sorted(o.errors.column("error").to_pylist()) == [
        "prompt must be a string, got 5; seed must be an integer in [0, 2**63), got 1.5",
        "prompt must be a string, got 6; seed must be an integer in [0, 2**63), got 2.0",
    ]
    assert sorted(o.errors.column("prompt").to_pylist()) == ["5", "6"]  # the value as given, as text


def test_empty_table_is_a_complete_run(tmp_path, ray_local, tiny_model):
    table = write_table(tmp_path / "t.parquet", prompt=pa.array([], pa.string()))
    out = tmp_path / "out"
    result = karlo(str(table), str(out), "--model", tiny_model, *FEW_STEPS)
    assert result.exit_code == 0, result.output
    o = read_output(out)
    assert_accounted(o, 0)
    assert o.manifest["status"] == "complete" and (out / "_SUCCESS").is_file()


# ------------------------------------------------------------------------------------------ inputs refused up front


def test_integer_types_no_one_type_holds(tmp_path):
    """int64 in one file and uint64 in another: Arrow would unify them as int64 and fail mid-run on a seed
    >= 2**63; the plan refuses them instead."""
    write_table(tmp_path / "in" / "a.parquet", prompt=["a"], seed=pa.array([1], pa.int64()))
    write_table(tmp_path / "in" / "b.parquet", prompt=["b"], seed=pa.array([2**63], pa.uint64()))
    result = karlo(str(tmp_path / "in"), str(tmp_path / "out"), *FEW_STEPS)
    assert_usage_error(result, "column 'seed' has integer types across files that no one type holds: int64 in "
                               "'a.parquet', uint64 in 'b.parquet'", tmp_path / "out")


def test_output_that_cannot_be_written(tmp_path, ray_local, tiny_model):
    table = write_table(tmp_path / "t.parquet", prompt=["a cat"])
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    result = karlo(str(table), str(blocker / "out"), "--model", tiny_model, *FEW_STEPS)
    assert_usage_error(result, f"error: cannot write to the output folder {blocker / 'out'}: ")


def test_model_behind_a_storage_whose_client_fails_with_its_own_errors(tmp_path):
    """hf:// and https:// filesystems raise their HTTP client's errors (huggingface_hub's httpx ConnectError is no
    OSError) when the host cannot be reached: one line, exit 2, as for any unreadable model."""
    import fsspec

    class ConnectError(Exception):  # as an HTTP client defines it: not an OSError
        pass

    class Unreachable(fsspec.AbstractFileSystem):
        protocol = "unreachable"

        def cat_file(self, path, start=None, end=None, **kwargs):
            raise ConnectError("[Errno -2] Name or service not known")

    fsspec.register_implementation("unreachable", Unreachable, clobber=True)
    table = write_table(tmp_path / "t.parquet", prompt=["a cat"])
    result = karlo(str(table), str(tmp_path / "out"), "--model", "unreachable://hub/karlo", *FEW_STEPS)
    assert_usage_error(result, "error: cannot read the model at unreachable://hub/karlo: ConnectError: [Errno -2] "
                               "Name or service not known", tmp_path / "out")


def test_model_that_does_not_exist(tmp_path):
    table = write_table(tmp_path / "t.parquet", prompt=["a cat"])
    result = karlo(str(table), str(tmp_path / "out"), "--model", str(tmp_path / "nowhere"), *FEW_STEPS)
    assert_usage_error(result, f"error: no Karlo model at {tmp_path / 'nowhere'}: it has no model_index.json",
                       tmp_path / "out")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "index"])
def test_damaged_model(tmp_path, tiny_model, damage):
    """Found on the driver in seconds, from the safetensors headers alone, before any actor loads the model."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "decoder" / "diffusion_pytorch_model.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
        message = "decoder/diffusion_pytorch_model.safetensors is not a valid safetensors file"
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        message = "decoder/diffusion_pytorch_model.safetensors is not a valid safetensors file"
    else:
        (model / "model_index.json").write_text("{not json")
        message = "model_index.json is not valid JSON"
    table = write_table(tmp_path / "t.parquet", prompt=["a cat"])
    result = karlo(str(table), str(tmp_path / "out"), "--model", str(model), *FEW_STEPS)
    assert_usage_error(result, f"error: model {model}: {message}", tmp_path / "out")


def test_model_with_a_pickle_that_runs_code(tmp_path, tiny_model):
    """Refused on the driver like every other damaged model (exit 2, one line, before Ray starts and before
    OUTPUT holds a manifest that would refuse the fixed model as other settings), without running the payload."""
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "decoder" / "diffusion_pytorch_model.safetensors"
    marker = tmp_path / "marker"
    torch.save({**load_file(str(weights)), "payload": Payload(marker)}, weights.with_suffix(".bin"))
    weights.unlink()
    table = write_table(tmp_path / "t.parquet", prompt=["a cat"])
    result = karlo(str(table), str(tmp_path / "out"), "--model", str(model), *FEW_STEPS)
    assert_usage_error(result, f"error: model {model}: decoder/diffusion_pytorch_model.bin: refusing to load, the "
                               "file needs unpickling of arbitrary Python objects", tmp_path / "out")
    assert len(result.output.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_wrong_s3_credentials(tmp_path, s3_bucket, monkeypatch):
    """Storage that refuses our access key: a clear message naming INPUT or OUTPUT, never the secret."""
    import s3fs

    secret = "wrong-secret-0123456789abcdef"
    local = write_table(tmp_path / "t.parquet", prompt=["a cat"])
    s3_bucket.fs.put_file(str(local), f"{s3_bucket.url[5:]}/in/t.parquet")
    with FaultyS3Proxy(s3_bucket.endpoint, access_key="AKIAEXPECTEDKEY") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        s3fs.S3FileSystem.clear_instance_cache()
        result = karlo(f"{s3_bucket.url}/in/t.parquet", str(tmp_path / "out"), *FEW_STEPS)
        assert_usage_error(result, f"error: cannot read the input {s3_bucket.url}/in/t.parquet: PermissionError: "
                                   "Forbidden (access denied: check the storage credentials")
        assert secret not in result.output
    s3fs.S3FileSystem.clear_instance_cache()


def test_output_bucket_refusing_our_credentials(tmp_path, s3_bucket, ray_local, tiny_model, monkeypatch):
    import s3fs

    table = write_table(tmp_path / "t.parquet", prompt=["a cat"])
    with FaultyS3Proxy(s3_bucket.endpoint, access_key="AKIAEXPECTEDKEY") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        result = karlo(str(table), f"{s3_bucket.url}/out", "--model", tiny_model, *FEW_STEPS)
        assert_usage_error(result, f"error: cannot write to the output folder {s3_bucket.url}/out: ")
    s3fs.S3FileSystem.clear_instance_cache()
    assert s3_bucket.fs.find(s3_bucket.url[5:]) == []


def test_stage_config_with_wrong_types(tmp_path):
    path = tmp_path / "stages.yaml"
    path.write_text("prior: {batch_size: four}\n")
    table = write_table(tmp_path / "t.parquet", prompt=["a cat"])
    result = karlo(str(table), str(tmp_path / "out"), "--stage-config", str(path))
    assert_usage_error(result, "Error: stage config [prior]: batch_size must be an integer >= 1", tmp_path / "out")


def test_manifest_and_errors_name_no_path_outside_output(tmp_path, ray_local, tiny_model):
    """Ids that look like paths stay data: every file lands under OUTPUT, and the ids survive in the metadata
    and per-sample JSON verbatim."""
    ids = ["../../../../tmp/evil", "/etc/passwd", "..", ".", "C:\\windows", "a/../../b"]
    table = write_table(tmp_path / "in" / "t.parquet", id=ids, prompt=PROMPTS[: len(ids)])
    out = tmp_path / "nested" / "out"
    result = karlo(str(table), str(out), "--model", tiny_model, *FEW_STEPS)
    assert result.exit_code == 0, result.output
    assert_inside(out)
    assert sorted(p.name for p in (tmp_path / "nested").iterdir()) == ["out"]
    assert sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()) == [
        "in"] + ["nested"] * len([p for p in out.rglob("*") if p.is_file()])
    o = read_output(out)
    assert_accounted(o, len(ids))
    assert sorted(o.metadata.column("id").to_pylist()) == sorted(ids)
    with tarfile.open(next((out / "images").glob("*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        sample = json.loads(tar.extractfile(member).read())
    assert sample["id"] in ids and member.name == f"{sample['key']}.json"


def test_rerun_with_another_model_is_refused(tmp_path, ray_local, tiny_model):
    """OUTPUT holds a run of one model; the same command with other weights is refused, naming what differs."""
    from karlo_model import make_tiny_model
    from pipeline.config import RunConfig
    from pipeline.manifest import identity_of_run, model_identity
    from pipeline.sinks import write_json_atomic

    table = write_table(tmp_path / "t.parquet", prompt=["a cat"])
    out = tmp_path / "out"
    cfg = RunConfig(input_url=str(table), output_url=str(out), model=tiny_model, prior_steps=3, decoder_steps=3,
                    super_res_steps=2)
    import fsspec

    write_json_atomic(fsspec.filesystem("file"), str(out / "manifest.json"),
                      {"identity": identity_of_run(str(table), model_identity(tiny_model), cfg.output_settings())})
    other = make_tiny_model(tmp_path / "other", seed=1, preset_name="tiny")
    result = karlo(str(table), str(out), "--model", str(other), *FEW_STEPS)
    assert_usage_error(result, f"error: {out} already holds a run with different settings (model.model: ")
    assert "model.weights.decoder.sha256" in result.output and "--overwrite" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
