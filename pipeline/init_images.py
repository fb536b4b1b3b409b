"""Image-to-image in ``generate``: prompt tables whose rows may carry an init image and a strength.

read -> prepare (keys, seeds; each init image fetched and checked, each strength checked) -> prior -> decoder
(from the init image noised to the strength's timestep, karlo_model.img2img) -> super-res -> write

A table with an ``init_image`` column (encoded bytes, Hugging Face ``Image`` structs or paths/URLs, as for
variations) runs this way; a row whose init image is null is text-to-image, exactly as in a table without the
column. ``strength`` (null: the run's ``--strength``) says how much of the decoder's chain runs: 1 is all of it
from pure noise, which is text-to-image again. The metadata records the strength (null for text-to-image rows),
the decoder steps run and where the init image came from.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from karlo_model.img2img import steps_run

from . import columns as C
from .config import STRENGTH, ConfigError, RunConfig
from .image_cells import load_images
from .schema import prepare_batch, with_row_problems

INPUT_COLUMNS = (C.INIT_IMAGE_INPUT, C.STRENGTH)
# What prepare adds for the stages (the init image's bytes) and for the metadata.
PREPARED = (C.INIT_IMAGE, C.STRENGTH, C.DECODER_STEPS_RUN, C.INIT_IMAGE_PATH)


def uses_init_images(cfg: RunConfig, schema: pa.Schema) -> bool:
    """Whether the run is image-to-image (its input has an ``init_image`` column); refuses a strength that would
    be silently ignored."""
    has_images = C.INIT_IMAGE_INPUT in schema.names
    if not has_images and C.STRENGTH in schema.names:
        raise ConfigError(f"the input has a {C.STRENGTH!r} column but no {C.INIT_IMAGE_INPUT!r} column: strength is "
                          "the denoising strength of image-to-image; add the init images or rename the column")
    if not has_images and cfg.strength is not None:
        raise ConfigError(f"--strength is for image-to-image: the input has no {C.INIT_IMAGE_INPUT!r} column")
    return has_images


def prepare_with_init_images(
    table: pa.Table,
    *,
    run_seed: int,
    prior_guidance_scale: float,
    decoder_guidance_scale: float,
    strength: float | None,
    decoder_steps: int,
    storage_options: dict | None = None,
) -> pa.Table:
    """The prepare step of prompts (``prepare_batch``), then each row's init image fetched and fully decoded and
    its strength checked: a missing or undecodable image or a strength outside (0, 1] makes an error row naming
    it. The input's two columns are replaced by ``PREPARED``."""
    images = _column(table, C.INIT_IMAGE_INPUT)
    given = _column(table, C.STRENGTH)
    prepared = prepare_batch(table.drop_columns([c for c in INPUT_COLUMNS if c in table.column_names]),
                             run_seed=run_seed, prior_guidance_scale=prior_guidance_scale,
                             decoder_guidance_scale=decoder_guidance_scale)
    has_image = [not _is_null(v) for v in images]
    loaded = load_images([v for v, has in zip(images, has_image) if has], storage_options or {})
    loaded_iter = iter(loaded)
    cells = [next(loaded_iter) if has else (b"", None, "") for has in has_image]
    default = STRENGTH if strength is None else strength
    strengths: list[float | None] = []
    problems = []
    for has, value, (_, _, problem) in zip(has_image, given, cells):
        s, bad = _strength(value, default) if has else (None, "")
        strengths.append(s)
        problems.append("; ".join(p for p in (problem, bad) if p))
    steps = [decoder_steps if s is None else steps_run(s, decoder_steps) for s in strengths]
    prepared = with_row_problems(prepared, problems)
    for name, values, kind in (
        (C.STRENGTH, strengths, pa.float64()),
        (C.DECODER_STEPS_RUN, steps, pa.int64()),
        (C.INIT_IMAGE_PATH, [path for _, path, _ in cells], pa.string()),
        (C.INIT_IMAGE, [data for data, _, _ in cells], pa.binary()),
    ):
        prepared = prepared.append_column(name, pa.array(values, kind))
    return prepared


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def _is_null(value: Any) -> bool:
    """A null cell, or a Hugging Face Image struct holding neither bytes nor a path."""
    return value is None or (isinstance(value, dict) and value.get("bytes") is None and value.get("path") is None)


def _strength(value: Any, default: float) -> tuple[float | None, str]:
    """(the row's strength, "") or (None, the problem)."""
    if value is None:
        return float(default), ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 1:
        return None, f"strength must be a number in (0, 1], got {value!r}"[:200]
    return float(value), ""
