"""The contact sheet of ``karlo preview``: the gallery's thumbnails on one PNG."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipeline.progress import plural

from .gallery import format_number
from .read import RunView, Sample, SweepView

SHEET_THUMB = 160  # px, a contact sheet cell

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
    counts = f"{plural(view.written, 'image')}, {plural(view.errors, 'error row')}"
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
        head = [point.name] + [f"{k}={format_number(v)}" for k, v in point.settings.items()]
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
