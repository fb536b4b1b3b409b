"""Resume by input rows: the rows each commit marker lists, the coverage a resumed run reads from the markers
alone, and the read tasks that skip what it covers, bounded in number however many rows the input has."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import columns as C
from pipeline import reader
from pipeline.coverage import Coverage, gaps, input_rows, union
from pipeline.outputs import output_filesystem, read_coverage
from pipeline.reader import PromptTableDatasource, plan_inputs


def intervals(*pairs):
    return np.array([a for a, _ in pairs], np.int64), np.array([b for _, b in pairs], np.int64)


def as_pairs(iv):
    return list(zip(iv[0].tolist(), iv[1].tolist()))


def test_input_rows_lists_runs_per_source_and_image():
    table = pa.table({C.SOURCE: ["b", "a", "a", "a", "b", "a", "a"],
                      C.SOURCE_ROW: pa.array([7, 3, 1, 2, 8, 9, 3], pa.int64()),
                      C.SAMPLE_INDEX: pa.array([0, 0, 0, 0, 0, 0, 1], pa.int32())})
    assert sorted(input_rows(table)) == [["a", 0, [1, 4, 9, 10]], ["a", 1, [3, 4]], ["b", 0, [7, 9]]]
    # Without sample_index every row is image 0; rows made outside a run say nothing.
    single = table.slice(0, 6).drop_columns([C.SAMPLE_INDEX])
    assert sorted(input_rows(single)) == [["a", 0, [1, 4, 9, 10]], ["b", 0, [7, 9]]]
    assert input_rows(pa.table({C.KEY: ["k"]})) is None


def test_union_and_gaps():
    assert as_pairs(union([intervals((5, 8), (0, 2)), intervals((2, 3), (7, 10), (20, 21))])) == [
        (0, 3), (5, 10), (20, 21)]
    assert as_pairs(gaps(0, 12, intervals((0, 3), (5, 10)))) == [(3, 5), (10, 12)]
    assert as_pairs(gaps(4, 6, intervals((0, 3), (5, 10)))) == [(4, 5)]
    assert as_pairs(gaps(0, 4, intervals())) == [(0, 4)]


def test_coverage_of_several_images_per_row():
    cov = Coverage()
    cov.add([["f", 0, [0, 6]], ["f", 1, [2, 4]], ["f", 1, [4, 5]], ["g", 0, [0, 1]]])
    # A row is read while any of its images is missing; its committed images are named for prepare to drop.
    assert as_pairs(cov.missing("f", 8, 2)) == [(0, 2), (5, 8)]
    assert as_pairs(cov.missing("f", 8, 1)) == [(6, 8)]
    assert as_pairs(cov.missing("h", 3, 1)) == [(0, 3)]
    assert cov.done("f", np.array([1, 3, 5, 6]), 2) == [[0], [0, 1], [0], []]


def write_markers(root, markers):
    (root / "_commits").mkdir(parents=True)
    for i, marker in enumerate(markers):
        (root / "_commits" / f"{i:016x}.json").write_text(json.dumps({"shard": f"{i:016x}", **marker}))


def test_read_coverage_from_markers_and_from_older_markers_tables(tmp_path, monkeypatch):
    root = tmp_path / "out"
    # A marker without input_rows (written before markers listed them): its rows' places come from its tables.
    (root / "metadata").mkdir(parents=True)
    (root / "errors").mkdir()
    pq.write_table(pa.table({C.KEY: ["x", "y"], C.SOURCE: ["a", "a"], C.SOURCE_ROW: pa.array([5, 6])}),
                   root / "metadata" / "metadata_0000000000000001.parquet")
    pq.write_table(pa.table({C.KEY: ["z"], C.SOURCE: ["b"], C.SOURCE_ROW: pa.array([0])}),
                   root / "errors" / "errors_0000000000000001.parquet")
    monkeypatch.setattr("pipeline.outputs._MARKERS_PER_READ", 1)  # one chunk per marker: the merge across chunks
    write_markers(root, [
        {"rows": 3, "errors": 0, "rejected": 1, "files": [], "input_rows": [["a", 0, [0, 2, 3, 5]]]},
        {"rows": 2, "errors": 1, "files": ["metadata/metadata_0000000000000001.parquet",
                                           "errors/errors_0000000000000001.parquet"]},
        {"rows": 0, "errors": 1, "files": [], "input_rows": [["a", 0, [2, 3]]]},
    ])
    cov = read_coverage(*output_filesystem(str(root)))
    assert cov.rows == 8
    assert as_pairs(cov.of("a", 0)) == [(0, 7)] and as_pairs(cov.of("b", 0)) == [(0, 1)]


def prompts_file(path, n, row_group_size):
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(n)], "id": [f"i{i}" for i in range(n)]}), path,
                   row_group_size=row_group_size)
    return path


def read_all(tasks):
    return [block for task in tasks for block in task()]


@pytest.mark.parametrize("row_group_size", [7, 1000])
def test_read_tasks_skip_covered_rows_and_stay_few(tmp_path, monkeypatch, row_group_size):
    prompts_file(tmp_path / "a.parquet", 50, row_group_size)
    prompts_file(tmp_path / "b.parquet", 30, row_group_size)
    plan = plan_inputs(str(tmp_path), rows_per_task=4)
    cov = Coverage()
    cov.add([["a.parquet", 0, [0, 10, 13, 40]], ["b.parquet", 0, [0, 30]]])
    monkeypatch.setattr(reader, "MAX_READ_TASKS", 3)
    tasks = PromptTableDatasource(plan, skip=cov).get_read_tasks(1)
    blocks = read_all(tasks)
    expected = [("a.parquet", r) for r in [*range(10, 13), *range(40, 50)]]
    got = [(s, r) for b in blocks for s, r in zip(b.column(C.SOURCE).to_pylist(), b.column(C.SOURCE_ROW).to_pylist())]
    assert got == expected
    assert [b.column(C.PROMPT).to_pylist() for b in blocks][0] == ["p10", "p11", "p12"]
    assert len(tasks) <= 3 and all(b.num_rows <= 4 for b in blocks)
    assert sum(t.metadata.num_rows for t in tasks) == len(expected)
    assert all(b.schema == tasks[0].schema for b in blocks)


def test_many_blocks_share_tasks_and_every_row_is_read_once(tmp_path, monkeypatch):
    prompts_file(tmp_path / "a.parquet", 1000, 300)
    plan = plan_inputs(str(tmp_path), rows_per_task=16)
    monkeypatch.setattr(reader, "MAX_READ_TASKS", 5)
    tasks = PromptTableDatasource(plan).get_read_tasks(1)
    blocks = read_all(tasks)
    assert len(tasks) == 5 and [b.num_rows for b in blocks][:3] == [16, 16, 16]
    rows = [r for b in blocks for r in b.column(C.SOURCE_ROW).to_pylist()]
    assert rows == list(range(1000))
    assert [p for b in blocks for p in b.column(C.PROMPT).to_pylist()] == [f"p{i}" for i in range(1000)]


def test_images_already_committed_are_marked_for_prepare(tmp_path):
    prompts_file(tmp_path / "a.parquet", 6, 6)
    plan = plan_inputs(str(tmp_path), rows_per_task=10)
    cov = Coverage()
    cov.add([["a.parquet", 0, [0, 6]], ["a.parquet", 1, [0, 2]], ["a.parquet", 2, [1, 3]]])
    block = pa.concat_tables(read_all(PromptTableDatasource(plan, skip=cov, images_per_prompt=3).get_read_tasks(1)))
    assert block.column(C.SOURCE_ROW).to_pylist() == [0, 2, 3, 4, 5]  # row 1 has all three images
    assert block.column(C.DONE_SAMPLES).to_pylist() == [[0, 1], [0, 2], [0], [0], [0]]

    from pipeline.schema import prepare_and_skip

    out = prepare_and_skip(block, images_per_prompt=3, run_seed=0, prior_guidance_scale=4.0,
                           decoder_guidance_scale=8.0)
    assert list(zip(out.column(C.SOURCE_ROW).to_pylist(), out.column(C.SAMPLE_INDEX).to_pylist())) == [
        (0, 2), (2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (5, 2)]
    assert C.DONE_SAMPLES not in out.column_names


def test_damaged_pages_make_the_rest_of_a_range_error_rows(tmp_path, monkeypatch):
    path = prompts_file(tmp_path / "a.parquet", 20, 20)
    plan = plan_inputs(str(tmp_path), rows_per_task=8)
    real = reader.iter_rows

    def failing(*args):
        it = real(*args)
        yield next(it)
        raise OSError("Corrupt snappy compressed data.")

    monkeypatch.setattr(reader, "iter_rows", failing)
    monkeypatch.setattr(reader, "MAX_READ_TASKS", 1)  # one task reads every block
    blocks = read_all(PromptTableDatasource(plan).get_read_tasks(1))
    assert [b.num_rows for b in blocks] == [8, 8, 4] and path.exists()
    assert blocks[0].column(C.READ_ERROR).null_count == 8
    errors = [e for b in blocks[1:] for e in b.column(C.READ_ERROR).to_pylist()]
    assert len(errors) == 12 and all(e.startswith("damaged Parquet data: OSError: Corrupt snappy") for e in errors)
    assert blocks[1].column(C.SOURCE_ROW).to_pylist() == list(range(8, 16))
