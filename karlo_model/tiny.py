"""Build a random-weight Karlo in the exact diffusers on-disk layout: the embedded default and test model.

Its images are noise, but every byte of the loading, sampling and pipeline code runs as with real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import clip_vision
from . import text as text_lib
from .config import ImageProcessorConfig, KarloConfig
from .presets import preset
from .repo import EXPECTED_CLASSES, MODULE_CONFIGS, VARIATION_CLASSES, VARIATIONS_PIPELINE, build_module, randomize_
from .weights import save_component

# Library names as on the hub; text_proj is a pipeline-local module there ("unclip").
LIBRARIES = {"tokenizer": "transformers", "text_encoder": "transformers", "text_proj": "unclip",
             "image_encoder": "transformers", "feature_extractor": "transformers"}


def make_tiny_model(
    out_dir: str | Path, *, seed: int = 0, preset_name: str = "tiny", variations: bool = False
) -> Path:
    """Write a random-weight Karlo repo (model_index.json, per-component config + safetensors, tokenizer with
    the real CLIP vocabulary, scheduler configs) to ``out_dir``.

    ``variations`` writes the image-variations layout instead, as kakaobrain built
    kakaobrain/karlo-v1-alpha-image-variations from the text-to-image repo: the same seed gives the same text
    encoder, text_proj, decoder and super-res weights, no prior, plus a tiny CLIP vision tower in the text
    encoder's embedding width and its image processor.
    """
    out = Path(out_dir)
    config: KarloConfig = preset(preset_name)
    gen = torch.Generator().manual_seed(seed)
    for comp in MODULE_CONFIGS:
        module = build_module(config, comp)
        randomize_(module, gen)  # the prior too, so that the generator stream is the same in both layouts
        if variations and comp == "prior":
            continue
        weights = "diffusion_pytorch_model.safetensors"
        save_component(out / comp, getattr(config, comp).to_dict(), module, weights)
    encoder = text_lib.build_text_encoder(config.text_encoder)
    randomize_(encoder, gen)
    save_component(out / "text_encoder", config.text_encoder, encoder, "model.safetensors")
    text_lib.write_clip_vocabulary(out / "tokenizer")
    schedulers = ("decoder_scheduler", "super_res_scheduler") if variations else (
        "prior_scheduler", "decoder_scheduler", "super_res_scheduler")
    for name in schedulers:
        (out / name).mkdir(parents=True, exist_ok=True)
        sched = getattr(config, name).to_dict()
        (out / name / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    classes = EXPECTED_CLASSES
    index = {"_class_name": "UnCLIPPipeline", "_karlo_preset": preset_name, "_karlo_seed": seed}
    if variations:
        write_tiny_vision_tower(out, config.text_encoder["projection_dim"], gen)
        classes, index["_class_name"] = VARIATION_CLASSES, VARIATIONS_PIPELINE
    index.update({c: [LIBRARIES.get(c, "diffusers"), cls] for c, cls in classes.items()})
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def write_tiny_vision_tower(out: Path, projection: int, generator: torch.Generator) -> None:
    """A random CLIPVisionModelWithProjection with ``projection``-wide embeddings in ``out/image_encoder`` and the
    reference image processor config in ``out/feature_extractor``."""
    config = clip_vision.tiny_vision_config(projection)
    encoder = clip_vision.build_vision_encoder(config)
    randomize_(encoder, generator)
    save_component(out / "image_encoder", config, encoder, "model.safetensors")
    (out / "feature_extractor").mkdir(parents=True, exist_ok=True)
    processor = ImageProcessorConfig().to_dict()
    (out / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
