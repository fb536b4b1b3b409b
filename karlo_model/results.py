"""What the stages of ``Karlo`` hand each other and what a whole generation returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .text import TextEncoding


@dataclass
class PriorResult:
    text: TextEncoding  # the prompts
    negative: TextEncoding  # the unconditional text of guidance ("" unless a negative prompt is given)
    image_embeds: torch.Tensor  # (B, D)
    rng_state: np.ndarray  # (B, S) uint8


@dataclass
class DecoderResult:
    image_64: torch.Tensor  # (B, 3, h, w) in [-1, 1]
    rng_state: np.ndarray


@dataclass
class KarloOutput:
    images: np.ndarray  # (B, H, W, 3) uint8
    image_embeds: np.ndarray  # (B, D) float32, the prior's un-normalised CLIP image embeddings
    text_embeds: np.ndarray  # (B, D) float32
