"""How well a model of the synthetic world does on held-out captions, judged against the renderer's ground truth:

* adherence: the fraction of generated images whose colour, shape and background the judge
  (karlo_model.small.judge) reads as the caption's;
* CLIP retrieval: for each held-out scene's render, whether its own caption scores above nine others (captions
  of other evaluation scenes that differ from it) under the model's CLIP towers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..karlo import Karlo
from . import judge, world


@dataclass(frozen=True)
class Steps:
    prior: int = 25
    decoder: int = 25
    super_res: int = 7


def adherence(model: Karlo, scenes: Sequence[world.Scene], *, steps: Steps = Steps(), batch: int = 10,
              decoder_guidance_scale: float = 8.0, seed: int = 0) -> dict[str, float]:
    """Fractions of images generated from the scenes' full captions (seed + i for row i) read right."""
    right = {"colour": 0, "shape": 0, "background": 0}
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        images = model.generate([s.caption() for s in chunk], [seed + start + i for i in range(len(chunk))],
                                prior_steps=steps.prior, decoder_steps=steps.decoder,
                                super_res_steps=steps.super_res, decoder_guidance_scale=decoder_guidance_scale).images
        for scene, image in zip(chunk, images):
            reading = judge.read(image)
            for attr in right:
                right[attr] += getattr(reading, attr) == getattr(scene, attr)
    return {attr: n / len(scenes) for attr, n in right.items()}


@torch.no_grad()
def clip_retrieval(clip: Karlo, scenes: Sequence[world.Scene], *, candidates: int = 10, seed: int = 0) -> float:
    """Top-1 accuracy of each render's caption among ``candidates`` (it and others drawn from the scenes)."""
    rng = np.random.default_rng(seed)
    captions = [s.caption() for s in scenes]
    images = clip.encode_images([world.render(s) for s in scenes])
    images = torch.nn.functional.normalize(images.float(), dim=-1)  # (N, D)
    texts = torch.nn.functional.normalize(clip.encode_text(captions).embeds.float(), dim=-1)  # (N, D)
    hits = 0
    for i, caption in enumerate(captions):
        others = [j for j in range(len(scenes)) if captions[j] != caption]
        pool = [i, *rng.choice(others, size=min(candidates - 1, len(others)), replace=False)]
        scores = texts[pool] @ images[i]
        hits += int(torch.argmax(scores)) == 0
    return hits / len(scenes)
