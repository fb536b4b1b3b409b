"""The optional CLIP score stage: embed every generated image with a CLIP vision tower and score it.

A row's score is the cosine between the L2-normalised CLIP embedding of its image and of a reference from the same
CLIP space: the prompt's CLIP text embedding (``text_emb``, from Karlo's own ViT-L/14 text tower) for text-to-image,
the input image's CLIP embedding (``img_emb``) for image variations. Scores are raw cosines in [-1, 1], as
clip-retrieval's embeddings give them and as Karlo's README reports CLIP-s (github.com/kakaobrain/karlo), not
torchmetrics' ``100 * max(cos, 0)``; the manifest records the convention and the tower.

The tower is the image encoder of an image-variations repo (kakaobrain/karlo-v1-alpha-image-variations: the
ViT-L/14 that pairs with Karlo's text encoder), or any CLIP model folder or URL: a ``CLIPVisionModelWithProjection``
or a whole ``CLIPModel`` (e.g. openai/clip-vit-large-patch14), with its ``preprocessor_config.json`` when it has one.

Two curation scores ride on the same stage, each with its own model: LAION's aesthetic predictor reads the tower's
image embeddings (karlo_model.aesthetic), so it needs a ViT-L/14 tower for its published weights; the Stable
Diffusion safety checker (karlo_model.safety_checker) has a ViT-L/14 tower of its own, whose embeddings are the
score tower's when the two towers are equal tensor for tensor (same config and image processor too), and are
computed by a second forward otherwise, on the same preprocessed pixels where the processors agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from karlo_model import DTYPES, WeightsError, clip_tower, clip_vision
from karlo_model.aesthetic import load_aesthetic_predictor, local_file
from karlo_model.clip_tower import Tower
from karlo_model.config import ConfigError as ModelConfigError
from karlo_model.safety_checker import (
    N_CONCEPTS,
    N_SPECIAL_CARE,
    SafetyChecker,
    check_safety_checker,
    load_safety_checker,
)
from karlo_model.weights import local_repo, read_json, weight_file

from . import columns as C
from .actors import StageActor
from .config import ConfigError, RunConfig
from .embedded import EmbeddedModel, default_model
from .manifest import cached_digest
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


def plan_scoring(cfg: RunConfig, model: str, reference: str) -> tuple[str | EmbeddedModel | None,
                                                                      dict[str, Any] | None, dict[str, Any] | None]:
    """For a run on the Karlo ``model`` (the driver's copy) whose scores compare with the ``reference`` column:
    (the vision tower the stage actors load, what the manifest records of the CLIP scores, the curation models'
    records or None); all None without the score stage. Raises ConfigError for anything unusable."""
    if not cfg.clip_score:
        return None, None, None
    clip_model = clip_model_for(cfg, model, default_model(variations=True) if cfg.model is None else None)
    record = {**check_tower(clip_model, model, cfg.storage_options), "reference": reference,
              "min": cfg.min_clip_score}
    # The embedded default: each node builds its own copy.
    ref = EmbeddedModel(variations=True) if cfg.model is None and cfg.clip_model is None else clip_model
    return ref, record, check_scorers(cfg, record["dim"]) or None


def check_scorers(cfg: RunConfig, tower_dim: int) -> dict[str, dict[str, Any]]:
    """Load and check the run's curation models on the driver, before Ray starts (a bad file is a ConfigError
    naming it and its keys); returns what the manifest and the run's identity record of each, the sha256 of its
    weights included, so that a rerun with other weights is refused like any other settings change."""
    records: dict[str, dict[str, Any]] = {}
    so = cfg.storage_options
    if cfg.aesthetic_model is not None:
        shown = display_url(cfg.aesthetic_model)
        try:
            predictor = load_aesthetic_predictor(cfg.aesthetic_model, so)
            path = local_file(cfg.aesthetic_model, so)
        except WeightsError as e:
            raise ConfigError(f"aesthetic model {shown}: {e}") from None
        if predictor.input_dim != tower_dim:
            raise ConfigError(f"the aesthetic model {shown} reads {predictor.input_dim}-dimensional CLIP image "
                              f"embeddings but the CLIP tower embeds images in {tower_dim} (the published predictor "
                              "reads CLIP ViT-L/14's 768)")
        records["aesthetic_score"] = {"model": shown, "sha256": cached_digest(path), "dim": predictor.input_dim,
                                      "min": cfg.min_aesthetic}
    if cfg.safety_checker is not None:
        shown = display_url(cfg.safety_checker)
        tower = find_safety_tower(cfg.safety_checker, so)
        try:
            check_safety_checker(tower.config, tower.weights_dir)
        except WeightsError as e:
            raise ConfigError(f"safety checker {shown}: {e}") from None
        name = weight_file([p.name for p in tower.weights_dir.iterdir()], sharded=False)
        records["safety_checker"] = {"model": shown, "file": name,
                                     "sha256": cached_digest(tower.weights_dir / name), "dim": tower.dim,
                                     "concepts": N_CONCEPTS, "special_care_concepts": N_SPECIAL_CARE,
                                     "drop_unsafe": cfg.drop_unsafe}
    return records


def find_safety_tower(path_or_url: str, storage_options: dict | None, *, weights: bool = True) -> Tower:
    """A safety checker's folder (the config.json of a CLIPConfig, its weights and image processor config) as a
    Tower: the checker's vision tower, on local disk."""
    shown = display_url(path_or_url)
    try:
        tower = find_tower(path_or_url, storage_options, weights=weights)
    except (ConfigError, WeightsError) as e:
        raise ConfigError(f"safety checker {shown}: {e}") from None
    if tower.layout != "CLIPModel":
        raise ConfigError(f"safety checker {shown}: its config.json must be a CLIPConfig (model_type 'clip', as "
                          f"StableDiffusionSafetyChecker saves it), not a {tower.layout}")
    return tower


_TOWER_CONFIG_KEYS = ("hidden_act", "layer_norm_eps", "num_attention_heads", "image_size", "patch_size")


def same_tower(encoder: torch.nn.Module, tower: Tower, checker: SafetyChecker, checker_tower: Tower) -> bool:
    """Whether the safety checker's tower computes the score tower's embeddings: the same image processor, config
    and tensors (keys match: both are CLIPVisionModelWithProjection's)."""
    if tower.processor != checker_tower.processor:
        return False
    a, b = encoder.vision_model.config, checker.vision_model.config
    if any(getattr(a, k) != getattr(b, k) for k in _TOWER_CONFIG_KEYS):
        return False
    mine, theirs = encoder.state_dict(), checker.tower_state()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]) for k in mine)


class ClipScoreStage(Stage):
    """CLIP vision tower: final images -> normalised CLIP image embeddings and their cosine with the reference."""

    name = "clip_score"
    components = ()
    outputs = (C.CLIP_IMAGE_EMB, C.CLIP_SCORE)  # with the curation models: see __init__
    aesthetic_outputs = (C.AESTHETIC_SCORE,)
    safety_outputs = (C.NSFW, C.NSFW_CONCEPT_SCORES, C.NSFW_SPECIAL_CARE_SCORES)

    def __init__(self, model: str, *, reference: str, aesthetic_model: str | None = None,
                 safety_checker: str | None = None, **kwargs: Any):
        self.reference = reference  # the column holding each row's CLIP text embedding
        self.aesthetic_model, self.safety_checker = aesthetic_model, safety_checker
        self.inputs = self.reads(reference=reference)
        self.outputs = (type(self).outputs + (self.aesthetic_outputs if aesthetic_model is not None else ())
                        + (self.safety_outputs if safety_checker is not None else ()))
        super().__init__(model, **kwargs)

    @classmethod
    def reads(cls, *, reference: str, aesthetic_model: str | None = None,
              safety_checker: str | None = None) -> tuple[str, ...]:
        """The images and the ``reference`` embeddings; the curation models read the same images."""
        return (C.KEY, C.IMAGE, reference)

    def load(self, model: str, *, device: str, dtype: str, storage_options: dict | None, skip_networks: bool) -> None:
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        self.tower = find_tower(model, storage_options, weights=not skip_networks)
        self.model = self.aesthetic = self.checker = None
        self.shares_tower = False  # the safety checker reads the score tower's embeddings
        if self.safety_checker is not None:
            self.checker_tower = find_safety_tower(self.safety_checker, storage_options, weights=not skip_networks)
        if skip_networks:  # measurement mode: the scores zero-filled, as the networks would fill them
            self.model = MeasurementVisionEncoder(self.tower.dim)
            return
        encoder = clip_vision.load_vision_encoder(self.tower.config, self.tower.weights_dir)
        if self.aesthetic_model is not None:
            # float32 whatever the stage's dtype: a 3.7 MB MLP, and the score is compared with thresholds.
            self.aesthetic = load_aesthetic_predictor(self.aesthetic_model, storage_options).to(self.device)
        if self.safety_checker is not None:
            checker = load_safety_checker(self.checker_tower.config, self.checker_tower.weights_dir)
            self.shares_tower = same_tower(encoder, self.tower, checker, self.checker_tower)
            if self.shares_tower:
                checker.drop_tower()
            # The concept embeddings stay float32; only the tower runs in the stage's dtype.
            self.checker = checker.to(self.device)
            if not self.shares_tower:
                checker.vision_model.to(self.dtype)
                checker.visual_projection.to(self.dtype)
        self.model = encoder.to(self.device, self.dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def run(self, batch: Batch) -> Batch:
        images = list(batch[C.IMAGE])  # (H, W, 3) uint8 each
        pixels = clip_vision.preprocess(images, self.tower.processor, self.device)  # (B, 3, 224, 224) float32
        embeds = self.model(pixel_values=pixels.to(self.dtype)).image_embeds  # (B, P), not normalised
        # Every declared output: the curation scores below, zeros for those measurement mode does not compute.
        out = {**self.empty(len(images)), **self.score(embeds.float().cpu().numpy(), batch[self.reference])}
        if self.aesthetic is not None:
            out[C.AESTHETIC_SCORE] = self.aesthetic(embeds.float()).cpu().numpy()
        if self.checker is not None:
            out.update(self.safety(images, pixels, embeds))
        return out

    def safety(self, images: list[np.ndarray], pixels: torch.Tensor, embeds: torch.Tensor) -> Batch:
        """The safety checker's flags and scores, from the score tower's embeddings when the towers are equal,
        else from its own tower's forward (on the same pixels when the image processors agree)."""
        if not self.shares_tower:
            if self.checker_tower.processor != self.tower.processor:
                pixels = clip_vision.preprocess(images, self.checker_tower.processor, self.device)
            embeds = self.checker.image_embeds(pixels.to(self.dtype))  # (B, P) of the checker's tower
        s = self.checker.scores(embeds)
        return {C.NSFW: s.nsfw, C.NSFW_CONCEPT_SCORES: s.concept_scores,
                C.NSFW_SPECIAL_CARE_SCORES: s.special_care_scores}

    @staticmethod
    def score(image_embeds: np.ndarray, reference: np.ndarray) -> Batch:
        """(B, P) image and (B, P) reference embeddings -> normalised image embeddings and (B,) cosines."""
        image = torch.nn.functional.normalize(torch.as_tensor(image_embeds, dtype=torch.float32), dim=-1)
        ref = torch.nn.functional.normalize(torch.as_tensor(np.asarray(reference), dtype=torch.float32), dim=-1)
        return {C.CLIP_IMAGE_EMB: image.numpy(), C.CLIP_SCORE: (image * ref).sum(-1).numpy()}

    def empty(self, n: int) -> Batch:
        out = {C.CLIP_IMAGE_EMB: np.zeros((n, self.tower.dim), np.float32), C.CLIP_SCORE: np.zeros(n, np.float32)}
        if self.aesthetic_model is not None:
            out[C.AESTHETIC_SCORE] = np.zeros(n, np.float32)
        if self.safety_checker is not None:
            out.update({C.NSFW: np.zeros(n, bool), C.NSFW_CONCEPT_SCORES: np.zeros((n, N_CONCEPTS), np.float32),
                        C.NSFW_SPECIAL_CARE_SCORES: np.zeros((n, N_SPECIAL_CARE), np.float32)})
        return out


class ClipScoreActor(StageActor):
    stage_class = ClipScoreStage
