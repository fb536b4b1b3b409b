"""Rows filtered out by a score (CLIP, aesthetic) or the safety checker: split from a shard's good rows and kept
whole in ``rejected/``, with the reason.

A rejected row is filtered, not lost: its Parquet row holds everything a good row's files hold (the metadata
columns, the encoded image as a Hugging Face ``Image`` struct, every embedding as a list), so it can be promoted
back without generating it again, and a resumed run counts it as done.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import columns as C
from pipeline.shards import ShardRows, hf_images, hf_metadata, metadata_table


@dataclass(frozen=True)
class Filters:
    """Which good rows go to rejected/: below a minimum CLIP or aesthetic score (None: no minimum), or flagged by
    the safety checker when ``drop_unsafe``."""

    min_clip_score: float | None = None
    min_aesthetic: float | None = None
    drop_unsafe: bool = False


def split_rejected(good: ShardRows, filters: Filters) -> tuple[ShardRows, ShardRows]:
    """(kept, rejected) good rows; each rejected row says why in ``rejected_reason`` (every failed filter,
    "; "-joined)."""
    tests = []  # (reason, (N,) bool: the row fails it)
    if filters.min_clip_score is not None:
        tests.append((f"{C.CLIP_SCORE} < {_number(filters.min_clip_score)}",
                      _below(good, C.CLIP_SCORE, filters.min_clip_score, "the clip_score stage")))
    if filters.min_aesthetic is not None:
        tests.append((f"{C.AESTHETIC_SCORE} < {_number(filters.min_aesthetic)}",
                      _below(good, C.AESTHETIC_SCORE, filters.min_aesthetic, "an aesthetic model")))
    if filters.drop_unsafe:
        tests.append((C.NSFW, _column(good, C.NSFW, "a safety checker").astype(bool)))
    if not tests or good.num_rows == 0:
        return good, good.filter(np.zeros(good.num_rows, bool))
    failed = np.stack([mask for _, mask in tests])  # (filters, N)
    out = failed.any(axis=0)
    reasons = ["; ".join(reason for (reason, _), hit in zip(tests, failed[:, i]) if hit) for i in np.flatnonzero(out)]
    rejected = good.filter(out)
    reason_column = pa.array(reasons, pa.string())
    return good.filter(~out), ShardRows(rejected.table.append_column(C.REJECTED_REASON, reason_column),
                                        rejected.tensors)


def _column(rows: ShardRows, name: str, source: str) -> np.ndarray:
    if name not in rows.table.column_names:
        raise KeyError(f"filtering on {name!r} needs that column; run the clip_score stage with {source}")
    return rows.table.column(name).to_numpy(zero_copy_only=False)


def _below(rows: ShardRows, name: str, minimum: float, source: str) -> np.ndarray:
    return _column(rows, name, source) < minimum


def _number(x: float) -> str:
    """A threshold as users write it: 0.2, 5 (not 5.0), and every digit when %g would drop some."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def rejected_table(rows: ShardRows, settings: dict, image_format: str) -> pa.Table:
    """The metadata of ``rows`` (key, prompt, seed, scores, rejected_reason, settings, pass-through), then the image and
    every embedding, one row each."""
    table = metadata_table(rows, settings)
    table = table.append_column(C.IMAGE, hf_images(table.column(C.KEY).to_pylist(), rows.tensor(C.IMAGE),
                                                   image_format))
    for name in (C.IMAGE_EMB, C.TEXT_EMB, C.CLIP_IMAGE_EMB):
        values = rows.tensor(name).astype(np.float32)  # (N, D)
        table = table.append_column(name, pa.FixedSizeListArray.from_arrays(values.reshape(-1), values.shape[1]))
    # By this metadata Hugging Face datasets decode the image column as an Image, not as a dict.
    return table.replace_schema_metadata(hf_metadata({C.IMAGE: {"_type": "Image"}}))
