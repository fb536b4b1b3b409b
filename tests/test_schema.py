import datetime
import hashlib
import re

import pyarrow as pa
import pytest

from pipeline import columns as C
from pipeline.schema import derive_key, derive_seed, key_from_id, make_key, prepare_batch

RUN = dict(run_seed=7, prior_guidance_scale=4.0, decoder_guidance_scale=8.0)
KEY_STEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def batch(prompts, source="a.parquet", **columns) -> pa.Table:
    """A reader batch: the given columns plus source/source_row."""
    n = len(prompts)
    data = {C.PROMPT: prompts, **columns}
    table = pa.table({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in data.items()})
    return table.append_column(C.SOURCE, pa.array([source] * n)).append_column(C.SOURCE_ROW, pa.array(range(n)))


def prepare(table: pa.Table) -> pa.Table:
    out = prepare_batch(table, **RUN)
    assert out.num_rows == table.num_rows
    for name in (C.KEY, C.SEED, C.NEGATIVE_PROMPT, C.PRIOR_GUIDANCE_SCALE, C.DECODER_GUIDANCE_SCALE, C.ERROR):
        assert out.column(name).null_count == 0, name
    return out


def errors(table: pa.Table) -> list[str]:
    return prepare(table).column(C.ERROR).to_pylist()


def test_good_rows_pass_through_every_column_untouched():
    extra = {
        "id": ["a", "b"],
        "style": ["x", None],
        "count": [1, 2],
        "tags": pa.array([["p", "q"], []], pa.list_(pa.string())),
        "meta": pa.array([{"w": 1, "h": "x"}, {"w": 2, "h": None}]),
        "when": pa.array([datetime.datetime(2024, 1, 1), None], pa.timestamp("us", tz="UTC")),
    }
    table = batch(["  a cat  ", "a dog"], **extra)
    out = prepare(table)
    assert out.column(C.ERROR).to_pylist() == ["", ""]
    assert out.column(C.ERROR_STAGE).to_pylist() == ["", ""]
    for name in table.column_names:
        assert out.column(name).equals(table.column(name)), name  # the prompt keeps its spaces
    assert out.column_names == [
        *table.column_names,
        C.KEY,
        C.SEED,
        C.NEGATIVE_PROMPT,
        C.PRIOR_GUIDANCE_SCALE,
        C.DECODER_GUIDANCE_SCALE,
        C.ERROR,
        C.ERROR_STAGE,
    ]
    assert out.schema.field(C.SEED).type == pa.int64()
    assert out.schema.field(C.PRIOR_GUIDANCE_SCALE).type == pa.float64()
    assert out.column(C.KEY).to_pylist() == ["a", "b"]
    assert out.column(C.NEGATIVE_PROMPT).to_pylist() == ["", ""]
    assert out.column(C.PRIOR_GUIDANCE_SCALE).to_pylist() == [4.0, 4.0]
    assert out.column(C.DECODER_GUIDANCE_SCALE).to_pylist() == [8.0, 8.0]


def test_empty_batch():
    out = prepare(batch(pa.array([], pa.string())))
    assert out.num_rows == 0 and C.KEY in out.column_names


@pytest.mark.parametrize(
    "prompt, message",
    [
        (None, "prompt is null"),
        ("", "prompt is empty"),
        (" \t\n", "prompt is only whitespace"),
    ],
)
def test_bad_prompts_become_error_rows(prompt, message):
    out = prepare(batch(pa.array(["fine", prompt], pa.string())))
    assert out.column(C.ERROR).to_pylist() == ["", message]
    assert out.column(C.ERROR_STAGE).to_pylist() == ["", "prepare"]


def test_non_string_prompt():
    assert errors(batch([3, 4])) == ["prompt must be a string, got 3", "prompt must be a string, got 4"]


def test_derived_keys_are_stable_and_documented():
    out = prepare(batch(["a", "b"], source="dir/x.parquet"))
    prefix = hashlib.sha256(b"dir/x.parquet").hexdigest()[:10]
    assert out.column(C.KEY).to_pylist() == [f"{prefix}-000000000", f"{prefix}-000000001"]
    assert derive_key("dir/x.parquet", 1) == f"{prefix}-000000001"
    assert prepare(batch(["a", "b"], source="dir/y.parquet")).column(C.KEY)[0].as_py() != f"{prefix}-000000000"


def test_null_id_falls_back_to_the_derived_key():
    out = prepare(batch(["a", "b"], id=pa.array([None, "x"], pa.string())))
    assert out.column(C.KEY).to_pylist() == [derive_key("a.parquet", 0), "x"]


def test_integer_ids():
    out = prepare(batch(["a", "b"], id=[12, -5]))
    keys = out.column(C.KEY).to_pylist()
    assert keys[0] == "12"
    assert re.fullmatch(r"_5-[0-9a-f]{12}", keys[1])  # no leading '-'
    assert out.column(C.ERROR).to_pylist() == ["", ""]


@pytest.mark.parametrize(
    "ident",
    ["../../etc/passwd", "a/b", "a.b", "has space", "tab\there", "ctrl\x00x", "naïve", "日本", "-lead", "x" * 101],
)
def test_unsafe_ids_are_sanitised_and_hashed(ident):
    key = key_from_id(ident)
    stem, digest = key.rsplit("-", 1)
    assert KEY_STEM.fullmatch(key)
    assert "/" not in key and "." not in key and len(stem) <= 64
    assert digest == hashlib.sha256(ident.encode()).hexdigest()[:12]


def test_safe_ids_are_used_as_is():
    for ident in ["abc", "A_b-9", "_x", "9" * 100]:
        assert key_from_id(ident) == ident


def test_sanitised_ids_stay_distinct():
    assert key_from_id("a/b") != key_from_id("a.b") != key_from_id("a b")


def test_ids_spelled_like_made_keys_are_sanitised():
    """An id spelled like a derived key or another id's sanitised key would take a key the pipeline gives another
    row; such ids are sanitised as unsafe ones are, so the three kinds of key never meet."""
    derived, sanitised = derive_key("a.parquet", 0), key_from_id("a b")
    for ident in (derived, sanitised):
        key = key_from_id(ident)
        assert key not in (derived, sanitised) and key.startswith(ident + "-")
        assert key_from_id(key) != key  # and the result is itself a made key, never an id's verbatim key
    out = prepare(batch(["a", "b", "c"], id=pa.array([None, derived, sanitised], pa.string())))
    assert out.column(C.ERROR).to_pylist() == ["", "", ""]
    assert len(set(out.column(C.KEY).to_pylist())) == 3


def test_make_key():
    assert make_key(None, "s", 3) == derive_key("s", 3)
    assert make_key("k", "s", 3) == "k"
    with pytest.raises(ValueError, match="id is empty"):
        make_key("", "s", 3)


@pytest.mark.parametrize(
    "ids, message",
    [
        (pa.array([1.5], pa.float64()), "id must be a string or an integer, got 1.5"),
        (pa.array([True]), "id must be a string or an integer, got True"),
        (pa.array([""]), "id is empty"),
    ],
)
def test_bad_ids_become_error_rows_with_derived_keys(ids, message):
    out = prepare(batch(["a"], id=ids))
    assert out.column(C.ERROR).to_pylist() == [message]
    assert out.column(C.KEY).to_pylist() == [derive_key("a.parquet", 0)]


def test_duplicate_ids_in_a_batch():
    out = prepare(batch(["a", "b", "c"], id=["k", "k", "j"]))
    assert out.column(C.ERROR).to_pylist() == ["", "duplicate id 'k': row 0 of 'a.parquet' has the same key 'k'", ""]
    keys = out.column(C.KEY).to_pylist()
    assert keys[0] == "k" and keys[2] == "j" and len(set(keys)) == 3


def test_derived_seed():
    out = prepare(batch(["a", "b"], id=["k", "j"]))
    expected = int.from_bytes(hashlib.sha256(b"7:k").digest()[:8], "big") & (2**63 - 1)
    assert out.column(C.SEED).to_pylist() == [expected, derive_seed(7, "j")]
    assert derive_seed(7, "k") == expected and derive_seed(8, "k") != expected


def test_given_seeds_are_kept_and_nulls_derived():
    out = prepare(batch(["a", "b", "c"], id=["k", "j", "i"], seed=pa.array([0, None, 2**63 - 1], pa.uint64())))
    assert out.column(C.SEED).to_pylist() == [0, derive_seed(7, "j"), 2**63 - 1]
    assert out.column(C.ERROR).to_pylist() == ["", "", ""]


@pytest.mark.parametrize(
    "seeds, shown",
    [
        (pa.array([-1], pa.int64()), "-1"),
        (pa.array([2**63], pa.uint64()), str(2**63)),
        (pa.array([3.0]), "3.0"),
        (pa.array(["42"]), "'42'"),
        (pa.array([True]), "True"),
    ],
)
def test_bad_seeds_become_error_rows(seeds, shown):
    out = prepare(batch(["a"], seed=seeds))
    assert out.column(C.ERROR).to_pylist() == [f"seed must be an integer in [0, 2**63), got {shown}"]
    assert out.column(C.SEED).to_pylist() == [0]
    assert out.schema.field(C.SEED).type == pa.int64()


def test_negative_prompt():
    out = prepare(batch(["a", "b", "c"], negative_prompt=pa.array(["blurry", None, ""], pa.string())))
    assert out.column(C.NEGATIVE_PROMPT).to_pylist() == ["blurry", "", ""]
    assert errors(batch(["a"], negative_prompt=[5])) == ["negative_prompt must be a string, got 5"]


def test_guidance_scales():
    out = prepare(
        batch(
            ["a", "b", "c"],
            prior_guidance_scale=pa.array([None, 2, 0], pa.int32()),
            decoder_guidance_scale=pa.array([1.5, None, 0.0]),
        )
    )
    assert out.column(C.PRIOR_GUIDANCE_SCALE).to_pylist() == [4.0, 2.0, 0.0]
    assert out.column(C.DECODER_GUIDANCE_SCALE).to_pylist() == [1.5, 8.0, 0.0]
    assert out.column(C.ERROR).to_pylist() == ["", "", ""]


@pytest.mark.parametrize(
    "values, shown",
    [
        (pa.array([float("nan")]), "nan"),
        (pa.array([float("inf")]), "inf"),
        (pa.array([-0.5]), "-0.5"),
        (pa.array(["4"]), "'4'"),
    ],
)
@pytest.mark.parametrize("column", [C.PRIOR_GUIDANCE_SCALE, C.DECODER_GUIDANCE_SCALE])
def test_bad_guidance_scales_become_error_rows(column, values, shown):
    out = prepare(batch(["a"], **{column: values}))
    assert out.column(C.ERROR).to_pylist() == [f"{column} must be a finite number >= 0, got {shown}"]
    assert out.column(C.ERROR_STAGE).to_pylist() == ["prepare"]


def test_reasons_are_joined_and_long_values_truncated():
    [error] = errors(batch([""], seed=["9" * 500]))
    first, second = error.split("; ")
    assert first == "prompt is empty"
    assert second.startswith("seed must be an integer in [0, 2**63), got '999") and second.endswith("...")
    assert len(second) < 160


def test_prepare_is_deterministic():
    table = batch(["a", "b", None], source="p/q.parquet", id=pa.array([None, "x/y", "z"], pa.string()))
    first, second = prepare(table), prepare(table)
    assert first.equals(second)
