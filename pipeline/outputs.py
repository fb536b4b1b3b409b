"""The one reader of a committed run: its folders, commit markers, manifest and the tables the markers list.

Layout under the output URL, per shard id X (16 hex chars, the same X in every folder so names sort alike):

    images/X.tar | images/X.parquet      webdataset tar, or Parquet with a Hugging Face Image column
    img_emb/img_emb_X.npy                (N, D) float16 L2-normalised CLIP image embeddings, row-aligned with
                                         metadata_X.parquet (clip-retrieval's img_emb/)
    text_emb/text_emb_X.npy              (N, D) float16 L2-normalised CLIP text embeddings, row-aligned alike
    raw_img_emb/raw_img_emb_X.npy        (N, D) float16, the image embeddings as the decoder took them: the
                                         prior's output (variations: the input image's CLIP embedding)
    metadata/metadata_X.parquet          one row per good row: key, prompt, seed, settings, pass-through
    errors/errors_X.parquet              one row per error row: key, source, prompt, stage, reason
    clip_img_emb/clip_img_emb_X.npy      with CLIP scoring: the score tower's image embeddings
    rejected/rejected_X.parquet          with a score filter: the rows it filtered out, whole, with the reason
    _commits/X.json                      the commit marker, written last: a shard without it does not exist
    manifest.json                        settings, model identity, counts (pipeline.manifest)
    _SUCCESS                             written when every input row is committed

A shard exists once its marker does, and holds exactly the files its marker lists: resume
(:func:`read_coverage`), the progress line, ``karlo preview`` and sweep summaries read a run only through
here, so files of a shard whose writer died before its marker are never counted. No Ray import: the CLI's
light commands use this module too.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import columns as C
from pipeline.coverage import INPUT_ROWS, Coverage, input_rows
from pipeline.schema import READ

IMAGES_DIR, IMG_EMB_DIR, TEXT_EMB_DIR, RAW_IMG_EMB_DIR = "images", "img_emb", "text_emb", "raw_img_emb"
METADATA_DIR, ERRORS_DIR, COMMITS_DIR = "metadata", "errors", "_commits"
# With CLIP scoring (pipeline.scoring): the score tower's image embeddings, and rows below --min-clip-score.
CLIP_EMB_DIR, REJECTED_DIR = "clip_img_emb", "rejected"
RUN_FOLDERS = (IMAGES_DIR, IMG_EMB_DIR, TEXT_EMB_DIR, RAW_IMG_EMB_DIR, METADATA_DIR, ERRORS_DIR, CLIP_EMB_DIR,
               REJECTED_DIR, COMMITS_DIR)
MANIFEST = "manifest.json"
_MARKERS_PER_READ = 2000  # markers fetched and parsed at once
_PLACE_COLUMNS = (C.SOURCE, C.SOURCE_ROW, C.SAMPLE_INDEX)
SUCCESS = "_SUCCESS"

_ID = r"([0-9a-f]{16})"
# Folder -> the name of a shard's file in it, with the shard id as group 1.
SHARD_FILE_NAMES = {
    COMMITS_DIR: re.compile(_ID + r"\.json"),
    IMAGES_DIR: re.compile(_ID + r"\.(?:tar|parquet)"),
    IMG_EMB_DIR: re.compile(r"img_emb_" + _ID + r"\.npy"),
    TEXT_EMB_DIR: re.compile(r"text_emb_" + _ID + r"\.npy"),
    RAW_IMG_EMB_DIR: re.compile(r"raw_img_emb_" + _ID + r"\.npy"),
    METADATA_DIR: re.compile(r"metadata_" + _ID + r"\.parquet"),
    ERRORS_DIR: re.compile(r"errors_" + _ID + r"\.parquet"),
    CLIP_EMB_DIR: re.compile(r"clip_img_emb_" + _ID + r"\.npy"),
    REJECTED_DIR: re.compile(r"rejected_" + _ID + r"\.parquet"),
}


def output_filesystem(
    output_url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and root path (no trailing slash) for an output URL."""
    fs, root = fsspec.core.url_to_fs(output_url, **(storage_options or {}))
    return fs, root.rstrip("/")


def list_names(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """Names in ``folder`` as they are now (empty when it does not exist)."""
    # Listings are cached per filesystem instance; other processes (the write tasks) changed the folder.
    fs.invalidate_cache(folder)
    try:
        paths = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return [path.rstrip("/").rsplit("/", 1)[-1] for path in paths]


def marker_names(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Names of the commit markers in ``root/_commits`` as they are now (not cached)."""
    is_marker = SHARD_FILE_NAMES[COMMITS_DIR].fullmatch
    return [name for name in list_names(fs, f"{root}/{COMMITS_DIR}") if is_marker(name)]


def iter_markers(fs: fsspec.AbstractFileSystem, root: str, names: Iterable[str]) -> Iterator[list[dict[str, Any]]]:
    """The commit markers ``names``, whole, ``_MARKERS_PER_READ`` at a time: a run's markers grow with its shards,
    and a run of 10^8 rows has 10^5 of them."""
    names = list(names)
    for i in range(0, len(names), _MARKERS_PER_READ):
        paths = [f"{root}/{COMMITS_DIR}/{name}" for name in names[i : i + _MARKERS_PER_READ]]
        yield [json.loads(data) for data in fs.cat(paths).values()]


def read_markers(fs: fsspec.AbstractFileSystem, root: str, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The commit markers ``names`` (default: all of them now), sorted by shard id, without the input rows they
    cover (only resume needs those: :func:`read_coverage`)."""
    names = marker_names(fs, root) if names is None else names
    markers = []
    for chunk in iter_markers(fs, root, names):
        for marker in chunk:
            marker.pop(INPUT_ROWS, None)
        markers += chunk
    return sorted(markers, key=lambda marker: marker["shard"])


def read_coverage(fs: fsspec.AbstractFileSystem, root: str) -> Coverage:
    """The input rows the run under ``root`` committed (:mod:`pipeline.coverage`), from its markers alone. Markers
    written before they listed their rows have the rows' places read from their shards' tables."""
    coverage = Coverage()
    for markers in iter_markers(fs, root, marker_names(fs, root)):
        coverage.rows += sum(m["rows"] + m["errors"] + m.get("rejected", 0) for m in markers)
        coverage.add(record for m in markers for record in m.get(INPUT_ROWS) or ())
        older = [m for m in markers if INPUT_ROWS not in m]
        if older:
            tables = (read_columns(fs, f"{root}/{rel}", _PLACE_COLUMNS) for m in older for rel in m["files"]
                      if rel.startswith((f"{METADATA_DIR}/", f"{ERRORS_DIR}/", f"{REJECTED_DIR}/")))
            coverage.add(record for table in tables for record in input_rows(table) or ())
    return coverage


def read_columns(fs: fsspec.AbstractFileSystem, path: str, wanted: Iterable[str] | None = None) -> pa.Table:
    """The ``wanted`` columns a Parquet file has (all when None), reading only those from storage."""
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        return parquet.read(columns=None if wanted is None else [c for c in wanted if c in names])


class CommittedRun:
    """The committed part of the run under ``root``: its markers as they were when this was made, and the files
    they list."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs, self.root = fs, root
        self.markers = read_markers(fs, root)

    @classmethod
    def open(cls, output_url: str, storage_options: dict[str, Any] | None = None) -> CommittedRun:
        return cls(*output_filesystem(output_url, storage_options))

    @property
    def written(self) -> int:
        return sum(m["rows"] for m in self.markers)

    @property
    def errors(self) -> int:
        return sum(m["errors"] for m in self.markers)

    def files(self, folder: str) -> dict[str, str]:
        """Shard id -> path of its committed file in ``folder``, in shard order."""
        return {m["shard"]: f"{self.root}/{rel}" for m in self.markers for rel in m["files"]
                if rel.startswith(f"{folder}/")}

    def table(self, folders: Iterable[str], columns: list[str], filter: Any = None) -> pa.Table | None:
        """``columns`` of the committed Parquet files in ``folders``, one table (None when there are none)."""
        paths = [path for folder in folders for path in self.files(folder).values()]
        if not paths:
            return None
        return pads.dataset(paths, format="parquet", filesystem=self.fs).to_table(columns=columns, filter=filter)

    @property
    def rejected(self) -> int:
        return sum(m.get("rejected", 0) for m in self.markers)

    def keys(self) -> set[str]:
        """Keys of every committed row, good, error or rejected (for checks of small runs: it holds every key)."""
        table = self.table((METADATA_DIR, ERRORS_DIR, REJECTED_DIR), [C.KEY])
        return set() if table is None else set(table.column(C.KEY).to_pylist())

    def damaged_sources(self) -> list[tuple[str, str]]:
        """(source, reason) of every input file with committed error rows whose data could not be decoded."""
        table = self.table((ERRORS_DIR,), [C.SOURCE, C.ERROR], filter=pads.field(C.ERROR_STAGE) == READ)
        if table is None:
            return []
        first: dict[str, str] = {}
        for source, error in zip(table.column(C.SOURCE).to_pylist(), table.column(C.ERROR).to_pylist()):
            first.setdefault(source, error)
        return sorted(first.items())

    def column_mean(self, column: str) -> float | None:
        """Mean of a metadata column over the committed good rows (nulls left out); None when a committed
        metadata file lacks it or no row has a value."""
        total, count = 0.0, 0
        for path in self.files(METADATA_DIR).values():
            table = read_columns(self.fs, path, [column])
            if column not in table.column_names:
                return None
            values = table.column(column).drop_null()
            total += float(pc.sum(values).as_py() or 0.0)
            count += len(values)
        return total / count if count else None


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Any] | None:
    """The run manifest under ``root``, or None when there is none."""
    try:
        return json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    except FileNotFoundError:
        return None


def is_finished(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether the run under ``root`` committed every input row (its ``_SUCCESS`` marker exists)."""
    return fs.exists(f"{root}/{SUCCESS}")


def committed_shards(output_url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The commit markers under ``output_url``, sorted by shard id."""
    return read_markers(*output_filesystem(output_url, storage_options))


def damaged_sources(output_url: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Input files with undecodable data under ``output_url``, named beside the files the plan found unreadable:
    see :meth:`CommittedRun.damaged_sources`."""
    return CommittedRun.open(output_url, storage_options).damaged_sources()
