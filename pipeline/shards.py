"""What goes into one output shard: row splitting, image encoding and the bytes of each shard file.

Nothing here touches storage; every writer takes an open binary file. ``pipeline.sinks`` decides where
the files go and how they are committed.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime
import decimal
import hashlib
import io
import json
import re
import tarfile
import uuid
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from ray.data.block import BlockAccessor

from pipeline import columns as C

# image_format -> file extension used in tar members and HF paths.
IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
# Pillow save() options per format. PNG stays on Pillow's defaults (lossless, zlib level 6); 95 keeps JPEG
# and WebP close to visually lossless at 256 px; it is also img2dataset's default encode_quality.
ENCODER_OPTIONS: dict[str, dict[str, Any]] = {"png": {}, "jpeg": {"quality": 95}, "webp": {"quality": 95}}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

TENSOR_COLUMNS = (C.IMAGE, C.IMAGE_EMB, C.TEXT_EMB, C.CLIP_IMAGE_EMB)
REQUIRED_COLUMNS = (C.KEY, C.PROMPT, C.SEED, C.ERROR)
# Interpreted columns, in the order metadata files list them; those a block lacks are skipped.
METADATA_COLUMNS = (
    C.KEY,
    C.PROMPT,
    C.SEED,
    C.SAMPLE_INDEX,
    C.NEGATIVE_PROMPT,
    C.PRIOR_GUIDANCE_SCALE,
    C.DECODER_GUIDANCE_SCALE,
    C.PROMPT_TRUNCATED,
    C.CLIP_SCORE,
    C.AESTHETIC_SCORE,
    C.NSFW,
    C.NSFW_CONCEPT_SCORES,
    C.NSFW_SPECIAL_CARE_SCORES,
    C.REJECTED_REASON,
    C.SOURCE_IMAGE_PATH,
    C.ID,
    C.SOURCE,
    C.SOURCE_ROW,
)
ERROR_COLUMNS = (C.KEY, C.ID, C.SOURCE, C.SOURCE_ROW, C.PROMPT, C.SOURCE_IMAGE_PATH, C.SEED, C.SAMPLE_INDEX,
                 C.ERROR_STAGE, C.ERROR)
# Never copied to metadata as pass-through: the error pair only describes error rows, tensors have own files.
_NOT_PASSTHROUGH = set(METADATA_COLUMNS) | set(TENSOR_COLUMNS) | {C.ERROR, C.ERROR_STAGE}

# Row groups of ~100 images keep streaming readers (HF datasets, DuckDB) from loading a whole shard at once;
# img2dataset's parquet writer uses the same size.
IMAGE_PARQUET_ROW_GROUP = 100
# Hugging Face `Image` storage: the field order (bytes first) is part of the type datasets matches on.
HF_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_HF_FEATURES = {
    C.IMAGE: {"_type": "Image"},
    C.KEY: {"dtype": "string", "_type": "Value"},
    C.PROMPT: {"dtype": "string", "_type": "Value"},
    C.SEED: {"dtype": "int64", "_type": "Value"},
}


def hf_metadata(features: dict[str, dict]) -> dict[str, str]:
    """Parquet schema metadata by which Hugging Face datasets read these columns' features; the features of
    columns it leaves out follow from their Arrow types."""
    return {"huggingface": json.dumps({"info": {"features": features}})}


HF_SCHEMA = pa.schema(
    [(C.IMAGE, HF_IMAGE_TYPE), (C.KEY, pa.string()), (C.PROMPT, pa.string()), (C.SEED, pa.int64())],
    metadata=hf_metadata(_HF_FEATURES),
)

# Keys become file names: a dot would split webdataset's key from the extension, a slash would make a folder;
# control characters (NUL separates keys in the shard id hash) have no place in a name.
_UNSAFE_KEY = re.compile(r"[/.\x00-\x1f]")


def encode_image(array: np.ndarray, fmt: str) -> bytes:
    """Encode one (H, W, 3) uint8 image with this project's encoder settings."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {array.shape} {array.dtype}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=_PIL_FORMATS[fmt], **ENCODER_OPTIONS[fmt])
    return buf.getvalue()


def image_files(images: np.ndarray, fmt: str) -> Iterator[bytes]:
    """Each row's image file, in order: (N, H, W, 3) uint8 arrays are encoded here; an object array already holds
    the files the encode step made (pipeline.encode)."""
    if images.dtype == object:
        yield from images
        return
    for image in images:
        yield encode_image(image, fmt)


def shard_id(keys: Iterable[str]) -> str:
    """16 hex chars of sha256 over the sorted keys: a retried write reproduces it, other rows do not."""
    digest = hashlib.sha256("\0".join(sorted(keys)).encode("utf-8"))
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class ShardRows:
    """Rows of one shard: scalar and pass-through columns as Arrow, model outputs as numpy."""

    table: pa.Table
    tensors: dict[str, np.ndarray]

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def slice(self, start: int, length: int) -> ShardRows:
        return ShardRows(
            self.table.slice(start, length),
            {name: array[start : start + length] for name, array in self.tensors.items()},
        )

    def filter(self, mask: np.ndarray) -> ShardRows:
        return ShardRows(
            self.table.filter(pa.array(mask)),
            {name: array[mask] for name, array in self.tensors.items()},
        )

    def take(self, indices: np.ndarray) -> ShardRows:
        return ShardRows(self.table.take(pa.array(indices)),
                         {name: array[indices] for name, array in self.tensors.items()})

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(f"good rows need the {name!r} column; the block has {sorted(self.tensors)}")
        return self.tensors[name]


def require_columns(names: Iterable[str]) -> None:
    """Raise KeyError naming the required columns absent from ``names``."""
    names = list(names)
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise KeyError(f"rows reaching the sink lack the columns {missing}; they have {names}")


def require_no_clash(settings: dict[str, Any], names: Iterable[str]) -> None:
    """Raise ValueError when a run setting would overwrite a column of the rows."""
    clash = sorted(set(settings) & set(names))
    if clash:
        raise ValueError(f"settings {clash} have the same names as input columns")


def rows_from_block(block: Any) -> ShardRows:
    """Split a Ray block into Arrow scalar columns and numpy tensors, dropping internal columns."""
    table = BlockAccessor.for_block(block).to_arrow()
    table = table.select([name for name in table.column_names if not C.is_internal(name)])
    require_columns(table.column_names)
    tensor_names = [name for name in TENSOR_COLUMNS if name in table.column_names]
    tensors = {}
    if tensor_names:
        arrays = BlockAccessor.for_block(table.select(tensor_names)).to_numpy(tensor_names)
        tensors = {name: np.asarray(arrays[name]) for name in tensor_names}
    scalars = table.drop_columns(tensor_names)
    return ShardRows(_plain_arrow(scalars), tensors)


def _plain_arrow(table: pa.Table) -> pa.Table:
    """Replace extension columns (Ray tensors passed through, e.g. extra embeddings) by their storage,
    so that metadata files are plain Parquet for readers without Ray (a (D,) tensor becomes a list)."""
    for i, field in enumerate(table.schema):
        if isinstance(field.type, pa.ExtensionType):
            column = table.column(i)
            storage = pa.chunked_array([chunk.storage for chunk in column.chunks], type=field.type.storage_type)
            table = table.set_column(i, pa.field(field.name, storage.type), storage)
    return table


def unwritable_columns(schema: pa.Schema) -> list[str]:
    """Pass-through columns of ``schema`` whose type a metadata Parquet file cannot hold, as "name (type): why".

    Found from the types alone (a column of nulls), so that such a column refuses the run before any row is
    generated instead of failing every write task after the model stages did their work."""
    bad = []
    for field in schema:
        if field.name in _NOT_PASSTHROUGH or C.is_internal(field.name):
            continue
        try:
            write_parquet(io.BytesIO(), _plain_arrow(pa.table({field.name: pa.nulls(1, field.type)})))
        except (pa.ArrowException, TypeError, ValueError) as e:
            bad.append(f"{field.name} ({field.type}): {e}")
    return bad


def concat_rows(pieces: list[ShardRows]) -> ShardRows:
    if len(pieces) == 1:
        return pieces[0]
    # Pass-through columns may differ between blocks (e.g. all-null in one); permissive promotion unifies.
    table = pa.concat_tables([piece.table for piece in pieces], promote_options="permissive")
    names = set(pieces[0].tensors)
    if any(set(piece.tensors) != names for piece in pieces):
        raise ValueError("blocks of one write disagree on which tensor columns they carry")
    return ShardRows(table, {name: np.concatenate([piece.tensors[name] for piece in pieces]) for name in names})


def iter_shards(blocks: Iterable[Any], rows_per_shard: int) -> Iterator[ShardRows]:
    """Cut the rows of ``blocks`` into consecutive shards of at most ``rows_per_shard`` rows, in input order."""
    pending: list[ShardRows] = []
    pending_rows = 0
    for block in blocks:
        if BlockAccessor.for_block(block).num_rows() == 0:
            continue  # an empty block may have no columns at all (Ray Data makes them where a map emits no rows)
        rows = rows_from_block(block)
        start = 0
        while start < rows.num_rows:
            take = min(rows_per_shard - pending_rows, rows.num_rows - start)
            pending.append(rows.slice(start, take))
            pending_rows += take
            start += take
            if pending_rows == rows_per_shard:
                yield concat_rows(pending)
                pending, pending_rows = [], 0
    if pending:
        yield concat_rows(pending)


def check_keys(table: pa.Table) -> list[str]:
    """The shard's keys, after checking they are usable as unique file stems."""
    keys = table.column(C.KEY).to_pylist()
    bad = [key for key in keys if not isinstance(key, str) or not key or _UNSAFE_KEY.search(key)]
    if bad:
        raise ValueError(f"keys must be non-empty strings without '/', '.' or control characters: {bad[:5]}")
    dupes = sorted(key for key, count in collections.Counter(keys).items() if count > 1)
    if dupes:
        raise ValueError(f"duplicate keys in one shard: {dupes[:5]}")
    return keys


def error_mask(table: pa.Table) -> np.ndarray:
    """True for error rows (a non-empty ``error``); a null error counts as none."""
    errors = pc.fill_null(table.column(C.ERROR), "")
    return pc.not_equal(errors, "").to_numpy(zero_copy_only=False)


def metadata_table(rows: ShardRows, settings: dict[str, Any]) -> pa.Table:
    """Per-row metadata of good rows: interpreted columns, then run settings, then pass-through columns."""
    table = rows.table
    require_no_clash(settings, table.column_names)
    out = {name: table.column(name) for name in METADATA_COLUMNS if name in table.column_names}
    out[C.KEY] = out[C.KEY].cast(pa.string())
    out[C.PROMPT] = out[C.PROMPT].cast(pa.string())
    out[C.SEED] = out[C.SEED].cast(pa.int64())
    for name, value in settings.items():
        out[name] = pa.repeat(value, table.num_rows)
    for name in table.column_names:
        if name not in _NOT_PASSTHROUGH:
            out[name] = table.column(name)
    return pa.table(out)


def errors_table(rows: ShardRows) -> pa.Table:
    """One row per error row, with the prompt as the user gave it (non-strings as their repr)."""
    table = rows.table
    out = {name: table.column(name) for name in ERROR_COLUMNS if name in table.column_names}
    out[C.KEY] = out[C.KEY].cast(pa.string())
    out[C.PROMPT] = _prompt_as_text(table.column(C.PROMPT))
    return pa.table(out)


def _prompt_as_text(prompts: pa.ChunkedArray) -> pa.Array:
    if pa.types.is_string(prompts.type) or pa.types.is_large_string(prompts.type):
        return prompts.cast(pa.string())
    return pa.array([None if p is None else repr(p) for p in prompts.to_pylist()], pa.string())


def l2_normalised(embeddings: np.ndarray) -> np.ndarray:
    """(N, D) rows scaled to unit L2 norm in float32 (a zero row, as an error row's placeholder, stays zero)."""
    rows = embeddings.astype(np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)  # (N, 1)
    return rows / np.where(norms > 0, norms, 1.0)


def write_npy(f: BinaryIO, embeddings: np.ndarray) -> None:
    """Save (N, D) embeddings as C-order little-endian float16, the layout embedding-reader parses."""
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {embeddings.shape}")
    np.save(f, np.ascontiguousarray(embeddings, dtype="<f2"), allow_pickle=False)


def write_parquet(f: BinaryIO, table: pa.Table, row_group_size: int | None = None) -> None:
    pq.write_table(table, f, row_group_size=row_group_size)


def write_webdataset(f: BinaryIO, metadata: pa.Table, images: np.ndarray, image_format: str) -> None:
    """Stream one POSIX (pax) tar: per row ``<key>.<ext>``, ``<key>.json`` and ``<key>.txt``, adjacent and
    name-sorted, with fixed owner and mtime so the same rows always give the same bytes.

    The bytes are those of ``tarfile``'s stream mode ("w|"), written without its 10 KiB record buffer, which
    costs several small writes and copies per 256 px image.
    """
    ext = IMAGE_EXTENSIONS[image_format]
    offset = 0
    for row, image in zip(metadata.to_pylist(), image_files(images, image_format), strict=True):
        key = row[C.KEY]
        members = {
            f"{key}.{ext}": image,
            f"{key}.json": json.dumps(row, ensure_ascii=False, default=_json_value).encode("utf-8"),
            f"{key}.txt": row[C.PROMPT].encode("utf-8"),
        }
        for name in sorted(members):
            offset += _write_member(f, name, members[name])
    # End of archive: two zero blocks, then zeros up to a whole record.
    offset += 2 * tarfile.BLOCKSIZE
    f.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-offset) % tarfile.RECORDSIZE))


def _write_member(f: BinaryIO, name: str, data: bytes) -> int:
    """Write one member (header, data, zero padding to a whole block); returns the bytes written."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    padding = tarfile.NUL * ((-len(data)) % tarfile.BLOCKSIZE)
    f.write(header)
    f.write(data)
    f.write(padding)
    return len(header) + len(data) + len(padding)


def _json_value(value: Any) -> Any:
    """JSON form of the Python values Arrow's to_pylist yields that json cannot write itself."""
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, uuid.UUID):  # Arrow's uuid extension type; uuid.UUID(text) reads it back
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to per-sample JSON")


def hf_images(keys: list[str], images: np.ndarray, image_format: str) -> pa.Array:
    """Hugging Face ``Image`` structs ``{bytes, path: <key>.<ext>}``, one per row."""
    ext = IMAGE_EXTENSIONS[image_format]
    files = image_files(images, image_format)
    return pa.array([{"bytes": data, "path": f"{key}.{ext}"} for key, data in zip(keys, files, strict=True)],
                    HF_IMAGE_TYPE)


def write_image_parquet(f: BinaryIO, metadata: pa.Table, images: np.ndarray, image_format: str) -> None:
    """Images as a Hugging Face ``Image`` column next to key, prompt and seed."""
    table = pa.Table.from_arrays(
        [
            hf_images(metadata.column(C.KEY).to_pylist(), images, image_format),
            metadata.column(C.KEY),
            metadata.column(C.PROMPT),
            metadata.column(C.SEED),
        ],
        schema=HF_SCHEMA,
    )
    write_parquet(f, table, row_group_size=IMAGE_PARQUET_ROW_GROUP)
