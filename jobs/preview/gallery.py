"""The self-contained HTML gallery of ``karlo preview``: thumbnails with prompt, seed, settings and score, the error
and rejected rows; for a sweep, one row per prompt and one column per point.

Thumbnails are embedded as data: URIs, so the page is one file that works from file:// and can be copied anywhere;
a Content-Security-Policy allows nothing but inline styles and data: images (no scripts, no network), and every
value from the data (prompts are user input) is escaped.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from string import Template
from typing import Any

from pipeline import columns as C
from pipeline.progress import plural

from .read import Listed, RunView, Sample, SweepView, as_text, jpeg_data_uri

PAGE = "index.html"
SHEET = "contact_sheet.png"  # the contact sheet beside the page, which links to it
MAX_LISTED = 1000  # error and rejected rows listed per run; the counts are always complete
# Shown on the card itself; every other metadata column goes under "details".
_CARD_COLUMNS = (C.KEY, C.PROMPT, C.SEED, C.CLIP_SCORE, C.AESTHETIC_SCORE, C.NSFW, C.PRIOR_GUIDANCE_SCALE,
                 C.DECODER_GUIDANCE_SCALE, C.NEGATIVE_PROMPT)




def _e(value: Any) -> str:
    return html.escape(as_text(value), quote=True)


def format_number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else as_text(value)


def _settings_list(settings: dict[str, Any]) -> str:
    items = "".join(f"<li>{_e(k)}={_e(json.dumps(v) if isinstance(v, (dict, list)) else format_number(v))}</li>"
                    for k, v in settings.items())
    return f'<ul class="settings">{items}</ul>' if items else ""


def _info(sample: Sample) -> str:
    """seed, per-row guidance and score: the line under a thumbnail."""
    row = sample.metadata
    parts = [f"seed {_e(sample.seed)}"]
    prior, decoder = row.get(C.PRIOR_GUIDANCE_SCALE), row.get(C.DECODER_GUIDANCE_SCALE)
    if prior is not None:
        parts.append(f"cfg {_e(format_number(prior))}/{_e(format_number(decoder))}")
    elif decoder is not None:  # image variations: no prior, hence no prior guidance
        parts.append(f"decoder cfg {_e(format_number(decoder))}")
    if row.get(C.NEGATIVE_PROMPT):
        parts.append(f"neg: {_e(row[C.NEGATIVE_PROMPT])}")
    if sample.score is not None:
        parts.append(f'<span class="score">score {sample.score:.4f}</span>')
    if isinstance(row.get(C.AESTHETIC_SCORE), (int, float)):
        parts.append(f'<span class="score">aesthetic {row[C.AESTHETIC_SCORE]:.2f}</span>')
    if row.get(C.NSFW) is not None:
        parts.append('<span class="nsfw">nsfw</span>' if row[C.NSFW] else "safe")
    return f'<p class="info">{" · ".join(parts)}</p>'


def _details(sample: Sample) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(format_number(v))}</dd>" for k, v in sample.metadata.items()
                   if k not in _CARD_COLUMNS)
    return f"<details><summary>{_e(sample.key)}</summary><dl>{rows}</dl></details>"


def _img(sample: Sample) -> str:
    w, h = sample.thumbnail.size
    return f'<img src="{sample.jpeg_data_uri()}" width="{w}" height="{h}" alt="{_e(sample.prompt)}">'


def _source_img(sample: Sample) -> str:
    """A variation's input image, inset in the corner of the variation."""
    if sample.source is None:
        return ""
    w, h = sample.source.size
    path = _e(sample.metadata.get(C.SOURCE_IMAGE_PATH))
    return (f'<img class="source" src="{jpeg_data_uri(sample.source)}" width="{w}" height="{h}" '
            f'alt="source image {path}" title="source image {path}">')


def _prompt(text: Any) -> str:
    """A prompt clamped to a few lines by the page's CSS, the whole text in its title."""
    return f'<p class="prompt" title="{_e(text)}">{_e(text)}</p>'


def _card(sample: Sample) -> str:
    return (f"<figure>{_img(sample)}{_source_img(sample)}<figcaption>{_prompt(sample.prompt)}{_info(sample)}"
            f"{_details(sample)}</figcaption></figure>")


def _thumb_cell(row: Listed) -> str:
    if row.thumbnail is None:
        return "<td></td>"
    w, h = row.thumbnail.size
    return f'<td><img class="thumb" src="{jpeg_data_uri(row.thumbnail)}" width="{w}" height="{h}" alt=""></td>'


def _listed_table(title: str, rows: list[Listed], total: int) -> str:
    if not total:
        return ""
    shown = rows[:MAX_LISTED]
    note = f'<p class="note">the first {len(shown)} in input order</p>' if len(shown) < total else ""
    images = any(r.thumbnail is not None for r in shown)  # rejected rows have images, error rows none
    body = "".join(f"<tr><td><code>{_e(r.key)}</code></td><td>{_e(r.stage)}</td><td class=\"error\">{_e(r.reason)}"
                   f"</td><td>{_e(r.prompt)}</td>{_thumb_cell(r) if images else ''}</tr>" for r in shown)
    image_head = "<th>image</th>" if images else ""
    return (f"<section><h2>{_e(title)} ({total:,})</h2>{note}<table class=\"list\"><thead><tr><th>key</th>"
            f"<th>stage</th><th>reason</th><th>prompt</th>{image_head}</tr></thead><tbody>{body}</tbody></table>"
            "</section>")


def _run_header(view: RunView, title: str) -> str:
    m = view.manifest
    counts = " · ".join([plural(view.written, "image"), plural(view.errors, "error row"), plural(view.shards, "shard"),
                         f"{as_text(m.get('input_rows', '?'))} input rows", f"status {view.state}"])
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
    template = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    return Template(template).substitute(title=_e(f"karlo preview: {title}"), body=body)
