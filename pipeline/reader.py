"""Plan and read prompt tables: Parquet files at any fsspec URL, cut into small read tasks.

We do not use ``ray.data.read_parquet``: it cannot report a row's index within its file (which default keys are
derived from), it packs small files into one block so the first model stage gets no parallelism, and its
ListFiles step reserves a whole CPU whatever ``num_cpus`` says (Ray 2.60), so the run hangs when the actor pools
leave less than one CPU free. Instead the driver reads only the Parquet footers to plan (:func:`plan_inputs`),
and :class:`PromptTableDatasource` gives Ray one cheap task per slice of ``rows_per_task`` consecutive rows of
one file. Prompt tables are tiny in bytes but each row costs seconds of GPU time, so slicing
by rows, not bytes, is what spreads them over the actor pools.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import posixpath
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.block import BlockMetadata
from ray.data.context import DataContext
from ray.data.datasource import Datasource, ReadTask

from pipeline import columns as C
from pipeline.coverage import Coverage
from pipeline.redact import display_url, storage_error

if TYPE_CHECKING:
    from pipeline.repeats import DuplicateIndex

_MAGIC = b"PAR1"
# One ranged GET usually covers a prompt table's whole footer; a longer footer costs a second GET.
_TAIL_BYTES = 64 * 1024
_GLOB_CHARS = "*?["
# pandas writes a non-default index as these columns; they are an artefact of to_parquet(), not user data.
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")
_FOOTER_THREADS = 32
# Error messages name at most this many files.
_SHOWN_FILES = 5
# Ray Data keeps every read task on the driver, about 2 KB each: 10^8 rows in blocks of 64 would be 1.6M tasks and
# 3 GB. Past this many blocks, a task reads several consecutive blocks and yields them one at a time.
MAX_READ_TASKS = 4096
_READ_BUFFER = 1 << 20  # bytes per buffered read of a column chunk
_DECODE_ROWS, _DECODE_BYTES = 8192, 16 << 20  # rows decoded at once: at most this many, and about this many bytes


class InputError(ValueError):
    """The input cannot be used as a prompt table; the message tells the user why."""


@dataclass(frozen=True)
class InputFile:
    """One readable Parquet file of the input, as its footer describes it."""

    url: str  # full fsspec URL, reopened by the read tasks
    source: str  # path relative to the input root ("/"-separated); the file name for a single-file input
    num_rows: int
    row_group_rows: tuple[int, ...]
    size_bytes: int  # uncompressed size of its row groups: the in-memory estimate


@dataclass(frozen=True)
class InputPlan:
    """What to read: small and picklable, so each read task can reopen its file on any node."""

    url: str  # the input as given, less any user:password@ part
    files: tuple[InputFile, ...]
    schema: pa.Schema  # union of the files' columns; a file's missing columns read as nulls
    bad_files: tuple[tuple[str, str], ...]  # (source, reason) for files that are not readable Parquet
    rows_per_task: int
    # Credentials may live here: keep them out of reprs, and so out of logs.
    storage_options: dict = field(default_factory=dict, repr=False)

    @property
    def total_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


def plan_inputs(
    url: str,
    storage_options: dict | None = None,
    rows_per_task: int = 256,
    check_columns: Callable[[pa.Schema, str, str], None] | None = None,
    exclude: str | None = None,
) -> InputPlan:
    """List the Parquet files at ``url`` (a file, a folder searched recursively, or a glob) and read their footers.

    ``check_columns(schema, source, shown_url)`` raises InputError for a file whose columns cannot be used; the
    default is the prompt-table rules (image variations bring their own). Files under ``exclude`` (the run's
    OUTPUT, when it lies inside a folder INPUT) are not input: its metadata tables would be read as prompts."""
    check_columns = check_columns or _check_columns
    if rows_per_task < 1:
        raise ValueError(f"rows_per_task must be >= 1, got {rows_per_task}")
    storage_options = dict(storage_options or {})
    shown = display_url(url)
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    try:
        root, sizes = _list_files(fs, path, shown, _excluded_prefix(fs, exclude, storage_options))
        paths = sorted(sizes)
        with ThreadPoolExecutor(min(_FOOTER_THREADS, len(paths))) as pool:
            footers = list(pool.map(lambda p: _read_footer(fs, p, sizes[p]), paths))
    except OSError as e:  # PermissionError for wrong credentials; storage errors that outlasted its retries
        raise InputError(f"cannot read the input {shown}: {storage_error(e, storage_options)}") from None

    files, schemas, bad = [], [], []
    for p, footer in zip(paths, footers):
        source = posixpath.basename(p) if root is None else p[len(root) :].lstrip("/")
        if isinstance(footer, str):
            bad.append((source, footer))
            continue
        schema = pa.schema([f for f in footer.schema_arrow if not _PANDAS_INDEX.fullmatch(f.name)])
        repeated = [(name, n) for name, n in Counter(schema.names).items() if n > 1]
        if repeated:  # Arrow writes such files, but no column of them can be selected by name
            bad.append((source, "; ".join(f"column {name!r} appears {n} times" for name, n in repeated)
                        + " (column names must be unique)"))
            continue
        check_columns(schema, source, shown)
        meta = footer.metadata
        groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
        files.append(
            InputFile(
                url=fs.unstrip_protocol(p),
                source=source,
                num_rows=meta.num_rows,
                row_group_rows=tuple(g.num_rows for g in groups),
                size_bytes=sum(g.total_byte_size for g in groups),
            )
        )
        schemas.append((source, schema))
    if not files:
        reasons = "; ".join(f"{s}: {r}" for s, r in bad[:_SHOWN_FILES])
        raise InputError(f"none of the {len(bad)} Parquet files at {shown} could be read: {reasons}")
    return InputPlan(
        url=shown,
        files=tuple(files),
        schema=_unify_schemas(schemas, shown),
        bad_files=tuple(bad),
        rows_per_task=rows_per_task,
        storage_options=storage_options,
    )


def first_rows(plan: InputPlan, limit: int) -> InputPlan:
    """The plan cut to its first ``limit`` rows in plan order (files sorted by path, rows in file order), for
    ``--limit``: the same rows under the same keys as in the whole plan, since keys come from a row's file and
    index (or its id, first holder first), so a later run over more rows resumes this one."""
    files, left = [], limit
    for f in plan.files:
        if left == 0:
            break
        take = min(f.num_rows, left)
        # size_bytes is the read tasks' memory estimate: the file's share for the rows taken.
        size = f.size_bytes * take // f.num_rows if f.num_rows else 0
        files.append(dataclasses.replace(f, num_rows=take, size_bytes=size))
        left -= take
    return dataclasses.replace(plan, files=tuple(files))


@dataclass(frozen=True)
class ReadRange:
    """Rows [start, stop) of one planned file, the file's row 0 being row ``offset`` of the plan."""

    file: InputFile
    offset: int
    start: int
    stop: int
    done: Coverage | None = None  # with several images per row: those of these rows already committed


class PromptTableDatasource(Datasource):
    """Reads an :class:`InputPlan` in blocks of ``rows_per_task`` rows, adding ``source`` and ``source_row`` to every
    row. ``skip``: the rows committed by earlier attempts (resume), of which only the rows with an image still to
    make are read; ``duplicates``: where the input repeats a key, handed to prepare per row."""

    def __init__(self, plan: InputPlan, skip: Coverage | None = None, images_per_prompt: int = 1,
                 duplicates: DuplicateIndex | None = None):
        super().__init__()
        self._plan, self._skip, self._images = plan, skip, images_per_prompt
        self._duplicates = duplicates

    def estimate_inmemory_data_size(self) -> int:
        return sum(_slice_bytes(f, f.num_rows) for f in self._plan.files)

    def ranges(self) -> list[ReadRange]:
        """The rows to read, in plan order: every planned row, less those whose every image is committed."""
        out, offset = [], 0
        for f in self._plan.files:
            if self._skip is None:
                out.append(ReadRange(f, offset, 0, f.num_rows))
            else:
                starts, stops = self._skip.missing(f.source, f.num_rows, self._images)
                for start, stop in zip(starts.tolist(), stops.tolist()):
                    done = (self._skip.restricted(f.source, (np.array([start]), np.array([stop])), self._images)
                            if self._images > 1 else None)
                    out.append(ReadRange(f, offset, start, stop, done))
            offset += f.num_rows
        return [r for r in out if r.stop > r.start]

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: DataContext | None = None,
    ) -> list[ReadTask]:
        # ``parallelism`` is ignored on purpose: blocks follow rows_per_task, so that they are as small as the plan
        # asks whatever size Ray guesses from the (tiny) byte count. Up to MAX_READ_TASKS blocks, each is a task;
        # past it, a task reads several consecutive blocks and yields them one at a time.
        step = self._plan.rows_per_task
        ranges = self.ranges()
        blocks = sum(-(-(r.stop - r.start) // step) for r in ranges)
        per_task = max(1, -(-blocks // MAX_READ_TASKS))  # blocks per task
        tasks, current, room = [], [], per_task
        for r in ranges:
            start = r.start
            while start < r.stop:
                stop = min(r.stop, start + room * step)
                current.append(dataclasses.replace(r, start=start, stop=stop))
                room -= -(-(stop - start) // step)
                start = stop
                if room == 0:
                    tasks.append(self._task(current, per_task_row_limit))
                    current, room = [], per_task
        if current:
            tasks.append(self._task(current, per_task_row_limit))
        return tasks

    def _task(self, ranges: list[ReadRange], per_task_row_limit: int | None) -> ReadTask:
        rows = sum(r.stop - r.start for r in ranges)
        metadata = BlockMetadata(
            num_rows=rows, size_bytes=sum(_slice_bytes(r.file, r.stop - r.start) for r in ranges), exec_stats=None,
            input_files=list(dict.fromkeys(r.file.url for r in ranges)),
        )
        schema = _read_schema(self._plan.schema, self._duplicates is not None, self._images)
        duplicates = self._duplicates and self._duplicates.restricted(ranges[0].offset + ranges[0].start,
                                                                      ranges[-1].offset + ranges[-1].stop)
        return ReadTask(
            _range_reader(ranges, self._plan, self._images, duplicates),
            metadata,
            schema=schema,
            per_task_row_limit=per_task_row_limit,
        )


def read_prompts(plan: InputPlan, num_cpus: float = 0.25, skip: Coverage | None = None, images_per_prompt: int = 1,
                 duplicates: DuplicateIndex | None = None) -> ray.data.Dataset:
    """The plan as a Dataset (:class:`PromptTableDatasource`). Each read task takes a fraction of a CPU to fit beside
    actor pools that hold the rest."""
    source = PromptTableDatasource(plan, skip, images_per_prompt, duplicates)
    return ray.data.read_datasource(source, num_cpus=num_cpus)


@contextlib.contextmanager
def open_input(f: InputFile, storage_options: dict) -> Iterator[pq.ParquetFile]:
    """The planned file open for reading, checked unchanged since it was planned. The Parquet reader raises OSError
    for damaged pages as for storage failures: within the block, damaged content raises :class:`DamagedFile`, a
    storage failure its own error."""
    fs, path = fsspec.core.url_to_fs(f.url, **storage_options)
    with fs.open(path, "rb") as raw:
        fh = _WatchedFile(raw)
        try:
            # Buffered column reads: a row group of a million prompts is not loaded whole to read 64 of them.
            pf = pq.ParquetFile(fh, buffer_size=_READ_BUFFER)
            _check_unchanged(f, pf.metadata)
            yield pf
        except (pa.ArrowException, OSError) as e:
            raise DamagedFile(fh.content_error(e)) from e


def iter_rows(pf: pq.ParquetFile, f: InputFile, start: int, stop: int, columns: list[str],
              batch_rows: int) -> Iterator[pa.Table]:
    """Rows [start, stop) of an open file, ``columns`` only, in tables of ``batch_rows`` rows (the last fewer),
    decoded a few MB at a time from the row groups that hold them (rows before ``start`` are decoded and dropped:
    Parquet has no row-level seek)."""
    offsets = list(itertools.accumulate(f.row_group_rows, initial=0))
    groups = [i for i in range(len(f.row_group_rows)) if offsets[i] < stop and offsets[i + 1] > start]
    if not groups:
        return
    row_bytes = max(1, f.size_bytes // max(1, f.num_rows))
    decode_rows = max(batch_rows, min(_DECODE_ROWS, _DECODE_BYTES // row_bytes))
    pos, pending = offsets[groups[0]], None  # pos: the file row of the next batch's first row
    for batch in pf.iter_batches(batch_size=decode_rows, row_groups=groups, columns=columns, use_threads=False):
        lo, hi = max(start, pos), min(stop, pos + batch.num_rows)
        if hi > lo:
            piece = pa.Table.from_batches([batch.slice(lo - pos, hi - lo)])
            pending = piece if pending is None else pa.concat_tables([pending, piece])
            while pending.num_rows >= batch_rows:
                yield pending.slice(0, batch_rows)
                pending = pending.slice(batch_rows)
        pos += batch.num_rows
        if pos >= stop:
            break
    if pending is not None and pending.num_rows:
        yield pending


class DamagedFile(Exception):
    """A planned file's data pages cannot be decoded (its footer could); the message is the reason."""


def _range_reader(ranges: list[ReadRange], plan: InputPlan, images_per_prompt: int,
                  duplicates: DuplicateIndex | None) -> Callable[[], Iterator[pa.Table]]:
    """The read function of one task. It closes over its own rows, not the whole plan, so it pickles small."""
    schema, step, storage_options = plan.schema, plan.rows_per_task, plan.storage_options

    def read() -> Iterator[pa.Table]:
        for r in ranges:
            repeats = None if duplicates is None else duplicates.lookup(r.offset + r.start, r.offset + r.stop)
            for start, n, table, reason in _read_range(r, schema, storage_options, step):
                block = _block(r.file, start, n, table, schema, reason)
                if repeats is not None:
                    block = _with_first_holders(block, r.offset + start, repeats)
                if images_per_prompt > 1:
                    rows = block.column(C.SOURCE_ROW).to_numpy()
                    done = r.done.done(r.file.source, rows, images_per_prompt) if r.done else [[]] * len(rows)
                    block = block.append_column(C.DONE_SAMPLES, pa.array(done, pa.list_(pa.int32())))
                yield block

    return read


def _read_range(r: ReadRange, schema: pa.Schema, storage_options: dict,
                step: int) -> Iterator[tuple[int, int, pa.Table | None, str | None]]:
    """(first row, rows, their table of the schema's columns the file has, None) per block of ``r``; from a block
    whose data pages cannot be decoded on, (first row, rows, None, the reason) per block: the plan counted those
    rows, so each becomes an error row (prepare) instead of failing the run, and every rerun, on the same pages."""
    done = r.start
    try:
        with open_input(r.file, storage_options) as pf:
            wanted = [name for name in pf.schema_arrow.names if name in schema.names]
            for table in iter_rows(pf, r.file, r.start, r.stop, wanted, step):
                yield done, table.num_rows, table, None
                done += table.num_rows
    except DamagedFile as e:
        for start in range(done, r.stop, step):
            yield start, min(step, r.stop - start), None, str(e)


def _block(f: InputFile, start: int, n: int, table: pa.Table | None, schema: pa.Schema,
           reason: str | None) -> pa.Table:
    """A read block of rows [start, start + n): the schema's columns (nulls where the file lacks one, and all of
    them for rows not decoded), then source, source_row and the read error."""
    if table is None:
        columns = [pa.nulls(n, c.type) for c in schema]
    else:
        columns = [table.column(c.name).cast(c.type) if c.name in table.column_names else pa.nulls(n, c.type)
                   for c in schema]
    arrays = [*columns, pa.array([f.source] * n, pa.string()), pa.array(np.arange(start, start + n, dtype=np.int64)),
              pa.array([reason] * n, pa.string())]
    return pa.Table.from_arrays(arrays, schema=_read_schema(schema))


def _with_first_holders(block: pa.Table, position: int, repeats: tuple[np.ndarray, list[str], np.ndarray]) -> pa.Table:
    """``block`` (its first row at plan ``position``) with the source and row of each repeat's first holder."""
    positions, sources, rows = repeats
    n = block.num_rows
    i, j = np.searchsorted(positions, [position, position + n])
    first_source: list[str | None] = [None] * n
    first_row: list[int | None] = [None] * n
    for k in range(i, j):
        first_source[positions[k] - position], first_row[positions[k] - position] = sources[k], int(rows[k])
    return (block.append_column(C.FIRST_HOLDER_SOURCE, pa.array(first_source, pa.string()))
            .append_column(C.FIRST_HOLDER_ROW, pa.array(first_row, pa.int64())))


def _excluded_prefix(fs: fsspec.AbstractFileSystem, exclude: str | None, storage_options: dict) -> str | None:
    """``exclude`` as a path prefix of ``fs`` ("/"-terminated), None if it is on another filesystem."""
    if exclude is None:
        return None
    other, path = fsspec.core.url_to_fs(exclude, **storage_options)
    return path.rstrip("/") + "/" if other.protocol == fs.protocol else None


def _list_files(fs: fsspec.AbstractFileSystem, path: str, shown: str,
                exclude: str | None = None) -> tuple[str | None, dict[str, int]]:
    """(root that sources are relative to, or None for a single file; {path: size}) of the files to plan, none of
    them under the ``exclude`` prefix."""
    if any(c in path for c in _GLOB_CHARS):
        parts = path.split("/")
        first_wild = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
        root = "/".join(parts[:first_wild])
        found = fs.glob(path, detail=True)
    elif not fs.exists(path):
        raise InputError(f"input does not exist: {shown}")
    elif fs.isdir(path):
        root = path
        found = {p: i for p, i in fs.find(path, detail=True).items() if p.endswith(".parquet")}
    else:
        return None, {path: fs.info(path)["size"]}
    # Like Arrow's dataset discovery, skip names starting with "." or "_" below the root: Spark's _SUCCESS and
    # _temporary/, checksum files, editors' dot files.
    sizes = {
        p: info["size"]
        for p, info in found.items()
        if info["type"] == "file" and not any(part[:1] in "._" for part in p[len(root) :].split("/") if part)
        and not (exclude and p.startswith(exclude))
    }
    if not sizes:
        raise InputError(f"no Parquet files found at {shown}")
    return root, sizes


def _read_footer(fs: fsspec.AbstractFileSystem, path: str, size: int) -> pq.ParquetFile | str:
    """The file's footer, or the reason it is not readable Parquet.

    Storage errors propagate (a flaky bucket must fail the plan, not silently drop a file); only the parse runs
    on bytes already in memory, so every error it raises is about the file's content.
    """
    if size < 2 * len(_MAGIC) + 4:
        return f"not a Parquet file ({size} bytes)"
    tail = fs.cat_file(path, start=max(0, size - _TAIL_BYTES), end=size)
    if tail[-4:] != _MAGIC:
        return "not a Parquet file (no PAR1 marker at its end)"
    footer_len = int.from_bytes(tail[-8:-4], "little")
    if footer_len + 8 > size - len(_MAGIC):
        return f"corrupt Parquet footer (its length {footer_len} exceeds the file's {size} bytes)"
    if footer_len + 8 > len(tail):
        tail = fs.cat_file(path, start=size - 8 - footer_len, end=size)
    try:
        # The footer alone, behind a leading magic, parses as a file: schema and row counts, no data pages.
        return pq.ParquetFile(pa.BufferReader(_MAGIC + tail[-(footer_len + 8) :]))
    except (pa.ArrowException, OSError) as e:
        return f"corrupt Parquet footer: {e}"


def _check_columns(schema: pa.Schema, source: str, shown: str) -> None:
    if C.PROMPT not in schema.names:
        have = ", ".join(schema.names) or "(none)"
        raise InputError(f"{shown}: file {source!r} has no {C.PROMPT!r} column; its columns are: {have}")
    for name in schema.names:
        if name in C.RESERVED or C.is_internal(name):
            raise InputError(
                f"{shown}: file {source!r} has a column named {name!r}, which is reserved: the pipeline writes "
                f"{', '.join(C.RESERVED)} and every column starting with '__'. Rename it."
            )


def _unify_schemas(schemas: list[tuple[str, pa.Schema]], shown: str) -> pa.Schema:
    """Union of the files' columns, in order of first appearance; a column's types must agree across files."""
    seen: dict[str, dict[pa.DataType, list[str]]] = {}
    for source, schema in schemas:
        for f in schema:
            seen.setdefault(f.name, {}).setdefault(f.type, []).append(source)
    return pa.schema([pa.field(name, _unify_type(name, by_type, shown)) for name, by_type in seen.items()])


def _unify_type(name: str, by_type: dict[pa.DataType, list[str]], shown: str) -> pa.DataType:
    types = [t for t in by_type if not pa.types.is_null(t)]  # an all-null column takes any type
    if not types:
        return pa.null()
    if len(types) == 1:
        return types[0]
    # Within a family (int32 + int64, string + large_string) Arrow widens to a common type; across families a
    # cast would change the values (int + float would turn seeds into floats), so it is an error.
    families = {_family(t) for t in types}
    listed = ", ".join(f"{t} in {', '.join(repr(s) for s in by_type[t][:_SHOWN_FILES])}" for t in types)
    if len(families) == 1 and None not in families:
        fields = [pa.schema([pa.field(name, t)]) for t in types]
        unified = pa.unify_schemas(fields, promote_options="permissive").field(name).type
        # Arrow unifies int64 and uint64 as int64, and the read would then fail on the first seed >= 2**63.
        if all(_holds(unified, t) for t in types):
            return unified
        raise InputError(f"{shown}: column {name!r} has integer types across files that no one type holds: "
                         f"{listed}; write it with one type in every file")
    raise InputError(f"{shown}: column {name!r} has incompatible types across files: {listed}")


def _holds(unified: pa.DataType, t: pa.DataType) -> bool:
    """Whether every value of type ``t`` is a value of ``unified`` (only integers can fail within a family)."""
    if not pa.types.is_integer(t):
        return True
    if pa.types.is_signed_integer(t):
        return pa.types.is_signed_integer(unified) and unified.bit_width >= t.bit_width
    if pa.types.is_unsigned_integer(unified):
        return unified.bit_width >= t.bit_width
    return unified.bit_width > t.bit_width


def _family(t: pa.DataType) -> str | None:
    for family, test in (
        ("integer", pa.types.is_integer),
        ("floating", pa.types.is_floating),
        ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
        ("binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
    ):
        if test(t):
            return family
    return None  # other types (nested, temporal, ...) must match exactly


def _read_schema(schema: pa.Schema, first_holders: bool = False, images_per_prompt: int = 1) -> pa.Schema:
    """The columns of a read block: the input's, where each row was read and its read error, then the marks that
    :func:`_range_reader` adds for prepare."""
    schema = (schema.append(pa.field(C.SOURCE, pa.string())).append(pa.field(C.SOURCE_ROW, pa.int64()))
              .append(pa.field(C.READ_ERROR, pa.string())))
    if first_holders:
        schema = (schema.append(pa.field(C.FIRST_HOLDER_SOURCE, pa.string()))
                  .append(pa.field(C.FIRST_HOLDER_ROW, pa.int64())))
    if images_per_prompt > 1:
        schema = schema.append(pa.field(C.DONE_SAMPLES, pa.list_(pa.int32())))
    return schema


class _WatchedFile:
    """An open file that remembers its read errors. The Parquet reader raises OSError for damaged pages as well
    as for storage failures; only a failure that no read of ours raised is about the file's content."""

    def __init__(self, f):
        self._f = f
        self.storage_error: BaseException | None = None

    def read(self, *args):
        try:
            return self._f.read(*args)
        except BaseException as e:
            self.storage_error = e
            raise

    def __getattr__(self, name):  # seek, tell, closed, ...: as the file has them
        return getattr(self._f, name)

    def content_error(self, e: Exception) -> str:
        """The reason the Parquet reader failed on the file's content; ``e`` again if a read of ours failed."""
        if self.storage_error is not None:
            raise e
        return f"damaged Parquet data: {type(e).__name__}: {e}".replace("\n", " ")[:1000]


class InputChangedError(RuntimeError):
    """An input file was rewritten after the run planned it: its rows are not the ones planned. The run fails
    (exit 1) instead of reading other rows under the planned rows' keys; its rerun plans the file again."""


def _check_unchanged(f: InputFile, meta: pq.FileMetaData) -> None:
    now = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    if now != f.row_group_rows:
        raise InputChangedError(
            f"input file {f.source!r} changed after the run was planned ({sum(f.row_group_rows)} rows in "
            f"{len(f.row_group_rows)} row groups then, {meta.num_rows} in {len(now)} now)"
        )


def _slice_bytes(f: InputFile, rows: int) -> int:
    # The file's share for these rows, plus the source columns the read adds (8-byte offset + name per row; the
    # read error is null for rows read).
    per_row = (f.size_bytes / f.num_rows if f.num_rows else 0) + 8 + 8 + len(f.source)
    return int(per_row * rows)
