"""What ``karlo preview`` shows of a run or a sweep, read from committed shards only (pipeline.outputs).

The gallery shows the first ``limit`` rows in input order (source file, row), not in shard order, so the same
rows appear whatever way Ray cut the run into shards; in a sweep, rows are matched across points by key (the
input row's id, or its source file and row, the same in every point that read the same prompts).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import os
import socket
import tarfile
from typing import Any, Callable, Iterable

import fsspec
from PIL import Image, UnidentifiedImageError

from jobs.sweep.spec import SWEEP_FILE
from pipeline import columns as C
from pipeline.outputs import (
    ERRORS_DIR,
    IMAGES_DIR,
    MANIFEST,
    METADATA_DIR,
    REJECTED_DIR,
    CommittedRun,
    output_filesystem,
    read_columns,
    read_manifest,
)
from pipeline.redact import display_url
from pipeline.shards import ERROR_COLUMNS, IMAGE_EXTENSIONS

DEFAULT_LIMIT = 100
THUMB = 256  # px, longest side of a gallery thumbnail: Karlo's own output size, so nothing is lost
THUMB_QUALITY = 90  # JPEG: a 256 px thumbnail of ~20 kB instead of a ~150 kB PNG
READ_THREADS = 8  # concurrent small reads (metadata footers and columns) on object storage
REJECTED_THUMBNAILS = DEFAULT_LIMIT  # rejected rows shown with their image; the rest are listed without

_IMAGE_EXTS = set(IMAGE_EXTENSIONS.values())


class PreviewError(ValueError):
    """OUTPUT is not a run or a sweep, or cannot be read; the message says why."""


@dataclasses.dataclass
class Sample:
    """One good row: its metadata and its thumbnail."""

    key: str
    prompt: str
    seed: int | None
    score: float | None
    metadata: dict[str, Any]
    thumbnail: Image.Image
    source: Image.Image | None = None  # a variation's input image, where its path or URL can be read

    def jpeg_data_uri(self) -> str:
        return jpeg_data_uri(self.thumbnail)


def jpeg_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclasses.dataclass(frozen=True)
class Listed:
    """A row listed without an image: an error row (stage, reason) or a row rejected for its score."""

    key: str
    prompt: str | None
    stage: str
    reason: str
    thumbnail: Image.Image | None = None  # a rejected row's image


@dataclasses.dataclass
class RunView:
    """What the gallery shows of one run."""

    url: str  # for display: credentials removed
    manifest: dict[str, Any]
    written: int
    errors: int
    shards: int
    samples: dict[str, Sample]  # by key, in input order
    error_rows: list[Listed]  # every committed error row, in input order
    rejected: list[Listed]  # every committed rejected row, in input order

    @property
    def settings(self) -> dict[str, Any]:
        return run_settings(self.manifest)

    @property
    def state(self) -> str:
        return run_state(self.manifest)


def run_state(manifest: dict[str, Any]) -> str:
    """The manifest's status, with "running" told apart from an attempt whose driver died: the manifest is
    closed (complete or incomplete) only by a driver that got to the end, and records the driver's host and
    process; only on that host can the process be looked up."""
    status = as_text(manifest.get("status", "?"))
    if status != "running":
        return status
    driver = manifest.get("driver") or {}
    if driver.get("host") != socket.gethostname():
        where = f" on {driver['host']}" if driver.get("host") else ""
        return f"running{where}, or interrupted (rerun to resume)"
    return "running" if _process_exists(driver.get("pid")) else "interrupted (rerun to resume)"


def _process_exists(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only the existence check
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def run_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The model and the generation settings a run's manifest records."""
    identity = manifest.get("identity", {})
    model = identity.get("model", {}).get("model")
    return {**({"model": model} if model else {}), **identity.get("settings", {})}


@dataclasses.dataclass
class Point:
    name: str
    settings: dict[str, Any]
    run: RunView | None  # None: the point has no run yet


@dataclasses.dataclass
class SweepView:
    url: str
    points: list[Point]
    keys: list[str]  # the rows shown, in input order
    prompts: dict[str, str]
    total_rows: int  # distinct rows over all points


def _join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


def _input_order(row: dict[str, Any]) -> tuple:
    """Input order: source file, then row in it; the key breaks ties and stands in when they are missing."""
    return (row.get(C.SOURCE) or "", row.get(C.SOURCE_ROW) or 0, row[C.KEY])


def as_text(value: Any) -> str:
    """A value of the data as display text: None as the empty string."""
    return "" if value is None else str(value)


class RunReader:
    """Reads what the gallery shows of one committed run (pipeline.outputs): an index of its rows first, then only
    the shards it needs."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        fs, root = output_filesystem(url, storage_options)
        manifest = read_manifest(fs, root)
        if manifest is None:
            raise PreviewError(f"{display_url(url)} holds no {MANIFEST}: not a karlo run")
        self.manifest = manifest
        self.fs, self.committed = fs, CommittedRun(fs, root)
        self.storage_options = dict(storage_options or {})
        self._order: dict[str, tuple] | None = None
        self._shard_of: dict[str, str] = {}

    def _map(self, fn: Callable[[str], Any], paths: Iterable[str]) -> list[Any]:
        with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
            return list(pool.map(fn, paths))

    def order(self) -> dict[str, tuple]:
        """Key -> input-order position of every good row (only the key and source columns are read)."""
        if self._order is None:
            files = self.committed.files(METADATA_DIR)
            wanted = (C.KEY, C.SOURCE, C.SOURCE_ROW)
            tables = self._map(lambda path: read_columns(self.fs, path, wanted), files.values())
            self._order = {}
            for shard, table in zip(files, tables):
                for row in table.to_pylist():
                    self._order[row[C.KEY]] = _input_order(row)
                    self._shard_of[row[C.KEY]] = shard
        return self._order

    def first_keys(self, limit: int) -> list[str]:
        order = self.order()
        return sorted(order, key=order.__getitem__)[:limit]

    def samples(self, keys: Iterable[str]) -> dict[str, Sample]:
        """The rows with these keys (those this run has as good rows), reading only the shards holding them."""
        order = self.order()
        by_shard: dict[str, set[str]] = {}
        for key in keys:
            if key in order:
                by_shard.setdefault(self._shard_of[key], set()).add(key)
        metadata, images = self.committed.files(METADATA_DIR), self.committed.files(IMAGES_DIR)

        def read_shard(shard: str) -> list[Sample]:
            wanted = by_shard[shard]
            table = read_columns(self.fs, metadata[shard])
            rows = [row for row in table.to_pylist() if row[C.KEY] in wanted]
            thumbs = self._thumbnails(images[shard], wanted)
            return [_sample(row, thumbs[row[C.KEY]], self._source(row)) for row in rows if row[C.KEY] in thumbs]

        found = {s.key: s for shard_samples in self._map(read_shard, by_shard) for s in shard_samples}
        return dict(sorted(found.items(), key=lambda item: order[item[0]]))

    def _thumbnails(self, path: str, keys: set[str]) -> dict[str, Image.Image]:
        out = {}
        if path.endswith(".tar"):
            # Streamed: members come in order and only the wanted images are decoded.
            with self.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    stem, _, ext = member.name.rpartition(".")
                    if stem in keys and ext in _IMAGE_EXTS:
                        out[stem] = _thumbnail(tar.extractfile(member).read())
        else:
            table = read_columns(self.fs, path, (C.KEY, C.IMAGE))
            for key, image in zip(table.column(C.KEY).to_pylist(), table.column(C.IMAGE).to_pylist()):
                if key in keys:
                    out[key] = _thumbnail(image["bytes"])
        return out

    def _source(self, row: dict[str, Any]) -> Image.Image | None:
        """A variation's input image, read where the run read it: an absolute path or a URL (an image stored with
        its bytes in the input table left only its name, and nothing to show)."""
        path = row.get(C.SOURCE_IMAGE_PATH)
        if not isinstance(path, str) or not ("://" in path or path.startswith("/")):
            return None
        try:
            with fsspec.open(path, "rb", **self.storage_options) as f:
                return _thumbnail(f.read())
        except (OSError, ValueError, UnidentifiedImageError):  # moved or deleted since the run: the card says so
            return None

    def error_rows(self) -> list[Listed]:
        """Every committed error row, in input order."""
        tables = self._map(lambda path: read_columns(self.fs, path, ERROR_COLUMNS),
                           self.committed.files(ERRORS_DIR).values())
        rows = sorted((row for table in tables for row in table.to_pylist()), key=_input_order)
        return [Listed(row[C.KEY], row.get(C.PROMPT), as_text(row.get(C.ERROR_STAGE)), as_text(row.get(C.ERROR)))
                for row in rows]

    def rejected(self) -> list[Listed]:
        """Rows of committed shards filtered out for a low CLIP score (their rejected/ files), in input order."""
        # Not the images and embeddings they also hold.
        wanted = (C.KEY, C.PROMPT, C.SOURCE, C.SOURCE_ROW, C.CLIP_SCORE, C.REJECTED_REASON)
        files = self.committed.files(REJECTED_DIR)
        tables = self._map(lambda path: read_columns(self.fs, path, wanted), files.values())
        shard_of = {row[C.KEY]: shard for shard, table in zip(files, tables) for row in table.to_pylist()}
        rows = sorted((row for table in tables for row in table.to_pylist()), key=_input_order)
        # The images of the first rows only, from the shards that hold them.
        first: dict[str, set[str]] = {}
        for row in rows[:REJECTED_THUMBNAILS]:
            first.setdefault(shard_of[row[C.KEY]], set()).add(row[C.KEY])
        thumbs: dict[str, Image.Image] = {}
        for found in self._map(lambda shard: self._rejected_thumbnails(files[shard], first[shard]), first):
            thumbs.update(found)
        return [dataclasses.replace(_rejected(row), thumbnail=thumbs.get(row[C.KEY])) for row in rows]

    def _rejected_thumbnails(self, path: str, keys: set[str]) -> dict[str, Image.Image]:
        table = read_columns(self.fs, path, (C.KEY, C.IMAGE))
        if C.IMAGE not in table.column_names:
            return {}
        out = {}
        for key, image in zip(table.column(C.KEY).to_pylist(), table.column(C.IMAGE).to_pylist()):
            data = image.get("bytes") if isinstance(image, dict) else image  # a Hugging Face Image struct
            if key in keys and isinstance(data, bytes):
                try:
                    out[key] = _thumbnail(data)
                except UnidentifiedImageError:  # listed without its image rather than no gallery at all
                    continue
        return out

    def view(self, keys: Iterable[str]) -> RunView:
        return RunView(
            url=display_url(self.url),
            manifest=self.manifest,
            written=self.committed.written,
            errors=self.committed.errors,
            shards=len(self.committed.markers),
            samples=self.samples(keys),
            error_rows=self.error_rows(),
            rejected=self.rejected(),
        )


def _rejected(row: dict[str, Any]) -> Listed:
    """A rejected row with its reason; rows of runs that wrote no reason were rejected for their CLIP score."""
    score = _score_text(row.get(C.CLIP_SCORE))
    if row.get(C.REJECTED_REASON):
        return Listed(row[C.KEY], row.get(C.PROMPT), "filter", f"{row[C.REJECTED_REASON]} ({score})")
    return Listed(row[C.KEY], row.get(C.PROMPT), "clip score", score)


def _score_text(score: Any) -> str:
    return f"{C.CLIP_SCORE} {score:.4f}" if isinstance(score, (int, float)) else f"no {C.CLIP_SCORE}"


def _thumbnail(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((THUMB, THUMB))
    return image


def _sample(row: dict[str, Any], thumbnail: Image.Image, source: Image.Image | None) -> Sample:
    score = row.get(C.CLIP_SCORE)
    return Sample(
        key=row[C.KEY],
        prompt=as_text(row.get(C.PROMPT)),
        seed=row.get(C.SEED),
        score=float(score) if isinstance(score, (int, float)) else None,
        metadata=row,
        thumbnail=thumbnail,
        source=source,
    )


def _is_dir(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        return fs.isdir(path)
    except FileNotFoundError:
        return False


def read_run(url: str, storage_options: dict[str, Any] | None = None, *, limit: int = DEFAULT_LIMIT) -> RunView:
    reader = RunReader(url, storage_options)
    return reader.view(reader.first_keys(limit))


def read_sweep(url: str, storage_options: dict[str, Any] | None = None, *, limit: int = DEFAULT_LIMIT) -> SweepView:
    """A sweep root: ``sweep.json`` lists the points in grid order (each a subfolder named after it), else the
    subfolders holding a run are the points, in name order. Columns are headed by the settings that differ."""
    fs, root = output_filesystem(url, storage_options)
    if fs.exists(f"{root}/{SWEEP_FILE}"):
        try:
            spec = json.loads(fs.cat_file(f"{root}/{SWEEP_FILE}"))
            named = [(str(p["name"]), dict(p.get("settings") or {})) for p in spec["points"]]
        except (ValueError, KeyError, TypeError) as e:
            raise PreviewError(f"{display_url(_join(url, SWEEP_FILE))} is not a sweep description: {e!r}") from None
        readers = {name: _reader_or_none(_join(url, name), storage_options) for name, _ in named}
        settings = _varying(dict(named))
    else:
        readers = {name: RunReader(_join(url, name), storage_options) for name in _run_folders(fs, root)}
        settings = _varying({name: run_settings(r.manifest) for name, r in readers.items()})
    order: dict[str, tuple] = {}
    for reader in readers.values():
        if reader is not None:
            for key, position in reader.order().items():
                order[key] = min(order.get(key, position), position)
    keys = sorted(order, key=order.__getitem__)[:limit]
    points = [Point(name, settings[name], reader.view(keys) if reader else None) for name, reader in readers.items()]
    prompts: dict[str, str] = {}
    for point in points:
        for item in [*point.run.samples.values(), *point.run.error_rows] if point.run else []:
            prompts.setdefault(item.key, as_text(item.prompt))
    return SweepView(url=display_url(url), points=points, keys=keys, prompts=prompts, total_rows=len(order))


def _reader_or_none(url: str, storage_options: dict[str, Any] | None) -> RunReader | None:
    try:
        return RunReader(url, storage_options)
    except PreviewError:
        return None


def _run_folders(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    fs.invalidate_cache(root)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if _is_dir(fs, p))
    return [name for name in names if fs.exists(f"{root}/{name}/{MANIFEST}")]


def _varying(settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per point, the settings whose values differ between points (all of them for a single point)."""
    if len(settings) < 2:
        return settings
    names = sorted({k for s in settings.values() for k in s})
    varying = [k for k in names if len({json.dumps(s.get(k), sort_keys=True) for s in settings.values()}) > 1]
    return {point: {k: s.get(k) for k in varying} for point, s in settings.items()}


def read_output(url: str, storage_options: dict[str, Any] | None = None, *,
                limit: int = DEFAULT_LIMIT) -> RunView | SweepView:
    """A run (a folder with manifest.json) or a sweep (sweep.json, or subfolders holding runs)."""
    fs, root = output_filesystem(url, storage_options)
    if fs.exists(f"{root}/{MANIFEST}"):
        return read_run(url, storage_options, limit=limit)
    if not _is_dir(fs, root):
        raise PreviewError(f"{display_url(url)} does not exist")
    if fs.exists(f"{root}/{SWEEP_FILE}") or _run_folders(fs, root):
        return read_sweep(url, storage_options, limit=limit)
    raise PreviewError(f"{display_url(url)} is neither a karlo run ({MANIFEST}) nor a sweep ({SWEEP_FILE}, or "
                       "subfolders holding runs)")
