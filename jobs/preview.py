"""Preview a run or a sweep without a server: a contact sheet PNG and a self-contained HTML gallery.

``karlo preview OUTPUT`` reads committed shards only (a local folder or any fsspec URL) and writes, into a local
folder:

    index.html          thumbnails with prompt, seed, settings and score, the error and rejected rows; for a
                        sweep, one row per prompt and one column per point. Thumbnails are embedded as data:
                        URIs, so the page is one file that works from file:// and can be copied anywhere; a
                        Content-Security-Policy allows nothing but inline styles and data: images (no scripts,
                        no network), and every value from the data (prompts are user input) is escaped.
    contact_sheet.png   the same thumbnails on one image

The gallery shows the first ``limit`` rows in input order (source file, row), not in shard order, so the same
rows appear whatever way Ray cut the run into shards; in a sweep, rows are matched across points by key (the
input row's id, or its source file and row, the same in every point that read the same prompts).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import html
import io
import json
import math
import tarfile
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Callable, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageDraw, ImageFont

from pipeline import columns as C
from pipeline.manifest import MANIFEST
from pipeline.reader import display_url
from pipeline.shards import ERROR_COLUMNS, IMAGE_EXTENSIONS
from pipeline.sinks import (
    ERRORS_DIR,
    IMAGES_DIR,
    METADATA_DIR,
    committed_shards,
    open_atomic,
    output_filesystem,
)

PAGE = "index.html"
SHEET = "contact_sheet.png"
SWEEP = "sweep.json"
REJECTED_DIR = "rejected"  # rows of a shard filtered out by a minimum CLIP score, listed in its commit marker
SCORE = "clip_score"
DEFAULT_LIMIT = 100
MAX_LISTED = 1000  # error and rejected rows listed per run; the counts are always complete
THUMB = 256  # px, longest side of a gallery thumbnail: Karlo's own output size, so nothing is lost
THUMB_QUALITY = 90  # JPEG: a 256 px thumbnail of ~20 kB instead of a ~150 kB PNG
SHEET_THUMB = 160  # px, a contact sheet cell
READ_THREADS = 8  # concurrent small reads (metadata footers and columns) on object storage

_IMAGE_EXTS = set(IMAGE_EXTENSIONS.values())
# Shown on the card itself; every other metadata column goes under "details".
_CARD_COLUMNS = (C.KEY, C.PROMPT, C.SEED, SCORE, C.PRIOR_GUIDANCE_SCALE, C.DECODER_GUIDANCE_SCALE, C.NEGATIVE_PROMPT)


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

    def jpeg_data_uri(self) -> str:
        buf = io.BytesIO()
        self.thumbnail.save(buf, format="JPEG", quality=THUMB_QUALITY)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclasses.dataclass(frozen=True)
class Listed:
    """A row listed without an image: an error row (stage, reason) or a row rejected for its score."""

    key: str
    prompt: str | None
    stage: str
    reason: str


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


@dataclasses.dataclass(frozen=True)
class PreviewFiles:
    page: Path
    sheet: Path
    images: int


# ---------------------------------------------------------------------------------------------- reading


def _join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


def _read_columns(fs: fsspec.AbstractFileSystem, path: str, wanted: Iterable[str] | None = None) -> pa.Table:
    """The ``wanted`` columns a Parquet file has (all when None), reading only those from storage."""
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        return parquet.read(columns=None if wanted is None else [c for c in wanted if c in names])


def _input_order(row: dict[str, Any]) -> tuple:
    """Input order: source file, then row in it; the key breaks ties and stands in when they are missing."""
    return (row.get(C.SOURCE) or "", row.get(C.SOURCE_ROW) or 0, row[C.KEY])


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class RunReader:
    """Reads the committed part of one run: an index of its rows first, then only the shards it needs."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.fs, self.root = output_filesystem(url, storage_options)
        try:
            self.manifest = json.loads(self.fs.cat_file(f"{self.root}/{MANIFEST}"))
        except FileNotFoundError:
            raise PreviewError(f"{display_url(url)} holds no {MANIFEST}: not a karlo run") from None
        self.markers = committed_shards(url, storage_options)
        self._order: dict[str, tuple] | None = None
        self._shard_of: dict[str, str] = {}

    def _files(self, folder: str) -> dict[str, str]:
        """Shard id -> path of its committed file in ``folder``."""
        return {m["shard"]: f"{self.root}/{rel}" for m in self.markers for rel in m["files"]
                if rel.startswith(f"{folder}/")}

    def _map(self, fn: Callable[[str], Any], paths: Iterable[str]) -> list[Any]:
        with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
            return list(pool.map(fn, paths))

    def order(self) -> dict[str, tuple]:
        """Key -> input-order position of every good row (only the key and source columns are read)."""
        if self._order is None:
            files = self._files(METADATA_DIR)
            wanted = (C.KEY, C.SOURCE, C.SOURCE_ROW)
            tables = self._map(lambda path: _read_columns(self.fs, path, wanted), files.values())
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
        metadata, images = self._files(METADATA_DIR), self._files(IMAGES_DIR)

        def read_shard(shard: str) -> list[Sample]:
            wanted = by_shard[shard]
            table = _read_columns(self.fs, metadata[shard])
            rows = [row for row in table.to_pylist() if row[C.KEY] in wanted]
            thumbs = self._thumbnails(images[shard], wanted)
            return [_sample(row, thumbs[row[C.KEY]]) for row in rows if row[C.KEY] in thumbs]

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
            table = _read_columns(self.fs, path, (C.KEY, C.IMAGE))
            for key, image in zip(table.column(C.KEY).to_pylist(), table.column(C.IMAGE).to_pylist()):
                if key in keys:
                    out[key] = _thumbnail(image["bytes"])
        return out

    def error_rows(self) -> list[Listed]:
        """Every committed error row, in input order."""
        tables = self._map(lambda path: _read_columns(self.fs, path, ERROR_COLUMNS), self._files(ERRORS_DIR).values())
        rows = sorted((row for table in tables for row in table.to_pylist()), key=_input_order)
        return [Listed(row[C.KEY], row.get(C.PROMPT), _text(row.get(C.ERROR_STAGE)), _text(row.get(C.ERROR)))
                for row in rows]

    def rejected(self) -> list[Listed]:
        """Rows of committed shards filtered out for a low CLIP score (their rejected/ files), in input order."""
        wanted = (C.KEY, C.PROMPT, C.SOURCE, C.SOURCE_ROW, SCORE)  # not the images and embeddings they also hold
        tables = self._map(lambda path: _read_columns(self.fs, path, wanted), self._files(REJECTED_DIR).values())
        rows = sorted((row for table in tables for row in table.to_pylist()), key=_input_order)
        return [Listed(row[C.KEY], row.get(C.PROMPT), "clip score", _score_text(row.get(SCORE))) for row in rows]

    def view(self, keys: Iterable[str]) -> RunView:
        return RunView(
            url=display_url(self.url),
            manifest=self.manifest,
            written=sum(m["rows"] for m in self.markers),
            errors=sum(m["errors"] for m in self.markers),
            shards=len(self.markers),
            samples=self.samples(keys),
            error_rows=self.error_rows(),
            rejected=self.rejected(),
        )


def _score_text(score: Any) -> str:
    return f"{SCORE} {score:.4f}" if isinstance(score, (int, float)) else f"no {SCORE}"


def _thumbnail(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((THUMB, THUMB))
    return image


def _sample(row: dict[str, Any], thumbnail: Image.Image) -> Sample:
    score = row.get(SCORE)
    return Sample(
        key=row[C.KEY],
        prompt=_text(row.get(C.PROMPT)),
        seed=row.get(C.SEED),
        score=float(score) if isinstance(score, (int, float)) else None,
        metadata=row,
        thumbnail=thumbnail,
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
    if fs.exists(f"{root}/{SWEEP}"):
        try:
            spec = json.loads(fs.cat_file(f"{root}/{SWEEP}"))
            named = [(str(p["name"]), dict(p.get("settings") or {})) for p in spec["points"]]
        except (ValueError, KeyError, TypeError) as e:
            raise PreviewError(f"{display_url(_join(url, SWEEP))} is not a sweep description: {e!r}") from None
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
            prompts.setdefault(item.key, _text(item.prompt))
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
    if fs.exists(f"{root}/{SWEEP}") or _run_folders(fs, root):
        return read_sweep(url, storage_options, limit=limit)
    raise PreviewError(f"{display_url(url)} is neither a karlo run ({MANIFEST}) nor a sweep ({SWEEP}, or "
                       "subfolders holding runs)")


# ---------------------------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else _text(value)


def _settings_list(settings: dict[str, Any]) -> str:
    items = "".join(f"<li>{_e(k)}={_e(json.dumps(v) if isinstance(v, (dict, list)) else _number(v))}</li>"
                    for k, v in settings.items())
    return f'<ul class="settings">{items}</ul>' if items else ""


def _info(sample: Sample) -> str:
    """seed, per-row guidance and score: the line under a thumbnail."""
    row = sample.metadata
    parts = [f"seed {_e(sample.seed)}"]
    if row.get(C.PRIOR_GUIDANCE_SCALE) is not None or row.get(C.DECODER_GUIDANCE_SCALE) is not None:
        parts.append(f"cfg {_e(_number(row.get(C.PRIOR_GUIDANCE_SCALE)))}/"
                     f"{_e(_number(row.get(C.DECODER_GUIDANCE_SCALE)))}")
    if row.get(C.NEGATIVE_PROMPT):
        parts.append(f"neg: {_e(row[C.NEGATIVE_PROMPT])}")
    if sample.score is not None:
        parts.append(f'<span class="score">score {sample.score:.4f}</span>')
    return f'<p class="info">{" · ".join(parts)}</p>'


def _details(sample: Sample) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(_number(v))}</dd>" for k, v in sample.metadata.items()
                   if k not in _CARD_COLUMNS)
    return f"<details><summary>{_e(sample.key)}</summary><dl>{rows}</dl></details>"


def _img(sample: Sample) -> str:
    w, h = sample.thumbnail.size
    return f'<img src="{sample.jpeg_data_uri()}" width="{w}" height="{h}" alt="{_e(sample.prompt)}">'


def _card(sample: Sample) -> str:
    return (f"<figure>{_img(sample)}<figcaption><p class=\"prompt\">{_e(sample.prompt)}</p>{_info(sample)}"
            f"{_details(sample)}</figcaption></figure>")


def _listed_table(title: str, rows: list[Listed], total: int) -> str:
    if not total:
        return ""
    shown = rows[:MAX_LISTED]
    note = f'<p class="note">the first {len(shown)} in input order</p>' if len(shown) < total else ""
    body = "".join(f"<tr><td><code>{_e(r.key)}</code></td><td>{_e(r.stage)}</td><td class=\"error\">{_e(r.reason)}"
                   f"</td><td>{_e(r.prompt)}</td></tr>" for r in shown)
    return (f"<section><h2>{_e(title)} ({total:,})</h2>{note}<table class=\"list\"><thead><tr><th>key</th>"
            f"<th>stage</th><th>reason</th><th>prompt</th></tr></thead><tbody>{body}</tbody></table></section>")


def _run_header(view: RunView, title: str) -> str:
    m = view.manifest
    counts = " · ".join([_count(view.written, "image"), _count(view.errors, "error row"), _count(view.shards, "shard"),
                         f"{_text(m.get('input_rows', '?'))} input rows", f"status {_text(m.get('status', '?'))}"])
    return f"<h1>{_e(title)}</h1><p class=\"meta\">{_e(counts)}</p>{_settings_list(view.settings)}"


def render_run(view: RunView) -> str:
    shown = f"the first {len(view.samples):,} of {view.written:,} images in input order"
    body = [
        "<header>", _run_header(view, view.url),
        f'<p class="note">{_e(shown)} · <a href="{SHEET}">contact sheet</a></p></header>',
        '<main class="grid">', *(_card(s) for s in view.samples.values()), "</main>",
        _listed_table("Error rows", view.error_rows, view.errors),
        _listed_table("Rejected rows", view.rejected, len(view.rejected)),
    ]
    return _page(view.url, "\n".join(body))


def _cell(run: RunView | None, errors: dict[str, Listed], key: str) -> str:
    if run is None:
        return '<td><div class="missing">no run yet</div></td>'
    sample = run.samples.get(key)
    if sample is not None:
        return f"<td>{_img(sample)}{_info(sample)}</td>"
    error = errors.get(key)
    text = f"error ({error.stage}): {error.reason}" if error else "not generated"
    return f'<td><div class="missing">{_e(text)}</div></td>'


def render_sweep(view: SweepView) -> str:
    head = "".join(f"<th>{_e(p.name)}{_settings_list(p.settings)}</th>" for p in view.points)
    errors = [{r.key: r for r in p.run.error_rows} if p.run else {} for p in view.points]
    rows = "".join(f"<tr><th>{_e(view.prompts.get(key, ''))}<br><code>{_e(key)}</code></th>"
                   + "".join(_cell(p.run, e, key) for p, e in zip(view.points, errors)) + "</tr>"
                   for key in view.keys)
    sections = []
    for p in view.points:
        if p.run is not None:
            sections.append(_listed_table(f"{p.name}: error rows", p.run.error_rows, p.run.errors))
            sections.append(_listed_table(f"{p.name}: rejected rows", p.run.rejected, len(p.run.rejected)))
    shown = f"{len(view.points)} points · the first {len(view.keys):,} of {view.total_rows:,} prompts in input order"
    body = [
        f'<header><h1>{_e(view.url)}</h1><p class="note">{_e(shown)} · <a href="{SHEET}">contact sheet</a></p>'
        "</header>",
        f'<table class="sweep"><thead><tr><th>prompt</th>{head}</tr></thead><tbody>{rows}</tbody></table>',
        *sections,
    ]
    return _page(view.url, "\n".join(body))


def _page(title: str, body: str) -> str:
    template = resources.files("jobs").joinpath("preview.html").read_text(encoding="utf-8")
    return Template(template).substitute(title=_e(f"karlo preview: {title}"), body=body)


# ---------------------------------------------------------------------------------------------- contact sheet

_PAD, _LINE = 8, 16  # px: gap around cells, height of a caption line


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fit(text: str, font: Any, width: int) -> str:
    """``text`` on one line, cut with an ellipsis to ``width`` px."""
    text = " ".join(text.split())
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [_fit(" ".join(lines[max_lines - 1 :]), font, width)]
    return [_fit(line, font, width) for line in lines]


def _caption(sample: Sample) -> str:
    return f"seed {sample.seed}" + (f"  score {sample.score:.3f}" if sample.score is not None else "")


def _sheet_thumb(sample: Sample) -> Image.Image:
    image = sample.thumbnail.copy()
    image.thumbnail((SHEET_THUMB, SHEET_THUMB))
    return image


def sheet_run(view: RunView) -> Image.Image:
    """Thumbnails in a near-square grid (at most 10 columns), each with its seed, score and prompt."""
    font, n = _font(), len(view.samples)
    cols = max(1, min(10, math.ceil(math.sqrt(n))))
    cell_w, cell_h = SHEET_THUMB + _PAD, SHEET_THUMB + 2 * _LINE + _PAD
    top = 2 * _LINE + _PAD
    sheet = Image.new("RGB", (cols * cell_w + _PAD, top + math.ceil(n / cols) * cell_h + _PAD), "white")
    draw = ImageDraw.Draw(sheet)
    width = sheet.width - 2 * _PAD
    draw.text((_PAD, _PAD), _fit(view.url, font, width), fill="black", font=font)
    counts = f"{_count(view.written, 'image')}, {_count(view.errors, 'error row')}"
    draw.text((_PAD, _PAD + _LINE), _fit(counts, font, width), fill="dimgray", font=font)
    for i, sample in enumerate(view.samples.values()):
        x, y = _PAD + (i % cols) * cell_w, top + (i // cols) * cell_h
        sheet.paste(_sheet_thumb(sample), (x, y))
        draw.text((x, y + SHEET_THUMB + 2), _fit(_caption(sample), font, SHEET_THUMB), fill="dimgray", font=font)
        draw.text((x, y + SHEET_THUMB + 2 + _LINE), _fit(sample.prompt, font, SHEET_THUMB), fill="black", font=font)
    return sheet


def sheet_sweep(view: SweepView) -> Image.Image:
    """One row per prompt (its text on the left), one column per point (its name and settings on top)."""
    font = _font()
    cell_w, cell_h = SHEET_THUMB + _PAD, SHEET_THUMB + _LINE + _PAD
    label_w, head_lines = 2 * SHEET_THUMB, 4
    top = head_lines * _LINE + _PAD
    sheet = Image.new("RGB", (label_w + len(view.points) * cell_w + _PAD, top + len(view.keys) * cell_h + _PAD),
                      "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((_PAD, _PAD), _fit(view.url, font, label_w - _PAD), fill="black", font=font)
    for j, point in enumerate(view.points):
        x = label_w + j * cell_w
        head = [point.name] + [f"{k}={_number(v)}" for k, v in point.settings.items()]
        for i, line in enumerate(head[:head_lines]):
            draw.text((x, _PAD + i * _LINE), _fit(line, font, SHEET_THUMB), fill="black" if i == 0 else "dimgray",
                      font=font)
    for i, key in enumerate(view.keys):
        y = top + i * cell_h
        for k, line in enumerate(_wrap(view.prompts.get(key, key), font, label_w - 2 * _PAD, SHEET_THUMB // _LINE)):
            draw.text((_PAD, y + k * _LINE), line, fill="black", font=font)
        for j, point in enumerate(view.points):
            x = label_w + j * cell_w
            sample = point.run.samples.get(key) if point.run else None
            if sample is None:
                draw.rectangle((x, y, x + SHEET_THUMB - 1, y + SHEET_THUMB - 1), fill="#eeeeee")
                draw.text((x + _PAD, y + _PAD), "no image", fill="firebrick", font=font)
                continue
            sheet.paste(_sheet_thumb(sample), (x, y))
            draw.text((x, y + SHEET_THUMB + 2), _fit(_caption(sample), font, SHEET_THUMB), fill="dimgray", font=font)
    return sheet


# ---------------------------------------------------------------------------------------------- writing


def default_out_dir(url: str) -> Path:
    """``./preview-<last part of OUTPUT>``."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or "output"
    return Path(f"preview-{name}")


def write_preview(url: str, out_dir: str | Path, *, limit: int = DEFAULT_LIMIT,
                  storage_options: dict[str, Any] | None = None) -> PreviewFiles:
    """Read the run or sweep at ``url`` and write index.html and contact_sheet.png into the local ``out_dir``."""
    if limit < 1:
        raise PreviewError(f"limit must be >= 1, got {limit}")
    view = read_output(url, storage_options, limit=limit)
    if isinstance(view, SweepView):
        page, sheet = render_sweep(view), sheet_sweep(view)
        images = sum(len(p.run.samples) for p in view.points if p.run)
    else:
        page, sheet = render_run(view), sheet_run(view)
        images = len(view.samples)
    out = Path(out_dir).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreviewError(f"cannot create the folder {out}: {e}") from None
    fs = LocalFileSystem()
    with open_atomic(fs, str(out / PAGE)) as f:
        f.write(page.encode("utf-8"))
    with open_atomic(fs, str(out / SHEET)) as f:
        sheet.save(f, format="PNG")
    return PreviewFiles(page=out / PAGE, sheet=out / SHEET, images=images)
