"""The model stages as plain callables on a dict of numpy arrays (one Ray Data batch).

Each stage loads the model components it needs once, in ``__init__``, and declares the columns it reads
(``inputs``), the columns it adds or replaces (``outputs``: its output dict holds exactly these) and the hand-off
columns it consumes (``consumes``). Rows already marked as errors pass through with zero-filled outputs. If a
batch raises, its rows are retried one at a time, and a row that still fails becomes an error row naming the stage
and the
exception: one bad row never takes its batch, its actor or the run down.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from karlo_model import DTYPES, MAX_LENGTH, Karlo, KarloConfig, PriorResult, TextEncoding, read_configs

from . import columns as C
from . import faults
from .actors import StageActor
from .image_cells import decode_image
from .measurement import MeasurementKarlo
from .redact import redact, secret_values

logger = logging.getLogger(__name__)

SCALES = (C.PRIOR_GUIDANCE_SCALE, C.DECODER_GUIDANCE_SCALE)
Batch = dict[str, np.ndarray]
RNG_STATE_BYTES = torch.Generator().get_state().numel()  # width of the hand-over column of generator states
# What the first stage (the prior, or the image encoder of variations) hands the decoder.
FIRST_STAGE_OUTPUTS = (C.TEXT_EMB, C.IMAGE_EMB, C.TEXT_HIDDEN, C.TEXT_MASK, C.NEG_TEXT_EMB, C.NEG_TEXT_HIDDEN,
                       C.NEG_TEXT_MASK, C.RNG_STATE)


class Stage:
    name: str
    components: tuple[str, ...]  # Karlo stages to load
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # the columns it adds or replaces (besides error and error_stage)
    consumes: tuple[str, ...] = ()
    secrets: frozenset[str] = frozenset()  # of the storage options, kept out of error texts

    def __init__(
        self,
        model: str,
        *,
        steps: int | None = None,  # sampling stages only
        device: str = "cpu",
        dtype: str = "float32",
        storage_options: dict | None = None,
        torch_threads: int | None = None,
        skip_networks: bool = False,
        lora: Sequence = (),  # karlo_model.lora.Adapter: merged into the stage's networks when they load
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.steps = steps
        self.lora = tuple(lora)
        self.secrets = frozenset(secret_values(storage_options))
        self.load(model, device=device, dtype=dtype, storage_options=storage_options, skip_networks=skip_networks)

    def load(self, model: str, *, device: str, dtype: str, storage_options: dict | None, skip_networks: bool) -> None:
        """Load the stage's networks once per actor into ``self.model`` (in measurement mode, their stand-in)."""
        if skip_networks:
            self.model = MeasurementKarlo(read_configs(model, storage_options))
        else:
            self.model = Karlo.from_pretrained(
                model, device=device, dtype=DTYPES[dtype], stages=self.components, storage_options=storage_options,
                lora=self.lora,
            )
        self.config = self.model.config

    @classmethod
    def reads(cls, **settings: Any) -> tuple[str, ...]:
        """The columns the stage reads with its own ``settings`` (its __init__ keywords beyond the common ones)."""
        return cls.inputs

    def run(self, batch: Batch) -> Batch:
        """The stage's outputs for rows that are all good."""
        raise NotImplementedError

    def empty(self, n: int) -> Batch:
        """Zero-filled outputs for n error rows."""
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        error = np.asarray(batch[C.ERROR], dtype=object).copy()
        error_stage = np.asarray(batch[C.ERROR_STAGE], dtype=object).copy()
        n = len(error)
        out = self.empty(n)  # np.zeros: pages never written cost nothing
        good = np.flatnonzero(error == "")
        for rows, result in self._run_rows(batch, good):
            if isinstance(result, Exception):
                error[rows] = redact(f"{type(result).__name__}: {result}", self.secrets)[:1000]
                error_stage[rows] = self.name
            elif len(rows) == n:  # the whole batch at once: take the outputs as they are, no copy
                for name, values in result.items():
                    out[name] = _like(values, out[name])
            else:
                for name, values in result.items():
                    out[name][rows] = values
        out[C.ERROR] = error
        out[C.ERROR_STAGE] = error_stage
        return out

    def _run_rows(self, batch: Batch, rows: np.ndarray):
        """Yield (rows, outputs or exception): the whole batch, or row by row after a failure."""
        if len(rows) == 0:
            return
        try:
            faults.inject(self.name, np.asarray(batch[C.KEY])[rows])
            yield rows, self.run(_take(batch, self.inputs, rows))
            return
        except Exception as e:  # noqa: BLE001 - any failure becomes per-row errors below
            if len(rows) == 1:
                logger.warning("%s stage failed on row %s: %s", self.name, batch[C.KEY][rows[0]],
                               redact(repr(e), self.secrets))
                yield rows, e
                return
            logger.warning("%s stage failed on a batch of %d rows (%s); retrying row by row", self.name, len(rows),
                           redact(repr(e), self.secrets))
        for row in rows:
            yield from self._run_rows(batch, np.array([row]))


def _like(values: np.ndarray, template: np.ndarray) -> np.ndarray:
    """``values`` in the dtype and shape of ``template`` (a copy only if the dtype differs)."""
    values = np.asarray(values, dtype=template.dtype)
    if values.shape != template.shape:
        raise ValueError(f"stage output of shape {values.shape}, expected {template.shape}")
    return values


def _take(batch: Batch, names: Sequence[str], rows: np.ndarray) -> Batch:
    # A copy even of every row: Arrow hands read-only arrays, which torch must not alias.
    return {name: np.asarray(batch[name])[rows] for name in names}


def _text(model: Karlo, batch: Batch, names: tuple[str, str, str]) -> TextEncoding:
    embeds, hidden, mask = names
    return model.text_encoding(batch[embeds], batch[hidden], batch[mask])


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy()


class PriorStage(Stage):
    """CLIP text encoder + diffusion prior: prompts -> text encodings and CLIP image embeddings."""

    name = "prior"
    components = ("prior",)
    inputs = (C.KEY, C.PROMPT, C.SEED, C.NEGATIVE_PROMPT) + SCALES
    outputs = (*FIRST_STAGE_OUTPUTS, C.PROMPT_TRUNCATED)

    def run(self, batch: Batch) -> Batch:
        r = self.model.prior_stage(
            [str(p) for p in batch[C.PROMPT]],
            [int(s) for s in batch[C.SEED]],
            steps=self.steps,
            prior_guidance_scale=batch[C.PRIOR_GUIDANCE_SCALE],
            decoder_guidance_scale=batch[C.DECODER_GUIDANCE_SCALE],
            negative_prompts=[str(p) for p in batch[C.NEGATIVE_PROMPT]],
        )
        return {**first_stage_outputs(r), C.PROMPT_TRUNCATED: r.text.truncated}

    def empty(self, n: int) -> Batch:
        return {**empty_first_stage_outputs(n, self.config), C.PROMPT_TRUNCATED: np.zeros(n, bool)}


def first_stage_outputs(r: PriorResult) -> Batch:
    """What the first stage (the prior, or the image encoder of variations) hands the decoder."""
    return {
        C.TEXT_EMB: _numpy(r.text.embeds),
        C.IMAGE_EMB: _numpy(r.image_embeds),
        C.TEXT_HIDDEN: _numpy(r.text.hidden),
        C.TEXT_MASK: r.text.mask.cpu().numpy(),
        C.NEG_TEXT_EMB: _numpy(r.negative.embeds),
        C.NEG_TEXT_HIDDEN: _numpy(r.negative.hidden),
        C.NEG_TEXT_MASK: r.negative.mask.cpu().numpy(),
        C.RNG_STATE: r.rng_state,
    }


def empty_first_stage_outputs(n: int, config: KarloConfig) -> Batch:
    """``first_stage_outputs`` of n error rows, zero-filled."""
    d, w, seq = config.text_encoder["projection_dim"], config.text_encoder["hidden_size"], MAX_LENGTH
    return {
        C.TEXT_EMB: np.zeros((n, d), np.float32),
        C.IMAGE_EMB: np.zeros((n, d), np.float32),
        C.TEXT_HIDDEN: np.zeros((n, seq, w), np.float32),
        C.TEXT_MASK: np.zeros((n, seq), bool),
        C.NEG_TEXT_EMB: np.zeros((n, d), np.float32),
        C.NEG_TEXT_HIDDEN: np.zeros((n, seq, w), np.float32),
        C.NEG_TEXT_MASK: np.zeros((n, seq), bool),
        C.RNG_STATE: np.zeros((n, RNG_STATE_BYTES), np.uint8),
    }


class DecoderStage(Stage):
    """Text projection + 64 px decoder: CLIP image embeddings -> small images."""

    name = "decoder"
    components = ("decoder",)
    inputs = (C.KEY, C.IMAGE_EMB, C.TEXT_EMB, C.TEXT_HIDDEN, C.TEXT_MASK, C.NEG_TEXT_EMB, C.NEG_TEXT_HIDDEN,
              C.NEG_TEXT_MASK, C.RNG_STATE) + SCALES
    outputs = (C.IMAGE_64, C.RNG_STATE)
    consumes = (C.TEXT_HIDDEN, C.TEXT_MASK, C.NEG_TEXT_EMB, C.NEG_TEXT_HIDDEN, C.NEG_TEXT_MASK)

    def __init__(self, model: str, *, init_images: bool = False, **kwargs: Any):
        """``init_images``: image-to-image rows (pipeline.init_images) read their init image and strength."""
        self.init_images = init_images
        self.inputs = self.reads(init_images=init_images)
        if init_images:
            self.consumes = (*self.consumes, C.INIT_IMAGE)
        super().__init__(model, **kwargs)

    @classmethod
    def reads(cls, *, init_images: bool = False) -> tuple[str, ...]:
        return (*cls.inputs, C.INIT_IMAGE, C.STRENGTH) if init_images else cls.inputs

    def run(self, batch: Batch) -> Batch:
        img2img = {}
        if self.init_images:
            # Decoded here (prepare checked them): encoded bytes travel between processes compactly.
            img2img = dict(init_images=[decode_image(data) if data else None for data in batch[C.INIT_IMAGE]],
                           strength=np.nan_to_num(np.asarray(batch[C.STRENGTH], np.float64), nan=1.0))
        r = self.model.decoder_stage(
            batch[C.IMAGE_EMB],
            _text(self.model, batch, (C.TEXT_EMB, C.TEXT_HIDDEN, C.TEXT_MASK)),
            _text(self.model, batch, (C.NEG_TEXT_EMB, C.NEG_TEXT_HIDDEN, C.NEG_TEXT_MASK)),
            batch[C.RNG_STATE],
            steps=self.steps,
            prior_guidance_scale=batch[C.PRIOR_GUIDANCE_SCALE],
            decoder_guidance_scale=batch[C.DECODER_GUIDANCE_SCALE],
            **img2img,
        )
        return {C.IMAGE_64: _numpy(r.image_64), C.RNG_STATE: r.rng_state}

    def empty(self, n: int) -> Batch:
        dec = self.config.decoder
        return {
            C.IMAGE_64: np.zeros((n, dec.in_channels, dec.sample_size, dec.sample_size), np.float32),
            C.RNG_STATE: np.zeros((n, RNG_STATE_BYTES), np.uint8),
        }


class SuperResStage(Stage):
    """64 -> 256 px super-resolution: small images -> final uint8 images."""

    name = "super_res"
    components = ("super_res",)
    inputs = (C.KEY, C.IMAGE_64, C.RNG_STATE)
    outputs = (C.IMAGE,)
    consumes = (C.IMAGE_64, C.RNG_STATE)

    def run(self, batch: Batch) -> Batch:
        return {C.IMAGE: self.model.super_res_stage(batch[C.IMAGE_64], batch[C.RNG_STATE], steps=self.steps)}

    def empty(self, n: int) -> Batch:
        size = self.config.image_size
        return {C.IMAGE: np.zeros((n, size, size, 3), np.uint8)}


class PriorActor(StageActor):
    stage_class = PriorStage


class DecoderActor(StageActor):
    stage_class = DecoderStage


class SuperResActor(StageActor):
    stage_class = SuperResStage
