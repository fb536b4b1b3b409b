"""Repeated ids found by the cluster's hash-partitioned pass: the same rows, first holders and keys as one pass over
the whole input in plan order, whatever the parts, partitions and read batching."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import columns as C
from pipeline import reader
from pipeline.duplicates import find_duplicates, first_holders, key_hashes, parts
from pipeline.reader import PromptTableDatasource, plan_inputs
from pipeline.schema import derive_key, prepare_batch, row_key

SETTINGS = dict(run_seed=0, prior_guidance_scale=4.0, decoder_guidance_scale=8.0)


def reference(files: list[tuple[str, list]]) -> dict[tuple[str, int], tuple[str, int]]:
    """(source, row) -> its first holder, by one pass in plan order, as a single process would."""
    seen, out = {}, {}
    for source, ids in files:
        for row, ident in enumerate(ids):
            key, reason = row_key(ident, source, row)
            if reason is None and key in seen:
                out[(source, row)] = seen[key]
            elif reason is None:
                seen[key] = (source, row)
    return out


def prepared(plan, duplicates, rows_per_task):
    blocks = [b for t in PromptTableDatasource(plan, duplicates=duplicates).get_read_tasks(1) for b in t()]
    return pa.concat_tables([prepare_batch(b, **SETTINGS) for b in blocks])


def test_key_hashes_follow_keys():
    ids = pa.chunked_array([pa.array(["a", None, "", "a/b", "a.b", "a/b", "a"])])
    rows, h1, h2 = key_hashes(ids, ("0123456789abcdef", "fedcba9876543210"))
    assert rows.tolist() == [0, 3, 4, 5, 6]  # null and empty ids get derived keys: never repeats
    pairs = list(zip(h1.tolist(), h2.tolist()))
    assert pairs[0] == pairs[4] and pairs[1] == pairs[3] and len(set(pairs)) == 3  # "a/b" and "a.b": other keys
    ints = key_hashes(pa.chunked_array([pa.array([5, None, -5, 5], pa.int64())]), ("0" * 16, "1" * 16))
    assert ints[0].tolist() == [0, 2, 3] and ints[1][0] == ints[1][2] != ints[1][1]
    floats = key_hashes(pa.chunked_array([pa.array([1.0, 1.0])]), ("0" * 16, "1" * 16))
    assert len(floats[0]) == 0  # not ids a key can be made of: error rows, never repeats
    dictionary = key_hashes(pa.chunked_array([pa.array(["x", "y", "x"]).dictionary_encode()]), ("0" * 16, "1" * 16))
    assert dictionary[1][0] == dictionary[1][2] != dictionary[1][1]


def test_first_holders_sorts_by_hash_then_position():
    one = np.array([[1, 9, 4], [2, 2, 0]], np.uint64)  # (hash 1, hash 2, position)
    two = np.array([[1, 9, 1], [1, 8, 3], [1, 9, 7], [2, 2, 5]], np.uint64)
    repeats, n = first_holders(one, two)
    assert n == 3 and repeats.tolist() == [[4, 1], [5, 0], [7, 1]]


def test_parts_cut_the_plan_in_order(tmp_path):
    for name, n in (("a.parquet", 5), ("b.parquet", 0), ("c.parquet", 6)):
        pq.write_table(pa.table({"prompt": ["p"] * n}), tmp_path / name)
    cut = parts(plan_inputs(str(tmp_path)), part_rows=4)
    assert [[(p.file.source, p.offset, p.start, p.stop) for p in part] for part in cut] == [
        [("a.parquet", 0, 0, 4)], [("a.parquet", 0, 4, 5), ("c.parquet", 5, 0, 3)], [("c.parquet", 5, 3, 6)]]


@pytest.mark.parametrize("part_rows,partition_rows,rows_per_task,max_tasks", [
    (1_000_000, 2_000_000, 64, 4096),  # one part, one partition
    (7, 11, 3, 4),  # many of each, several blocks per task
    (13, 5, 1, 4096),  # one row per block
])
def test_the_pass_marks_what_one_pass_in_plan_order_would(tmp_path, ray_local, monkeypatch, part_rows,
                                                          partition_rows, rows_per_task, max_tasks):
    rng = np.random.default_rng(0)
    pool = [f"id{i}" for i in range(25)] + ["x/y", "x.y", "-lead", "0123456789-012345678"]
    files = []
    for name, n in (("a.parquet", 31), ("b/b.parquet", 0), ("c.parquet", 17), ("d.parquet", 22)):
        ids = [None if r < 0.1 else "" if r < 0.15 else str(rng.choice(pool)) for r in rng.random(n)]
        (tmp_path / name).parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"prompt": [f"{name}{i}" for i in range(n)], "id": pa.array(ids, pa.string())}),
                       tmp_path / name, row_group_size=5)
        files.append((name, ids))
    monkeypatch.setattr(reader, "MAX_READ_TASKS", max_tasks)
    plan = plan_inputs(str(tmp_path), rows_per_task=rows_per_task)
    index = find_duplicates(plan, part_rows=part_rows, partition_rows=partition_rows)
    expected = reference(files)
    assert index.repeats == len(expected) > 10

    out = prepared(plan, index, rows_per_task)
    assert out.num_rows == 70 and not {C.FIRST_HOLDER_SOURCE, C.FIRST_HOLDER_ROW} & set(out.column_names)
    marked = {}
    for source, row, key, error in zip(*(out.column(c).to_pylist() for c in (
            C.SOURCE, C.SOURCE_ROW, C.KEY, C.ERROR))):
        if error.startswith("duplicate id"):
            marked[(source, row)] = error
            assert key == derive_key(source, row)
    assert marked == {place: f"duplicate id {ident!r}: row {first[1]} of {first[0]!r} has the same key "
                             f"{row_key(ident, *first)[0]!r}"
                      for place, first in expected.items() for ident in [dict(files)[place[0]][place[1]]]}
    keys = out.column(C.KEY).to_pylist()
    assert len(set(keys)) == len(keys)


def test_no_id_column_no_pass(tmp_path, ray_local):
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "t.parquet")
    assert find_duplicates(plan_inputs(str(tmp_path))) is None


def test_integer_ids(tmp_path, ray_local):
    pq.write_table(pa.table({"prompt": ["p"] * 6, "id": pa.array([3, 4, None, 3, -4, 4], pa.int64())}),
                   tmp_path / "t.parquet")
    plan = plan_inputs(str(tmp_path), rows_per_task=2)
    out = prepared(plan, find_duplicates(plan, partition_rows=2), 2)
    assert out.column(C.ERROR).to_pylist() == [
        "", "", "", "duplicate id 3: row 0 of 't.parquet' has the same key '3'", "",
        "duplicate id 4: row 1 of 't.parquet' has the same key '4'"]
