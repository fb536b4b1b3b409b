"""Image variations: tables of images in, Karlo variations out, through the same pipeline as prompts.

read -> prepare (key, seed, fetch and check the image) -> image encoder -> decoder -> super-res -> write

The image column holds encoded image bytes, Hugging Face ``Image`` structs (``{bytes, path}``) or paths/URLs at
any fsspec location. The image encoder stage takes the place of the prior: it hands the decoder the image's CLIP
embedding and the encoding of "" as the text of both halves of guidance, exactly as diffusers'
``UnCLIPImageVariationPipeline``; decoder and super-res are the text-to-image stages unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import pyarrow as pa

from karlo_model import VARIATIONS_PIPELINE

from . import columns as C
from .actors import StageActor
from .config import ConfigError
from .image_cells import decode_image, load_images
from .reader import InputError
from .schema import prepare_batch, with_row_problems
from .stages import FIRST_STAGE_OUTPUTS, Batch, Stage, empty_first_stage_outputs, first_stage_outputs

# Input columns that mean something for prompts but would be silently ignored or overwritten for images.
REFUSED_COLUMNS = (C.PROMPT, C.NEGATIVE_PROMPT, C.PRIOR_GUIDANCE_SCALE, C.INIT_IMAGE_INPUT, C.STRENGTH)
_PLACEHOLDER = "image"  # stands in for the prompt while the prompt rules run; the text of a variation is ""


def check_image_columns(schema: pa.Schema, source: str, shown: str, image_column: str) -> None:
    """The column rules of image tables (the reader's prompt rules, with an image column instead of ``prompt``)."""
    if image_column not in schema.names:
        have = ", ".join(schema.names) or "(none)"
        raise InputError(f"{shown}: file {source!r} has no {image_column!r} column; its columns are: {have}")
    field = schema.field(image_column).type
    if not _is_image_type(field):
        raise InputError(
            f"{shown}: column {image_column!r} of {source!r} is {field}; expected image bytes (binary), a Hugging "
            "Face Image struct<bytes, path>, or paths/URLs (string)"
        )
    for name in schema.names:
        if name == image_column:
            continue
        if name in C.RESERVED or C.is_internal(name) or name in REFUSED_COLUMNS:
            raise InputError(
                f"{shown}: file {source!r} has a column named {name!r}, which image variations cannot keep: the "
                f"pipeline writes {', '.join(C.RESERVED)} and every column starting with '__', and a variation has "
                f"no {', '.join(REFUSED_COLUMNS)}. Rename it."
            )


def image_column_check(image_column: str) -> Callable[[pa.Schema, str, str], None]:
    """The reader's per-file column check for image tables (``plan_inputs(check_columns=...)``)."""
    return functools.partial(check_image_columns, image_column=image_column)


def check_model_kind(task: str, model_id: dict[str, Any]) -> None:
    """Refuse a text-to-image repo for variations and the other way round, before any work starts."""
    is_variations = model_id.get("class") == VARIATIONS_PIPELINE
    if task == "variations" and not is_variations:
        raise ConfigError(
            f"image variations need an image-variations repo (kakaobrain/karlo-v1-alpha-image-variations, with an "
            f"image encoder and no prior); {model_id['model']} is a {model_id.get('class')}"
        )
    if task != "variations" and is_variations:
        raise ConfigError(
            f"{model_id['model']} is an image-variations repo (no prior): use `karlo variations` with image inputs, "
            "or a text-to-image repo such as kakaobrain/karlo-v1-alpha"
        )


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return "bytes" in names or "path" in names
    return any(test(t) for test in (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_string,
                                    pa.types.is_large_string, pa.types.is_null))


def prepare_images(
    table: pa.Table,
    *,
    run_seed: int,
    decoder_guidance_scale: float,
    image_column: str,
    storage_options: dict | None = None,
) -> pa.Table:
    """The prepare step of variations: keys, seeds and per-row decoder guidance as for prompts; each image
    fetched and fully decoded here, so that a missing or undecodable image becomes an error row naming the
    reason. Adds the image bytes (internal) and where they came from; the input image column is dropped."""
    n = table.num_rows
    # The prompt rules do not apply to images (the text of a variation is always ""): a placeholder passes them,
    # and the keys, seeds and guidance scales are validated as for prompts. No prior: its scale is 1 (off).
    with_text = table.append_column(C.PROMPT, pa.array([_PLACEHOLDER] * n, pa.string()))
    prepared = prepare_batch(with_text, run_seed=run_seed, prior_guidance_scale=1.0,
                             decoder_guidance_scale=decoder_guidance_scale)
    prepared = prepared.set_column(prepared.schema.get_field_index(C.PROMPT), C.PROMPT, pa.array([""] * n, pa.string()))
    values = table.column(image_column).to_pylist()
    loaded = load_images(values, storage_options or {})
    prepared = with_row_problems(prepared, [problem for _, _, problem in loaded]).drop_columns([image_column])
    prepared = prepared.append_column(C.SOURCE_IMAGE_PATH, pa.array([path for _, path, _ in loaded], pa.string()))
    return prepared.append_column(C.SOURCE_IMAGE, pa.array([data for data, _, _ in loaded], pa.binary()))


class ImageEncoderStage(Stage):
    """CLIP image encoder (+ the text encoder for ""): input images -> CLIP image embeddings, in place of the prior."""

    name = "image_encoder"
    components = ("image_encoder",)
    inputs = (C.KEY, C.SEED, C.SOURCE_IMAGE)
    outputs = FIRST_STAGE_OUTPUTS
    consumes = (C.SOURCE_IMAGE,)

    def run(self, batch: Batch) -> Batch:
        # Decoded again here (prepare checked them): encoded bytes travel between processes compactly, and one
        # column of them holds images of any sizes.
        images = [decode_image(data) for data in batch[C.SOURCE_IMAGE]]
        return first_stage_outputs(self.model.image_encoder_stage(images, [int(s) for s in batch[C.SEED]]))

    def empty(self, n: int) -> Batch:
        return empty_first_stage_outputs(n, self.config)


class ImageEncoderActor(StageActor):
    stage_class = ImageEncoderStage
