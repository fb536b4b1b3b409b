"""The optional CLIP score stage: embed every generated image with a CLIP vision tower and score it.

A row's score is the cosine between the L2-normalised CLIP embedding of its image and of a reference from the same
CLIP space: the prompt's CLIP text embedding (``text_emb``, from Karlo's own ViT-L/14 text tower) for text-to-image,
the input image's CLIP embedding (``img_emb``) for image variations. Scores are raw cosines in [-1, 1], as
clip-retrieval's embeddings give them and as Karlo's README reports CLIP-s (reference formats.md §4), not
torchmetrics' ``100 * max(cos, 0)``; the manifest records the convention and the tower.

The tower is the image encoder of an image-variations repo (kakaobrain/karlo-v1-alpha-image-variations: the
ViT-L/14 that pairs with Karlo's text encoder), or any CLIP model folder or URL: a ``CLIPVisionModelWithProjection``
or a whole ``CLIPModel`` (e.g. openai/clip-vit-large-patch14), with its ``preprocessor_config.json`` when it has one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

from karlo_model import clip_vision
from karlo_model.karlo import VARIATION_CLASSES, VARIATIONS_PIPELINE, read_repo_configs
from karlo_model.weights import WEIGHT_FILES, WeightsError, cache_root, is_remote, local_repo, read_json

from . import columns as C
from .config import ConfigError, RunConfig
from .reader import display_url
from .stages import DTYPES, Batch, Stage

SCALE = "cosine"  # raw cosine in [-1, 1]; torchmetrics' CLIPScore would be 100 * max(cosine, 0)
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class Tower:
    """A CLIP vision tower on local disk: where its weights are, its config and its image processor."""

    weights_dir: Path
    config: dict[str, Any]  # CLIPVisionConfig as a dict, projection_dim included
    processor: clip_vision.ImageProcessorConfig
    layout: str  # "image-variations repo", "CLIPVisionModelWithProjection" or "CLIPModel"

    @property
    def dim(self) -> int:
        return clip_vision.projection_dim(self.config)


def find_tower(path_or_url: str, storage_options: dict | None = None, *, weights: bool = True) -> Tower:
    """Read the layout at ``path_or_url`` (copying a remote one into the model cache; only configs unless
    ``weights``) and describe its vision tower. Raises ConfigError for anything that is not a CLIP model."""
    shown = display_url(path_or_url)
    if _is_repo(path_or_url, storage_options):
        index = read_json(local_repo(path_or_url, [], storage_options) / "model_index.json")
        if index.get("_class_name") != VARIATIONS_PIPELINE:
            raise ConfigError(
                f"{shown} is a {index.get('_class_name')} repo without an image encoder; for CLIP scores give an "
                "image-variations repo (kakaobrain/karlo-v1-alpha-image-variations) or a CLIP model folder"
            )
        wanted = ["feature_extractor", "image_encoder"] if weights else ["feature_extractor"]
        others = [c for c in VARIATION_CLASSES if c not in wanted and c != "tokenizer"]
        root = local_repo(path_or_url, wanted, storage_options, config_only=others)
        config = read_repo_configs(root)  # checks the whole repo, as loading it for generation would
        return Tower(root / "image_encoder", dict(config.image_encoder), config.feature_extractor,
                     "image-variations repo")
    folder = _local_folder(path_or_url, storage_options, weights=weights)
    data = read_json(folder / "config.json")
    model_type = data.get("model_type")
    if model_type == "clip_vision_model":
        config, layout = data, "CLIPVisionModelWithProjection"
    elif model_type == "clip" and isinstance(data.get("vision_config"), dict):
        config = {**data["vision_config"], "projection_dim": data.get("projection_dim", 512)}
        layout = "CLIPModel"
    else:
        raise ConfigError(f"{shown}: config.json describes a {model_type!r} model, not a CLIP model or vision tower")
    processor_file = folder / PROCESSOR_FILE
    try:
        processor = (clip_vision.ImageProcessorConfig.from_dict(read_json(processor_file))
                     if processor_file.is_file() else clip_vision.ImageProcessorConfig())
    except ValueError as e:
        raise ConfigError(f"{shown}/{PROCESSOR_FILE}: {e}") from None
    size = config.get("image_size", 224)
    if processor.crop_size != (size, size):
        raise ConfigError(f"{shown}: the image processor crops to {processor.crop_size} but the tower takes "
                          f"{size}x{size} images")
    return Tower(folder, config, processor, layout)


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


def reference_column(cfg: RunConfig) -> str:
    """What generated images are scored against: the prompt, or the input image of a variation."""
    return C.IMAGE_EMB if cfg.task == "variations" else C.TEXT_EMB


class ClipScoreStage(Stage):
    """CLIP vision tower: final images -> normalised CLIP image embeddings and their cosine with the reference."""

    name = "clip_score"
    components = ()

    def __init__(self, model: str, *, reference: str, **kwargs: Any):
        self.reference = reference  # the column holding each row's CLIP text embedding
        self.inputs = (C.KEY, C.IMAGE, reference)
        super().__init__(model, **kwargs)

    def load(self, model: str, *, device: str, dtype: str, storage_options: dict | None, skip_networks: bool) -> None:
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        self.tower = find_tower(model, storage_options, weights=not skip_networks)
        self.model = None
        if not skip_networks:
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


def _is_repo(path_or_url: str, storage_options: dict | None) -> bool:
    fs, root = fsspec.core.url_to_fs(path_or_url, **(storage_options or {}))
    if not fs.isdir(root):
        raise ConfigError(f"CLIP model {display_url(path_or_url)} is not a folder")
    return fs.isfile(f"{root.rstrip('/')}/model_index.json")


def _local_folder(path_or_url: str, storage_options: dict | None, *, weights: bool) -> Path:
    """A local folder with a plain model folder's config, image processor config and (if ``weights``) one weight
    file; remote folders are copied once per machine into the model cache, as ``local_repo`` does for Karlo repos."""
    if not is_remote(path_or_url):
        return Path(str(path_or_url).removeprefix("file://"))
    fs, root = fsspec.core.url_to_fs(path_or_url, **(storage_options or {}))
    root = root.rstrip("/")
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    files = [n for n in ("config.json", PROCESSOR_FILE) if n in names]
    weight = next((w for w in WEIGHT_FILES if w in names and not w.endswith(".index.json")), None)
    if weights:
        if weight is None:
            raise ConfigError(f"{display_url(path_or_url)}: no single-file weights ({', '.join(WEIGHT_FILES[:2])})")
        files.append(weight)
    dest = cache_root() / "models" / hashlib.sha256(path_or_url.rstrip("/").encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per machine, however many actors start at once
        for name in files:
            target = dest / name
            if target.exists() and target.stat().st_size == fs.size(f"{root}/{name}"):
                continue
            tmp = dest / f".tmp-{name}"
            fs.get_file(f"{root}/{name}", str(tmp))
            os.replace(tmp, target)
    return dest
