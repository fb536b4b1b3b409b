"""What differs between the two kinds of run: ``generate`` (prompt tables) and ``variations`` (image tables).

Everything else (reading, keys and seeds, the decoder and super-res stages, encoding, writing, resuming) is the
same code for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import pyarrow as pa

from . import columns as C
from .config import RunConfig
from .embedded import EmbeddedModel
from .init_images import PREPARED as INIT_IMAGE_COLUMNS
from .init_images import prepare_with_init_images
from .schema import prepare_batch
from .variations import image_column_check, prepare_images

# Every row after prepare: the reader's source columns, the prompt (or "" for an image), and prepare's own.
PREPARED = (C.SOURCE, C.SOURCE_ROW, C.PROMPT, C.KEY, C.SEED, C.NEGATIVE_PROMPT, C.PRIOR_GUIDANCE_SCALE,
            C.DECODER_GUIDANCE_SCALE, C.ERROR, C.ERROR_STAGE)


@dataclass(frozen=True)
class Task:
    name: str
    # The reader's per-file column check (None: the prompt-table rules).
    check_columns: Callable[[pa.Schema, str, str], None] | None
    prepare: Callable[..., pa.Table]  # a reader batch -> keys, seeds, settings and error columns
    prepare_settings: dict[str, Any]
    prepared: tuple[str, ...]  # the columns each row has after prepare, for the stages to read
    embedded: EmbeddedModel  # the model without --model
    # Sampling settings every metadata row records (the row's own guidance scales are columns of their own).
    row_settings: dict[str, Any]
    # What the CLIP score stage scores generated images against: the prompt's embedding, or the input image's.
    clip_reference: str = C.TEXT_EMB
    # Columns the stages need but the outputs do not hold.
    drop: tuple[str, ...] = field(default=())
    # Settings of the stages' own, by stage name (each stage's __init__ keywords; they may change what it reads).
    stage_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def stage_kwargs(self, name: str) -> dict[str, Any]:
        """The stage ``name``'s own settings in this task (the CLIP score stage's: its reference column)."""
        kwargs = dict(self.stage_settings.get(name, {}))
        if name == "clip_score":
            kwargs["reference"] = self.clip_reference
        return kwargs


def task_of(cfg: RunConfig) -> Task:
    steps = {"decoder_steps": cfg.decoder_steps, "super_res_steps": cfg.super_res_steps}
    scoring = {"clip_score": {"aesthetic_model": cfg.aesthetic_model, "safety_checker": cfg.safety_checker}}
    if cfg.task == "variations":
        return Task(
            name="variations",
            check_columns=image_column_check(cfg.image_column),
            prepare=prepare_images,
            prepare_settings=dict(run_seed=cfg.seed, decoder_guidance_scale=float(cfg.decoder_guidance_scale),
                                  image_column=cfg.image_column, storage_options=cfg.storage_options),
            prepared=(*PREPARED, C.SOURCE_IMAGE, C.SOURCE_IMAGE_PATH),
            embedded=EmbeddedModel(variations=True),
            row_settings=steps,
            clip_reference=C.IMAGE_EMB,
            stage_settings=scoring,
            # The decoder reads the prior's scale as its guidance switch; with no prior it is always 1, which is
            # not a setting of the outputs.
            drop=(C.PRIOR_GUIDANCE_SCALE,),
        )
    return Task(
        name="generate",
        check_columns=None,
        prepare=prepare_batch,
        prepare_settings=dict(run_seed=cfg.seed, decoder_guidance_scale=float(cfg.decoder_guidance_scale),
                              prior_guidance_scale=float(cfg.prior_guidance_scale)),
        prepared=PREPARED,
        embedded=EmbeddedModel(),
        row_settings={"prior_steps": cfg.prior_steps, **steps},
        stage_settings=scoring,
    )


def with_init_images(task: Task, cfg: RunConfig) -> Task:
    """``generate`` for an input with init images (pipeline.init_images): prepare fetches and checks them, the
    decoder starts from them."""
    return replace(
        task,
        prepare=prepare_with_init_images,
        prepare_settings=dict(**task.prepare_settings, strength=cfg.strength, decoder_steps=cfg.decoder_steps,
                              storage_options=cfg.storage_options),
        prepared=(*task.prepared, *INIT_IMAGE_COLUMNS),
        stage_settings={**task.stage_settings, "decoder": {"init_images": True}},
    )
