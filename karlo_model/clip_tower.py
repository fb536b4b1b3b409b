"""Finding the CLIP vision tower in a folder or URL: the image encoder of an image-variations repo
(kakaobrain/karlo-v1-alpha-image-variations: the ViT-L/14 that pairs with Karlo's text encoder), or a plain CLIP
model folder: a ``CLIPVisionModelWithProjection`` or a whole ``CLIPModel`` (e.g. openai/clip-vit-large-patch14),
with its ``preprocessor_config.json`` when it has one (transformers' defaults otherwise)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from .clip_vision import projection_dim
from .config import ConfigError, ImageProcessorConfig
from .fetch import is_remote, local_copy
from .repo import VARIATIONS_PIPELINE, fetch_components, read_repo_configs
from .weights import WEIGHT_FILES, local_repo, read_json, weight_file

PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class Tower:
    """A CLIP vision tower on local disk: where its weights are, its config and its image processor."""

    weights_dir: Path
    config: dict[str, Any]  # CLIPVisionConfig as a dict, projection_dim included
    processor: ImageProcessorConfig
    layout: str  # "image-variations repo", "CLIPVisionModelWithProjection" or "CLIPModel"

    @property
    def dim(self) -> int:
        return projection_dim(self.config)


def find_tower(
    path_or_url: str, storage_options: dict | None = None, *, weights: bool = True, shown: str | None = None
) -> Tower:
    """Read the layout at ``path_or_url`` (copying a remote one into the model cache; only configs unless
    ``weights``) and describe its vision tower. Raises ConfigError for anything that is not a CLIP model; messages
    name the model as ``shown`` (default: ``path_or_url``)."""
    shown = shown or path_or_url
    if _is_repo(path_or_url, storage_options, shown):
        index = read_json(local_repo(path_or_url, [], storage_options) / "model_index.json")
        if index.get("_class_name") != VARIATIONS_PIPELINE:
            raise ConfigError(
                f"{shown} is a {index.get('_class_name')} repo without an image encoder; for CLIP scores give an "
                "image-variations repo (kakaobrain/karlo-v1-alpha-image-variations) or a CLIP model folder"
            )
        root, _ = fetch_components(path_or_url, ["image_encoder"] if weights else [], storage_options)
        config = read_repo_configs(root)  # checks the whole repo, as loading it for generation would
        return Tower(root / "image_encoder", dict(config.image_encoder), config.feature_extractor,
                     "image-variations repo")
    folder = _local_folder(path_or_url, storage_options, weights=weights, shown=shown)
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
        processor = (ImageProcessorConfig.from_dict(read_json(processor_file))
                     if processor_file.is_file() else ImageProcessorConfig())
    except ValueError as e:
        raise ConfigError(f"{shown}/{PROCESSOR_FILE}: {e}") from None
    size = config.get("image_size", 224)
    if processor.crop_size != (size, size):
        raise ConfigError(f"{shown}: the image processor crops to {processor.crop_size} but the tower takes "
                          f"{size}x{size} images")
    return Tower(folder, config, processor, layout)


def _is_repo(path_or_url: str, storage_options: dict | None, shown: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path_or_url, **(storage_options or {}))
    if not fs.isdir(root):
        raise ConfigError(f"CLIP model {shown} is not a folder")
    return fs.isfile(f"{root.rstrip('/')}/model_index.json")


def _local_folder(path_or_url: str, storage_options: dict | None, *, weights: bool, shown: str) -> Path:
    """A local folder with a plain model folder's config, image processor config and (if ``weights``) one weight
    file; remote folders are copied once per machine into the model cache."""
    if not is_remote(path_or_url):
        return Path(str(path_or_url).removeprefix("file://"))

    def files(fs, root: str) -> list[str]:
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        chosen = [n for n in ("config.json", PROCESSOR_FILE) if n in names]
        if weights:
            weight = weight_file(names, sharded=False)
            if weight is None:
                raise ConfigError(f"{shown}: no single-file weights ({', '.join(WEIGHT_FILES[:2])})")
            chosen.append(weight)
        return chosen

    return local_copy(path_or_url, files, storage_options)
