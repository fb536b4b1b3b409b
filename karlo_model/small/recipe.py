"""The one recipe that trains the small Karlo from scratch and writes it as a diffusers-format repo.

``train_small_model(out, seed)`` runs karlo_model.small.train's stages in order and writes ``out`` in the layout of
kakaobrain/karlo-v1-alpha (model_index.json, one folder per component, the CLIP tokenizer), plus the CLIP vision
tower and its image processor (``image_encoder/``, ``feature_extractor/``) from which ``variations_layout`` makes
the image-variations sibling, and ``training.json``: the seed, the budget, each stage's steps, time and final loss,
and the sha256 of every weight file. Weights are stored in float16 (the model loads them in any dtype).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..karlo import Karlo
from ..presets import SMALL_IMAGE_PROCESSOR, SMALL_VISION, preset
from ..repo import EXPECTED_CLASSES, VARIATION_CLASSES, VARIATIONS_PIPELINE, clip_tokenizer
from ..text import write_clip_vocabulary
from ..tiny import LIBRARIES
from ..weights import file_digest, save_component
from . import evaluate, train, world

PRESET = "small"
RECORD = "training.json"
# Each stage draws from its own generators, seeded from the run's seed and the stage.
STAGE_SEEDS = {"corpus": 0, "clip": 1, "prior": 2, "decoder": 3, "super_res": 4}


def train_small_model(out_dir: str | Path, *, seed: int = 0, budget: train.Budget | None = None,
                      log: Callable[[str], None] = print) -> Path:
    """Train every component and write the repo to ``out_dir`` (replaced if it exists). -> ``out_dir``."""
    budget = budget or train.Budget()
    config = preset(PRESET)
    start = time.monotonic()
    stage_seed = {k: seed * 100 + v for k, v in STAGE_SEEDS.items()}
    corpus = train.make_corpus(budget.scenes, np.random.default_rng(stage_seed["corpus"]))
    captions = train.Captions(clip_tokenizer())
    text, vision, clip_record = train.train_clip(config, SMALL_VISION, SMALL_IMAGE_PROCESSOR, corpus, captions,
                                                 budget, stage_seed["clip"], log)
    embeds = train.image_embeddings(vision, SMALL_IMAGE_PROCESSOR, corpus.images)
    prior, prior_record = train.train_prior(config, corpus, embeds, text, captions, budget, stage_seed["prior"], log)
    text_proj, decoder, decoder_record = train.train_decoder(config, corpus, embeds, text, captions, budget,
                                                             stage_seed["decoder"], log)
    first, last, sr_record = train.train_super_res(config, budget, stage_seed["super_res"], log)
    modules = {"text_encoder": text, "image_encoder": vision, "prior": prior, "text_proj": text_proj,
               "decoder": decoder, "super_res_first": first, "super_res_last": last}
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    _write_repo(out, config, modules)
    record = {
        "command": f"karlo train-small {out} --seed {seed}" + (" --smoke" if budget == train.Budget.smoke() else ""),
        "seed": seed,
        "preset": PRESET,
        "budget": dataclasses.asdict(budget),
        "stages": {"clip": clip_record, "prior": prior_record, "decoder": decoder_record, "super_res": sr_record},
        "training_seconds": round(time.monotonic() - start, 1),
        "evaluation": evaluation(out, budget, log),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bfloat16_autocast": train.native_bfloat16(),
        "machine": platform.machine(),
        "sha256": {str(p.relative_to(out)): file_digest(p) for p in sorted(out.rglob("*.safetensors"))},
    }
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out


def evaluation(repo: Path, budget: train.Budget, log: Callable[[str], None]) -> dict[str, float]:
    """karlo_model.small.evaluate's measures of the written repo (as loaded from its float16 files)."""
    scenes = world.evaluation_scenes(budget.evaluation_scenes)
    start = time.monotonic()
    steps = evaluate.Steps(*budget.evaluation_steps)
    result = {f"{k}_right": v for k, v in evaluate.adherence(Karlo.from_pretrained(repo), scenes, steps=steps).items()}
    with tempfile.TemporaryDirectory(prefix="karlo-small-") as tmp:
        clip = Karlo.from_pretrained(variations_layout(repo, Path(tmp)), stages=("image_encoder",))
        result["clip_top1_of_10"] = evaluate.clip_retrieval(clip, scenes)
    result |= {"scenes": len(scenes), "seconds": round(time.monotonic() - start, 1)}
    log(f"evaluation: {result}")
    return result


def _write_repo(out: Path, config, modules: dict[str, torch.nn.Module]) -> None:
    for comp, module in modules.items():
        weights = "model.safetensors" if comp.endswith("_encoder") else "diffusion_pytorch_model.safetensors"
        cfg = SMALL_VISION if comp == "image_encoder" else getattr(config, comp)
        save_component(out / comp, cfg if isinstance(cfg, dict) else cfg.to_dict(), module.half(), weights)
    write_clip_vocabulary(out / "tokenizer")
    for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "scheduler_config.json").write_text(json.dumps(getattr(config, name).to_dict(), indent=2) + "\n")
    (out / "feature_extractor").mkdir(parents=True, exist_ok=True)
    (out / "feature_extractor" / "preprocessor_config.json").write_text(
        json.dumps(SMALL_IMAGE_PROCESSOR.to_dict(), indent=2) + "\n")
    _write_index(out, EXPECTED_CLASSES, "UnCLIPPipeline")


def _write_index(out: Path, classes: dict[str, str], pipeline: str) -> None:
    index = {"_class_name": pipeline, "_karlo_preset": PRESET}
    index.update({c: [LIBRARIES.get(c, "diffusers"), cls] for c, cls in classes.items()})
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def variations_layout(repo: Path, out: Path) -> Path:
    """The image-variations sibling of a trained repo in ``out``: the same files without the prior, with the
    vision tower, as kakaobrain/karlo-v1-alpha-image-variations relates to karlo-v1-alpha."""
    for comp in VARIATION_CLASSES:
        shutil.copytree(repo / comp, out / comp, dirs_exist_ok=True)
    _write_index(out, VARIATION_CLASSES, VARIATIONS_PIPELINE)
    return out
