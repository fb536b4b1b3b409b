"""The optional CLIP score stage: embed every generated image with a CLIP vision tower and score it.

A row's score is the cosine between the L2-normalised CLIP embedding of its image and of a reference from the same
CLIP space: the prompt's CLIP text embedding (``text_emb``, from Karlo's own ViT-L/14 text tower) for text-to-image,
the input image's CLIP embedding (``img_emb``) for image variations. Scores are raw cosines in [-1, 1], as
clip-retrieval's embeddings give them and as Karlo's README reports CLIP-s (github.com/kakaobrain/karlo), not
torchmetrics' ``100 * max(cos, 0)``; the manifest records the convention and the tower.

The tower is the image encoder of an image-variations repo (kakaobrain/karlo-v1-alpha-image-variations: the
ViT-L/14 that pairs with Karlo's text encoder), or any CLIP model folder or URL: a ``CLIPVisionModelWithProjection``
or a whole ``CLIPModel`` (e.g. openai/clip-vit-large-patch14), with its ``preprocessor_config.json`` when it has one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from karlo_model import DTYPES, WeightsError, clip_tower, clip_vision
from karlo_model.clip_tower import Tower
from karlo_model.config import ConfigError as ModelConfigError
from karlo_model.weights import local_repo, read_json

from . import columns as C
from .actors import StageActor
from .config import ConfigError, RunConfig
from .measurement import MeasurementVisionEncoder
from .redact import display_url
from .stages import Batch, Stage

SCALE = "cosine"  # raw cosine in [-1, 1]; torchmetrics' CLIPScore would be 100 * max(cosine, 0)


def find_tower(path_or_url: str, storage_options: dict | None = None, *, weights: bool = True) -> Tower:
    """The vision tower at ``path_or_url`` (karlo_model.clip_tower), refused with a ConfigError that shows the URL
    without credentials."""
    try:
        return clip_tower.find_tower(path_or_url, storage_options, weights=weights, shown=display_url(path_or_url))
    except ModelConfigError as e:
        raise ConfigError(str(e)) from None


def clip_model_for(cfg: RunConfig, model: str, embedded_variations: str | None) -> str:
    """The run's vision tower: ``cfg.clip_model``; else the model itself when it is an image-variations repo; else,
    for the embedded tiny model, the embedded tiny image-variations model (same text encoder)."""
    if cfg.clip_model is not None:
        return cfg.clip_model
    if cfg.task == "variations":
        return model
    if embedded_variations is not None:
        return embedded_variations
    raise ConfigError(
        "--clip-score needs --clip-model: a text-to-image Karlo repo has no image encoder. Give "
        "kakaobrain/karlo-v1-alpha-image-variations (its ViT-L/14 pairs with Karlo's text encoder) or a CLIP model "
        "with the same embedding width"
    )


def check_tower(clip_model: str, model: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Refuse a tower whose embeddings are not in the CLIP space of the Karlo ``model``'s (its text encoder's
    projection width); returns what the manifest records about the scores."""
    try:
        tower = find_tower(clip_model, storage_options, weights=False)
    except WeightsError as e:  # a missing or unreadable config file
        raise ConfigError(f"CLIP model {display_url(clip_model)}: {e}") from None
    karlo_root = local_repo(model, [], storage_options, config_only=["text_encoder"])
    text_dim = int(read_json(karlo_root / "text_encoder" / "config.json")["projection_dim"])
    if tower.dim != text_dim:
        raise ConfigError(
            f"the CLIP model {display_url(clip_model)} embeds images in {tower.dim} dimensions but Karlo's CLIP "
            f"embeddings have {text_dim}: scores need both embeddings from one CLIP model (ViT-L/14 for Karlo, e.g. "
            "kakaobrain/karlo-v1-alpha-image-variations or openai/clip-vit-large-patch14)"
        )
    return {"model": display_url(clip_model), "layout": tower.layout, "dim": tower.dim, "scale": SCALE}


class ClipScoreStage(Stage):
    """CLIP vision tower: final images -> normalised CLIP image embeddings and their cosine with the reference."""

    name = "clip_score"
    components = ()
    outputs = (C.CLIP_IMAGE_EMB, C.CLIP_SCORE)

    def __init__(self, model: str, *, reference: str, **kwargs: Any):
        self.reference = reference  # the column holding each row's CLIP text embedding
        self.inputs = (C.KEY, C.IMAGE, reference)
        super().__init__(model, **kwargs)

    def load(self, model: str, *, device: str, dtype: str, storage_options: dict | None, skip_networks: bool) -> None:
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        self.tower = find_tower(model, storage_options, weights=not skip_networks)
        if skip_networks:
            self.model = MeasurementVisionEncoder(self.tower.dim)
        else:
            encoder = clip_vision.load_vision_encoder(self.tower.config, self.tower.weights_dir)
            self.model = encoder.to(self.device, self.dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def run(self, batch: Batch) -> Batch:
        images = list(batch[C.IMAGE])  # (H, W, 3) uint8 each
        embeds = clip_vision.encode(self.model, self.tower.processor, images, self.device, self.dtype)
        return self.score(embeds.float().cpu().numpy(), batch[self.reference])

    @staticmethod
    def score(image_embeds: np.ndarray, reference: np.ndarray) -> Batch:
        """(B, P) image and (B, P) reference embeddings -> normalised image embeddings and (B,) cosines."""
        image = torch.nn.functional.normalize(torch.as_tensor(image_embeds, dtype=torch.float32), dim=-1)
        ref = torch.nn.functional.normalize(torch.as_tensor(np.asarray(reference), dtype=torch.float32), dim=-1)
        return {C.CLIP_IMAGE_EMB: image.numpy(), C.CLIP_SCORE: (image * ref).sum(-1).numpy()}

    def empty(self, n: int) -> Batch:
        return {C.CLIP_IMAGE_EMB: np.zeros((n, self.tower.dim), np.float32), C.CLIP_SCORE: np.zeros(n, np.float32)}


class ClipScoreActor(StageActor):
    stage_class = ClipScoreStage
