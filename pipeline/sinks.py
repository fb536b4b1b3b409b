"""Write generated rows as committed shards under one output URL (the layout: :mod:`pipeline.outputs`).

Every object appears whole or not at all: local files are written under a temporary name and renamed,
other filesystems (S3, GCS) upload without committing until the writer finished. A Ray task retried after
a failure rewrites the same names with the same bytes, because X hashes the shard's keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import uuid
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from ray.data import Datasink
from ray.data.block import Block
from ray.data.datasource.datasink import WriteResult

from pipeline import columns as C
from pipeline.config import OUTPUT_FORMATS
from pipeline.coverage import INPUT_ROWS, input_rows
from pipeline.outputs import (
    CLIP_EMB_DIR,
    COMMITS_DIR,
    ERRORS_DIR,
    IMAGES_DIR,
    IMG_EMB_DIR,
    METADATA_DIR,
    RAW_IMG_EMB_DIR,
    REJECTED_DIR,
    SHARD_FILE_NAMES,
    TEXT_EMB_DIR,
    list_names,
    output_filesystem,
    read_markers,
)
from pipeline.redact import redact
from pipeline.rejected import Filters, rejected_table, split_rejected
from pipeline.shards import (
    IMAGE_EXTENSIONS,
    ShardRows,
    check_keys,
    encode_image,
    error_mask,
    errors_table,
    iter_shards,
    l2_normalised,
    metadata_table,
    require_columns,
    require_no_clash,
    shard_id,
    write_image_parquet,
    write_npy,
    write_parquet,
    write_webdataset,
)

__all__ = [
    "KarloDatasink",
    "SinkResult",
    "check_writable",
    "encode_image",
    "open_atomic",
    "remove_uncommitted",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

# output_format -> (extension, writer) of the images/ files.
_IMAGE_WRITERS = {"webdataset": ("tar", write_webdataset), "parquet": ("parquet", write_image_parquet)}
# Temporary local names start with a dot and end in random hex, so no '*.parquet' / '*.npy' / '*.tar' glob
# of a downstream reader (embedding-reader, datasets, pyarrow) ever picks one up.
TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[BinaryIO]:
    """Open ``path`` for writing so that it appears complete on clean exit and not at all on an exception."""
    if isinstance(fs, LocalFileSystem):
        with _open_local_atomic(path) as f:
            yield f
        return
    # A plain ``with fs.open(...)`` would complete the upload even when the body raised, leaving a truncated
    # object; with autocommit off, the upload only becomes an object on commit().
    f = fs.open(path, "wb", autocommit=False)
    try:
        yield f
        f.close()
        f.commit()
    except BaseException:
        _discard(f, path)
        raise


def _discard(f: Any, path: str) -> None:
    try:
        f.discard()
    except Exception:  # the original error matters more; an orphaned upload is invisible
        logger.warning("could not abort the upload of %s", path, exc_info=True)
    # A discarded file has no buffer; marking it closed stops __del__ from flushing it.
    f.closed = True


@contextlib.contextmanager
def _open_local_atomic(path: str) -> Iterator[BinaryIO]:
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    # Same folder as the target, so os.replace is a rename within one filesystem, hence atomic.
    temp = os.path.join(parent, f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
    try:
        with open(temp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the rename must not become durable before the data
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> int:
    """Write ``obj`` as JSON (sorted keys, so equal objects give equal bytes); returns the byte count."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
    with open_atomic(fs, path) as f:
        f.write(data)
    return len(data)


def check_writable(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Write and delete a small object under ``root``, so that a folder or bucket we may not write to fails the
    run before any work, with the storage's own error (PermissionError, ...). Its temporary name is one that
    :func:`remove_uncommitted` cleans up, should the process die in between."""
    probe = f"{root}/{TEMP_PREFIX}write-check-{uuid.uuid4().hex[:12]}"
    write_json_atomic(fs, probe, {})
    fs.rm(probe)


@dataclasses.dataclass(frozen=True)
class SinkResult:
    """What one ``write_datasink`` call committed."""

    rows: int  # good rows written (images, embeddings, metadata)
    errors: int  # error rows written to errors/
    shards: int
    bytes: int  # data files only, markers excluded
    rejected: int = 0  # rows filtered out by a score or the safety checker, written to rejected/

    @classmethod
    def from_markers(cls, markers: Iterable[dict[str, Any]]) -> SinkResult:
        markers = list(markers)
        return cls(
            rows=sum(m["rows"] for m in markers),
            errors=sum(m["errors"] for m in markers),
            shards=len(markers),
            bytes=sum(m["bytes"] for m in markers),
            rejected=sum(m.get("rejected", 0) for m in markers),
        )


class KarloDatasink(Datasink[list[dict[str, Any]]]):
    """Ray Data sink writing each write task's rows as shards of at most ``rows_per_shard`` rows.

    ``settings`` are the run's constant generation settings (steps, model name, ...), stored as one
    constant column each in metadata and per-sample JSON. ``write`` returns the shard markers; the driver
    gets their totals in ``self.result`` after ``on_write_complete``.
    """

    def __init__(
        self,
        output_url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        image_format: str = "png",
        output_format: str = "webdataset",
        rows_per_shard: int = 1000,
        settings: dict[str, Any] | None = None,
        min_clip_score: float | None = None,
        min_aesthetic: float | None = None,
        drop_unsafe: bool = False,
    ):
        if image_format not in IMAGE_EXTENSIONS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_EXTENSIONS)}, got {image_format!r}")
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}")
        if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int) or rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be a positive int, got {rows_per_shard!r}")
        settings = dict(settings or {})
        _check_settings(settings)
        self.output_url = output_url
        # Only plain data is kept: the sink is pickled to every write task, which opens its own filesystem.
        self.storage_options = dict(storage_options or {})
        self.image_format = image_format
        self.output_format = output_format
        self.rows_per_shard = rows_per_shard
        self.settings = settings
        # Good rows scoring below a minimum, or flagged unsafe with drop_unsafe, go to rejected/.
        self.filters = Filters(min_clip_score, min_aesthetic, drop_unsafe)
        self.result: SinkResult | None = None

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        """Fail on the driver, before any task writes, if the rows cannot be written."""
        if schema is None:
            return
        require_columns(schema.names)
        require_no_clash(self.settings, schema.names)

    def write(self, blocks: Iterable[Block], ctx: Any) -> list[dict[str, Any]]:
        fs, root = output_filesystem(self.output_url, self.storage_options)
        return [self.write_shard(fs, root, rows) for rows in iter_shards(blocks, self.rows_per_shard)]

    def on_write_complete(self, write_result: WriteResult[list[dict[str, Any]]]) -> None:
        self.result = SinkResult.from_markers(m for markers in write_result.write_returns for m in markers)

    def write_shard(self, fs: fsspec.AbstractFileSystem, root: str, rows: ShardRows) -> dict[str, Any]:
        """Write one shard's files, then its marker; returns the marker."""
        keys = check_keys(rows.table)
        shard = shard_id(keys)
        # Rows in key order: which rows reach a shard together decides its id, their arrival order must not change
        # its bytes (a resumed or retried shard rewrites the same bytes).
        rows = rows.take(np.argsort(np.array(keys, dtype=object), kind="stable"))
        failed = error_mask(rows.table)
        good, bad = rows.filter(~failed), rows.filter(failed)
        good, rejected = split_rejected(good, self.filters)
        written: dict[str, int] = {}  # path relative to root -> bytes

        def put(relpath: str, writer: Callable[..., None], *args: Any) -> None:
            with open_atomic(fs, f"{root}/{relpath}") as f:
                writer(f, *args)
                written[relpath] = f.tell()

        # An all-error shard writes no empty image/embedding files; it is simply absent from those folders,
        # which keeps the npy and metadata lists zipped one-to-one.
        if good.num_rows:
            metadata = metadata_table(good, self.settings)
            ext, write_images = _IMAGE_WRITERS[self.output_format]
            put(f"{IMAGES_DIR}/{shard}.{ext}", write_images, metadata, good.tensor(C.IMAGE), self.image_format)
            # Unit rows, as clip-retrieval writes these folders and autofaiss's inner-product indexes expect;
            # the decoder's own input stays in raw_img_emb/, for decoding again.
            put(f"{IMG_EMB_DIR}/img_emb_{shard}.npy", write_npy, l2_normalised(good.tensor(C.IMAGE_EMB)))
            put(f"{TEXT_EMB_DIR}/text_emb_{shard}.npy", write_npy, l2_normalised(good.tensor(C.TEXT_EMB)))
            put(f"{RAW_IMG_EMB_DIR}/raw_img_emb_{shard}.npy", write_npy, good.tensor(C.IMAGE_EMB))
            put(f"{METADATA_DIR}/metadata_{shard}.parquet", write_parquet, metadata)
            if C.CLIP_IMAGE_EMB in good.tensors:
                put(f"{CLIP_EMB_DIR}/clip_img_emb_{shard}.npy", write_npy, good.tensor(C.CLIP_IMAGE_EMB))
        if bad.num_rows:
            put(f"{ERRORS_DIR}/errors_{shard}.parquet", write_parquet, errors_table(bad))
        if rejected.num_rows:
            put(f"{REJECTED_DIR}/rejected_{shard}.parquet", write_parquet,
                rejected_table(rejected, self.settings, self.image_format))
        marker = {
            "shard": shard,
            "rows": good.num_rows,
            "errors": bad.num_rows,
            "rejected": rejected.num_rows,
            "files": list(written),
            "bytes": sum(written.values()),
        }
        places = input_rows(rows.table)  # the input rows it holds, for resume (pipeline.coverage)
        write_json_atomic(fs, f"{root}/{COMMITS_DIR}/{shard}.json",
                          marker if places is None else {**marker, INPUT_ROWS: places})
        logger.debug("committed shard %s: %d rows, %d errors", shard, good.num_rows, bad.num_rows)
        return marker


def _check_settings(settings: dict[str, Any]) -> None:
    reserved = set(C.INPUT_COLUMNS) | set(C.RESERVED) | {C.ERROR_STAGE}
    for name, value in settings.items():
        if not isinstance(name, str) or not name or C.is_internal(name) or name in reserved:
            raise ValueError(f"setting name {name!r} is empty, internal or a column the pipeline writes")
        try:
            pa.scalar(value)
            json.dumps(value)
        except (TypeError, ValueError, pa.ArrowException) as e:
            raise TypeError(f"setting {name!r} must be a JSON-compatible scalar or list, got {value!r}") from e


def remove_uncommitted(output_url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Delete shard files without a commit marker and leftover temporary files; returns their relative paths.

    Call it only while nothing writes to ``output_url`` (before a run starts): a shard being written has
    no marker yet. Files whose names this sink never writes are left alone.
    """
    fs, root = output_filesystem(output_url, storage_options)
    committed = {marker["shard"] for marker in read_markers(fs, root)}
    doomed = []
    for folder, pattern in SHARD_FILE_NAMES.items():
        for name in list_names(fs, f"{root}/{folder}"):
            match = pattern.fullmatch(name)
            if name.startswith(TEMP_PREFIX) or (match and match.group(1) not in committed):
                doomed.append(f"{folder}/{name}")
    # Beside the folders: a manifest or write check left half-written by a process killed while writing it.
    doomed += [name for name in list_names(fs, root) if name.startswith(TEMP_PREFIX)]
    if doomed:
        fs.rm([f"{root}/{rel}" for rel in doomed])
        logger.info("removed %d uncommitted files under %s", len(doomed), redact(output_url))
    aborted = _abort_uploads(fs, root)
    if aborted:
        logger.info("aborted %d unfinished uploads under %s", aborted, redact(output_url))
    return sorted(doomed)


def _abort_uploads(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """S3: abort the multipart uploads a killed writer left under ``root``. They never become objects, but the
    store keeps (and bills) their parts until they are aborted."""
    if not hasattr(fs, "list_multipart_uploads"):
        return 0
    bucket, _, prefix = root.partition("/")
    uploads = [u for u in fs.list_multipart_uploads(bucket) if u["Key"].startswith(f"{prefix}/")]
    for u in uploads:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    return len(uploads)
