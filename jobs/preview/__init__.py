"""Preview a run or a sweep without a server: a contact sheet PNG and a self-contained HTML gallery.

``karlo preview OUTPUT`` reads committed shards only (a local folder or any fsspec URL) and writes, into a local
folder:

    index.html          thumbnails with prompt, seed, settings and score, the error and rejected rows; for a
                        sweep, one row per prompt and one column per point. Thumbnails are embedded as data:
                        URIs, so the page is one file that works from file:// and can be copied anywhere; a
                        Content-Security-Policy allows nothing but inline styles and data: images (no scripts,
                        no network), and every value from the data (prompts are user input) is escaped.
    contact_sheet.png   the same thumbnails on one image

Reading: :mod:`jobs.preview.read`; the page: :mod:`jobs.preview.gallery`; the sheet: :mod:`jobs.preview.sheet`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipeline.sinks import open_atomic

from .gallery import PAGE, SHEET, render_run, render_sweep
from .read import DEFAULT_LIMIT, PreviewError, SweepView, read_output
from .sheet import sheet_run, sheet_sweep

__all__ = ["PreviewError", "PreviewFiles", "default_out_dir", "write_preview"]


@dataclasses.dataclass(frozen=True)
class PreviewFiles:
    page: Path
    sheet: Path
    images: int




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
