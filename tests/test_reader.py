import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data import ActorPoolStrategy

from pipeline import columns as C
from pipeline.reader import InputError, PromptTableDatasource, plan_inputs, read_prompts


def write(path, **columns):
    """A Parquet file of the given columns; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def plan_error(url, **kwargs) -> str:
    with pytest.raises(InputError) as e:
        plan_inputs(url, **kwargs)
    return str(e.value)


def prompts(n, tag="p"):
    return [f"{tag}{i}" for i in range(n)]


# Planning


def test_plan_single_file(tmp_path):
    path = write(tmp_path / "in" / "t.parquet", prompt=prompts(3), seed=[1, 2, 3])
    plan = plan_inputs(str(path))
    assert [(f.source, f.num_rows) for f in plan.files] == [("t.parquet", 3)]
    assert plan.total_rows == 3 and plan.bad_files == ()
    assert plan.schema == pa.schema([("prompt", pa.string()), ("seed", pa.int64())])
    assert plan.files[0].url == f"file://{path}"


def test_plan_folder_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path):
    for name in ["b.parquet", "a/c.parquet", "a.parquet", "_tmp/x.parquet", ".hidden.parquet"]:
        write(tmp_path / name, prompt=["x"])
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.txt").write_text("hi")
    plan = plan_inputs(f"file://{tmp_path}/")
    assert [f.source for f in plan.files] == ["a.parquet", "a/c.parquet", "b.parquet"]


def test_plan_glob(tmp_path):
    for name in ["x1.parquet", "x2.parquet", "y.parquet", "sub/x3.parquet"]:
        write(tmp_path / name, prompt=["x"])
    assert [f.source for f in plan_inputs(str(tmp_path / "x*.parquet")).files] == ["x1.parquet", "x2.parquet"]
    assert [f.source for f in plan_inputs(str(tmp_path / "**" / "x*.parquet")).files] == [
        "sub/x3.parquet",
        "x1.parquet",
        "x2.parquet",
    ]


def test_plan_reads_only_footers(tmp_path):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"prompt": prompts(1000)}), path, row_group_size=300)
    # Garbage over the data pages: the plan must not notice, because it reads only the footer.
    data = bytearray(path.read_bytes())
    data[4:200] = b"\xff" * 196
    path.write_bytes(bytes(data))
    plan = plan_inputs(str(path))
    assert plan.total_rows == 1000
    assert plan.files[0].row_group_rows == (300, 300, 300, 100)


def test_plan_large_footer(tmp_path):
    # A footer longer than the first ranged read needs a second one.
    wide = {f"c{i:04d}": [i] for i in range(1500)}
    path = write(tmp_path / "wide.parquet", prompt=["x"], **wide)
    plan = plan_inputs(str(path))
    assert len(plan.schema) == 1501 and plan.total_rows == 1


def test_empty_table_is_valid(tmp_path):
    path = write(tmp_path / "e.parquet", prompt=pa.array([], pa.string()))
    plan = plan_inputs(str(path))
    assert plan.total_rows == 0 and plan.files[0].num_rows == 0


def test_columns_differ_across_files(tmp_path):
    write(tmp_path / "a.parquet", prompt=["x"], seed=pa.array([1], pa.int32()))
    write(tmp_path / "b.parquet", prompt=["y"], seed=pa.array([None], pa.null()), style=["s"])
    write(tmp_path / "c.parquet", prompt=["z"], seed=pa.array([3], pa.int64()))
    plan = plan_inputs(str(tmp_path))
    assert plan.schema == pa.schema([("prompt", pa.string()), ("seed", pa.int64()), ("style", pa.string())])


def test_pandas_index_columns_are_dropped(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["a", "b", "c"]}).iloc[[2, 0]].to_parquet(path)  # a non-range index is stored
    assert "__index_level_0__" in pq.read_schema(path).names
    assert plan_inputs(str(path)).schema.names == ["prompt"]


def test_corrupt_files_among_good_ones_are_reported_not_fatal(tmp_path):
    write(tmp_path / "good.parquet", prompt=["x"])
    (tmp_path / "text.parquet").write_text("not parquet at all")
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "footer.parquet").write_bytes(b"PAR1" + b"\x00" * 20 + (16).to_bytes(4, "little") + b"PAR1")
    good = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(good[: len(good) // 2])
    plan = plan_inputs(str(tmp_path))
    assert [f.source for f in plan.files] == ["good.parquet"]
    reasons = dict(plan.bad_files)
    assert list(reasons) == ["empty.parquet", "footer.parquet", "text.parquet", "truncated.parquet"]
    assert reasons["empty.parquet"] == "not a Parquet file (0 bytes)"
    assert reasons["text.parquet"] == "not a Parquet file (no PAR1 marker at its end)"
    assert reasons["truncated.parquet"] == "not a Parquet file (no PAR1 marker at its end)"
    assert reasons["footer.parquet"].startswith("corrupt Parquet footer: ")


def test_files_with_a_repeated_column_name_are_reported_not_fatal(tmp_path):
    """Arrow writes tables whose columns share a name, but none of those columns can be selected by name: the
    file is named as unreadable, the others are planned."""
    write(tmp_path / "good.parquet", prompt=["x"])
    pq.write_table(pa.Table.from_arrays([pa.array(["y"]), pa.array([1]), pa.array([2])], names=["prompt", "x", "x"]),
                   tmp_path / "twice.parquet")
    plan = plan_inputs(str(tmp_path))
    assert [f.source for f in plan.files] == ["good.parquet"]
    assert plan.bad_files == (("twice.parquet", "column 'x' appears 2 times (column names must be unique)"),)


@pytest.mark.parametrize("pattern", ["", "*.parquet", "**/*.parquet"])
def test_output_inside_the_input_folder_is_not_input(tmp_path, pattern):
    """OUTPUT inside INPUT: its metadata tables (which hold reserved columns) are not read as prompts, so a rerun
    plans the same files as the first run."""
    write(tmp_path / "a.parquet", prompt=["x"])
    write(tmp_path / "out" / "metadata" / "m.parquet", prompt=["y"], key=["k"])
    write(tmp_path / "outer" / "b.parquet", prompt=["z"])  # a sibling whose name starts like OUTPUT's
    url = f"{tmp_path}/{pattern}" if pattern else str(tmp_path)
    plan = plan_inputs(url, exclude=str(tmp_path / "out"))
    expected = ["a.parquet", "outer/b.parquet"] if pattern != "*.parquet" else ["a.parquet"]
    assert [f.source for f in plan.files] == expected
    assert plan_inputs(url, exclude=f"file://{tmp_path}/out/").files == plan.files
    if pattern != "*.parquet":  # which does not reach out/metadata/ anyway
        # Without it (or with an OUTPUT on another filesystem), the metadata table is read as a prompt table.
        assert "has a column named 'key', which is reserved" in plan_error(url)
        assert "reserved" in plan_error(url, exclude=f"s3://bucket{tmp_path}/out")


# Planning errors


def test_error_input_does_not_exist(tmp_path):
    with pytest.raises(InputError, match=r"^input does not exist: .*/nope$"):
        plan_inputs(str(tmp_path / "nope"))


def test_error_no_parquet_files(tmp_path):
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "a.csv").write_text("prompt\nx\n")
    with pytest.raises(InputError, match=r"^no Parquet files found at "):
        plan_inputs(str(tmp_path))
    with pytest.raises(InputError, match=r"^no Parquet files found at .*\*\.parquet$"):
        plan_inputs(str(tmp_path / "*.parquet"))


def test_error_every_file_bad(tmp_path):
    (tmp_path / "a.parquet").write_text("junk")
    (tmp_path / "b.parquet").write_bytes(b"")
    assert plan_error(str(tmp_path)) == (
        f"none of the 2 Parquet files at {tmp_path} could be read: "
        "a.parquet: not a Parquet file (4 bytes); b.parquet: not a Parquet file (0 bytes)"
    )


def test_error_no_prompt_column(tmp_path):
    write(tmp_path / "a.parquet", prompt=["x"])
    write(tmp_path / "b.parquet", text=["x"], seed=[1])
    message = plan_error(str(tmp_path))
    assert message == f"{tmp_path}: file 'b.parquet' has no 'prompt' column; its columns are: text, seed"


@pytest.mark.parametrize("column", [C.KEY, C.SOURCE, C.ERROR, "__secret"])
def test_error_reserved_column(tmp_path, column):
    write(tmp_path / "a.parquet", prompt=["x"], **{column: ["v"]})
    with pytest.raises(InputError, match=rf"file 'a.parquet' has a column named '{column}', which is reserved"):
        plan_inputs(str(tmp_path))


def test_error_incompatible_types(tmp_path):
    write(tmp_path / "a.parquet", prompt=["x"], seed=[1])
    write(tmp_path / "b.parquet", prompt=["y"], seed=[1.5])
    write(tmp_path / "c.parquet", prompt=["z"], seed=[2.5])
    assert plan_error(str(tmp_path)) == (
        f"{tmp_path}: column 'seed' has incompatible types across files: "
        "int64 in 'a.parquet', double in 'b.parquet', 'c.parquet'"
    )


def test_error_rows_per_task(tmp_path):
    with pytest.raises(ValueError, match="rows_per_task must be >= 1, got 0"):
        plan_inputs(str(tmp_path), rows_per_task=0)


# Reading


def test_read_tasks_are_row_slices_and_read_only_their_rows(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": prompts(20)}), path, row_group_size=6)
    source = PromptTableDatasource(plan_inputs(str(path), rows_per_task=7))
    tasks = source.get_read_tasks(1)
    assert [t.metadata.num_rows for t in tasks] == [7, 7, 6]
    assert sum(t.metadata.size_bytes for t in tasks) == pytest.approx(source.estimate_inmemory_data_size(), abs=3)
    [block] = tasks[1]()
    assert block.column(C.PROMPT).to_pylist() == prompts(20)[7:14]
    assert block.column(C.SOURCE_ROW).to_pylist() == list(range(7, 14))
    assert block.schema == tasks[1].schema


def test_read_every_row_once_across_files(tmp_path, ray_local):
    sizes = {"a.parquet": 10, "b/c.parquet": 23, "d.parquet": 5, "e.parquet": 0}
    for name, n in sizes.items():
        extra = {"seed": pa.array(range(n), pa.int64())} if name == "a.parquet" else {}
        write(tmp_path / name, prompt=pa.array(prompts(n, name), pa.string()), **extra)
    plan = plan_inputs(str(tmp_path), rows_per_task=7)
    rows = read_prompts(plan).take_all()
    assert sorted((r[C.SOURCE], r[C.SOURCE_ROW], r[C.PROMPT]) for r in rows) == sorted(
        (name, i, f"{name}{i}") for name, n in sizes.items() for i in range(n)
    )
    assert {r["seed"] for r in rows if r[C.SOURCE] == "a.parquet"} == set(range(10))
    assert {r["seed"] for r in rows if r[C.SOURCE] != "a.parquet"} == {None}


def test_read_one_file_gives_several_blocks(tmp_path, ray_local):
    path = write(tmp_path / "one.parquet", prompt=prompts(64))
    ds = read_prompts(plan_inputs(str(path), rows_per_task=16)).materialize()
    assert ds.num_blocks() >= 4 and ds.count() == 64


@pytest.mark.timeout(120)
def test_read_fits_beside_actor_pools_holding_most_cpus(tmp_path, ray_local):
    # read_parquet's 1-CPU listing step would never be scheduled here, and the run would hang.
    path = write(tmp_path / "one.parquet", prompt=prompts(32))

    class Tag:
        def __call__(self, batch):
            return batch.append_column("tag", pa.array([1] * batch.num_rows))

    ds = read_prompts(plan_inputs(str(path), rows_per_task=8)).map_batches(
        Tag, batch_format="pyarrow", compute=ActorPoolStrategy(size=2), num_cpus=0.875
    )
    assert ds.count() == 32


def test_read_empty_table(tmp_path, ray_local):
    path = write(tmp_path / "e.parquet", prompt=pa.array([], pa.string()))
    assert read_prompts(plan_inputs(str(path))).count() == 0


def test_file_rewritten_after_planning_fails_the_read_in_one_line(tmp_path, ray_local):
    """A file replaced between planning and reading (fewer rows) must not be read under the planned rows' keys:
    its read fails, and the command's one-line message says why (the rerun plans it again)."""
    from jobs.cli import _first_cause

    path = write(tmp_path / "t.parquet", prompt=prompts(6))
    plan = plan_inputs(str(path))
    write(path, prompt=prompts(4, "new"))
    with pytest.raises(Exception) as e:
        read_prompts(plan).take_all()
    assert _first_cause(e.value) == ("InputChangedError: input file 't.parquet' changed after the run was planned "
                                      "(6 rows in 1 row groups then, 4 in 1 now)")


def test_plan_and_read_from_s3(tmp_path, ray_local, s3_bucket):
    for name, n in [("in/a.parquet", 5), ("in/sub/b.parquet", 9)]:
        s3_bucket.fs.put_file(str(write(tmp_path / name, prompt=prompts(n, name))), f"{s3_bucket.url}/{name}")
    # A secret of our own, to check it is never shown (the server accepts any).
    options = {**s3_bucket.storage_options, "key": "testing", "secret": "s3cr3t-value"}
    plan = plan_inputs(f"{s3_bucket.url}/in/", storage_options=options, rows_per_task=4)
    assert [(f.source, f.url) for f in plan.files] == [
        ("a.parquet", f"{s3_bucket.url}/in/a.parquet"),
        ("sub/b.parquet", f"{s3_bucket.url}/in/sub/b.parquet"),
    ]
    assert "s3cr3t" not in repr(plan)
    rows = read_prompts(plan).take_all()
    assert sorted((r[C.SOURCE], r[C.SOURCE_ROW], r[C.PROMPT]) for r in rows) == sorted(
        [("a.parquet", i, f"in/a.parquet{i}") for i in range(5)]
        + [("sub/b.parquet", i, f"in/sub/b.parquet{i}") for i in range(9)]
    )
    message = plan_error(f"{s3_bucket.url}/missing/", storage_options=options)
    assert message == f"input does not exist: {s3_bucket.url}/missing/"


def test_credentials_in_the_url_stay_out_of_messages(s3_server):
    # Plain HTTP against the local S3 server: fsspec's HTTP filesystem takes user:password@ in the URL.
    url = s3_server.replace("http://", "http://user:s3cr3t@") + "/missing/t.parquet"
    assert plan_error(url) == f"input does not exist: {s3_server}/missing/t.parquet"
