"""Build a random-weight Karlo in the exact diffusers on-disk layout: the embedded default and test model.

Its images are noise, but every byte of the loading, sampling and pipeline code runs as with real weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import text as text_lib
from .config import KarloConfig, preset
from .karlo import EXPECTED_CLASSES, MODULE_CONFIGS, build_module
from .weights import save_component

# Library names as on the hub; text_proj is a pipeline-local module there ("unclip").
LIBRARIES = {"tokenizer": "transformers", "text_encoder": "transformers", "text_proj": "unclip"}


@torch.no_grad()
def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded init of every parameter: N(0, 0.25/fan_in) weights, small biases, norms near identity.

    Done by hand rather than by torch's default init so the same seed gives the same model everywhere. The
    gain is below 1 so that the random networks are not chaotic: with unit gain, guidance at scale 8 and the
    1/sqrt(alpha_bar) of early steps amplify float rounding differences (batch size, BLAS kernels) into
    several uint8 levels, which would hide real determinism bugs in tests.
    """
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(p.shape, generator=generator)
        if "norm" in name or "layer_norm" in name or name.endswith("clip_std"):
            p.copy_(1.0 + 0.1 * noise if leaf != "bias" else 0.02 * noise)
            if name.endswith("clip_std"):
                p.abs_()
        elif leaf == "bias" or p.dim() < 2:
            p.copy_(0.02 * noise)
        else:
            fan_in = p[0].numel()
            p.copy_(0.5 * noise / math.sqrt(fan_in))


def make_tiny_model(out_dir: str | Path, *, seed: int = 0, preset_name: str = "tiny") -> Path:
    """Write a random-weight Karlo repo (model_index.json, per-component config + safetensors, tokenizer with
    the real CLIP vocabulary, scheduler configs) to ``out_dir``."""
    out = Path(out_dir)
    config: KarloConfig = preset(preset_name)
    gen = torch.Generator().manual_seed(seed)
    for comp in MODULE_CONFIGS:
        module = build_module(config, comp)
        randomize_(module, gen)
        weights = "diffusion_pytorch_model.safetensors"
        save_component(out / comp, getattr(config, comp).to_dict(), module, weights)
    encoder = text_lib.build_text_encoder(config.text_encoder)
    randomize_(encoder, gen)
    save_component(out / "text_encoder", config.text_encoder, encoder, "model.safetensors")
    text_lib.write_clip_vocabulary(out / "tokenizer")
    for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        (out / name).mkdir(parents=True, exist_ok=True)
        sched = getattr(config, name).to_dict()
        (out / name / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    index = {"_class_name": "UnCLIPPipeline", "_karlo_preset": preset_name, "_karlo_seed": seed}
    index.update({c: [LIBRARIES.get(c, "diffusers"), cls] for c, cls in EXPECTED_CLASSES.items()})
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
