"""The CLIP safety checker of the Stable Diffusion pipelines, loaded from its published layout, in plain torch.

diffusers' ``StableDiffusionSafetyChecker`` (src/diffusers/pipelines/stable_diffusion/safety_checker.py; weights
e.g. CompVis/stable-diffusion-safety-checker): a folder with the ``config.json`` of a ``CLIPConfig`` and
``model.safetensors`` or ``pytorch_model.bin`` holding a CLIP ViT-L/14 vision tower (``vision_model.*``), its
``visual_projection`` (no bias), 17 concept embeddings and 3 "special care" embeddings in the projection space
(``concept_embeds`` (17, P), ``special_care_embeds`` (3, P)) and a threshold per embedding
(``concept_embeds_weights`` (17,), ``special_care_embeds_weights`` (3,)).

Per image, as diffusers' ``forward`` computes it: the cosines of the projected image embedding with each
embedding (both L2-normalised), in float32; special-care scores ``round(cos - threshold + adjustment, 3)`` with
the adjustment 0 until the first positive special-care score and 0.01 from then on; concept scores the same with the
final adjustment (0.01 once any special-care score is positive); the image is flagged when a concept score is
positive.

The tower's keys are those of transformers' ``CLIPVisionModelWithProjection`` (``vision_model.*``,
``visual_projection.weight``), so a checker whose tower equals the CLIP score tower reuses that tower's embeddings
(pipeline.scoring).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from .weights import WeightsError, load_into, load_state_dict, load_torch_file, weight_file

N_CONCEPTS, N_SPECIAL_CARE = 17, 3
SPECIAL_CARE_ADJUSTMENT = 0.01  # added to every score of an image once one special-care score is positive
# Published checkpoints carry this buffer, which transformers no longer keeps in the state dict.
_NON_WEIGHT_KEYS = ("vision_model.embeddings.position_ids",)
TOWER_PREFIXES = ("vision_model.", "visual_projection.")
# transformers < 5 nested CLIPVisionModel's transformer one level deeper, so checkpoints saved with it (the
# published CompVis/stable-diffusion-safety-checker among them) hold the tower as vision_model.vision_model.*.
_NESTED_TOWER = "vision_model.vision_model."


@dataclass(frozen=True)
class SafetyScores:
    nsfw: np.ndarray  # (B,) bool: some concept score is positive
    concept_scores: np.ndarray  # (B, 17) float32, rounded to 3 decimals; > 0 flags the concept
    special_care_scores: np.ndarray  # (B, 3) float32, rounded to 3 decimals


class SafetyChecker(nn.Module):
    """State-dict keys equal diffusers' ``StableDiffusionSafetyChecker``'s."""

    def __init__(self, vision_config: Mapping[str, Any]):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        cfg = CLIPVisionConfig.from_dict({k: v for k, v in vision_config.items() if not k.startswith("_")})
        dim = cfg.projection_dim
        # The tower and projection of a CLIPVisionModelWithProjection, whose keys are vision_model.* and
        # visual_projection.weight under every transformers version.
        tower = CLIPVisionModelWithProjection(cfg)
        self.vision_model = tower.vision_model
        self.visual_projection = tower.visual_projection
        self.concept_embeds = nn.Parameter(torch.ones(N_CONCEPTS, dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(N_SPECIAL_CARE, dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(N_CONCEPTS), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(N_SPECIAL_CARE), requires_grad=False)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) CLIP-preprocessed pixels -> (B, P) projected image embeddings (not normalised)."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output  # (B, hidden), post-layernorm CLS
        return self.visual_projection(pooled)

    def tower_state(self) -> dict[str, torch.Tensor]:
        """The tower's tensors, keyed as a CLIPVisionModelWithProjection's."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(TOWER_PREFIXES)}

    def drop_tower(self) -> None:
        """Free the vision tower when another module computes the same embeddings."""
        self.vision_model = None
        self.visual_projection = None

    def scores(self, image_embeds: torch.Tensor) -> SafetyScores:
        """(B, P) image embeddings of this checker's tower -> flags and scores."""
        return safety_scores(image_embeds, self.concept_embeds, self.special_care_embeds,
                             self.concept_embeds_weights, self.special_care_embeds_weights)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(B, P), (N, P) -> (B, N) float32 cosines of the L2-normalised rows (diffusers' ``cosine_distance``)."""
    a = nn.functional.normalize(a.float(), dim=-1)
    b = nn.functional.normalize(b.float().to(a.device), dim=-1)
    return (a @ b.T).cpu().numpy()


def safety_scores(image_embeds: torch.Tensor, concept_embeds: torch.Tensor, special_care_embeds: torch.Tensor,
                  concept_thresholds: torch.Tensor, special_care_thresholds: torch.Tensor) -> SafetyScores:
    """diffusers' per-image loop, vectorised: every value is computed in float32 numpy with its rounding."""
    special_cos = _cosines(image_embeds, special_care_embeds)  # (B, 3)
    concept_cos = _cosines(image_embeds, concept_embeds)  # (B, 17)
    special_t = special_care_thresholds.detach().float().cpu().numpy()
    concept_t = concept_thresholds.detach().float().cpu().numpy()
    adjust = np.float32(SPECIAL_CARE_ADJUSTMENT)
    unadjusted = np.round(special_cos - special_t, 3)  # (B, 3): each score until the first positive one
    positive = unadjusted > 0
    special_care = positive.any(axis=1)  # (B,): the first positive score is an unadjusted one
    # Scores after an image's first positive one carry the adjustment.
    after_first = np.cumsum(positive, axis=1) - positive > 0
    special = np.where(after_first, np.round(special_cos - special_t + adjust, 3), unadjusted)
    adjustment = np.where(special_care, adjust, np.float32(0))[:, None]  # (B, 1)
    concept = np.round(concept_cos - concept_t + adjustment, 3)
    return SafetyScores((concept > 0).any(axis=1), concept.astype(np.float32), special.astype(np.float32))


def checkpoint_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors keyed as SafetyChecker's: the nested tower of transformers < 5 checkpoints moved up
    one level, the position_ids buffer left out."""
    nested = any(k.startswith(_NESTED_TOWER) for k in state)
    out = {}
    for k, v in state.items():
        if nested and k.startswith(_NESTED_TOWER):
            k = "vision_model." + k.removeprefix(_NESTED_TOWER)
        if k not in _NON_WEIGHT_KEYS:
            out[k] = v
    return out


def load_safety_checker(vision_config: Mapping[str, Any], folder: Path) -> SafetyChecker:
    """The checker with the weights in ``folder`` (strict: keys named in a WeightsError otherwise)."""
    checker = SafetyChecker(vision_config)
    state, source = load_state_dict(folder)
    load_into(checker, checkpoint_state(state), source)
    return checker.eval().requires_grad_(False)


def check_safety_checker(vision_config: Mapping[str, Any], folder: Path) -> None:
    """Check the key layout and shapes of the weights in ``folder`` without reading their data (a safetensors
    header, or a pickle unpickled onto the meta device); raises WeightsError naming the keys that differ."""
    names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    name = weight_file(names, sharded=False)
    if name is None:
        raise WeightsError(f"no weight file in {folder} (model.safetensors or pytorch_model.bin)")
    path = folder / name
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise WeightsError(f"{path}: not a valid safetensors file ({e})") from None
    else:
        state = load_torch_file(path, map_location="meta")
    with torch.device("meta"):
        checker = SafetyChecker(vision_config)
    load_into(checker, checkpoint_state(state), str(path))
