"""Rows below the minimum CLIP score: split from a shard's good rows and kept whole in ``rejected/``.

A rejected row is filtered, not lost: its Parquet row holds everything a good row's files hold (the metadata
columns, the encoded image as a Hugging Face ``Image`` struct, every embedding as a list), so it can be promoted
back without generating it again, and a resumed run counts it as done.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import columns as C
from pipeline.shards import ShardRows, hf_images, hf_metadata, metadata_table


def split_rejected(good: ShardRows, min_clip_score: float | None) -> tuple[ShardRows, ShardRows]:
    """(kept, rejected) good rows: rejected when the CLIP score is below ``min_clip_score`` (None keeps all)."""
    if min_clip_score is None or good.num_rows == 0:
        return good, good.filter(np.zeros(good.num_rows, bool))
    if C.CLIP_SCORE not in good.table.column_names:
        raise KeyError(f"a minimum CLIP score needs the {C.CLIP_SCORE!r} column; run the clip_score stage")
    low = pc.less(good.table.column(C.CLIP_SCORE), min_clip_score).to_numpy(zero_copy_only=False)
    return good.filter(~low), good.filter(low)


def rejected_table(rows: ShardRows, settings: dict, image_format: str) -> pa.Table:
    """The metadata of ``rows`` (key, prompt, seed, clip_score, settings, pass-through), then the image and
    every embedding, one row each."""
    table = metadata_table(rows, settings)
    table = table.append_column(C.IMAGE, hf_images(table.column(C.KEY).to_pylist(), rows.tensor(C.IMAGE),
                                                   image_format))
    for name in (C.IMAGE_EMB, C.TEXT_EMB, C.CLIP_IMAGE_EMB):
        values = rows.tensor(name).astype(np.float32)  # (N, D)
        table = table.append_column(name, pa.FixedSizeListArray.from_arrays(values.reshape(-1), values.shape[1]))
    # By this metadata Hugging Face datasets decode the image column as an Image, not as a dict.
    return table.replace_schema_metadata(hf_metadata({C.IMAGE: {"_type": "Image"}}))
