"""Measurement mode (``RunConfig.skip_networks``): the models replaced by stand-ins that answer at almost no cost.

A run in measurement mode exercises everything but the networks (reading, hand-overs between actor pools, image
encoding, shard writes), which is how ``karlo bench`` measures the data plane and how the cluster tests run
GPU-shaped pipelines on a CPU. The stand-ins have the methods the stages call on the real models and return
arrays of the real shapes and dtypes, so the stages run the same code either way.
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch

from karlo_model import MAX_LENGTH, DecoderResult, KarloConfig, PriorResult, TextEncoding
from karlo_model.noise import generator_states, generators_from_seeds


class MeasurementKarlo:
    """Stands in for ``Karlo``'s stage methods (``prior_stage``, ``image_encoder_stage``, ``decoder_stage``,
    ``super_res_stage``, ``text_encoding``). The sampling settings they take are accepted and unused: nothing is
    sampled. The rows' generator states are real (the seeds' fresh generators), and the final images are uniform
    noise drawn from them, like a random-weight model's, so that image encoding costs what it really costs."""

    def __init__(self, config: KarloConfig):
        self.config = config

    def _text(self, n: int) -> TextEncoding:
        d, w = self.config.text_encoder["projection_dim"], self.config.text_encoder["hidden_size"]
        return TextEncoding(torch.zeros(n, d), torch.zeros(n, MAX_LENGTH, w), torch.zeros(n, MAX_LENGTH, dtype=bool),
                            np.zeros(n, dtype=bool))

    def _first_stage(self, seeds: Sequence[int]) -> PriorResult:
        n = len(seeds)
        text = self._text(n)
        return PriorResult(text, text, torch.zeros(n, text.embeds.shape[1]),
                           generator_states(generators_from_seeds(seeds)))

    def prior_stage(self, prompts: Sequence[str], seeds: Sequence[int], **sampling) -> PriorResult:
        return self._first_stage(seeds)

    def image_encoder_stage(self, images: Sequence[np.ndarray], seeds: Sequence[int]) -> PriorResult:
        return self._first_stage(seeds)

    def text_encoding(self, embeds, hidden, mask, truncated=None) -> TextEncoding:
        n = len(embeds)
        return TextEncoding(torch.as_tensor(embeds), torch.as_tensor(hidden), torch.as_tensor(mask),
                            np.zeros(n, dtype=bool) if truncated is None else np.asarray(truncated, dtype=bool))

    def decoder_stage(self, image_embeds, text: TextEncoding, negative: TextEncoding, rng_state: np.ndarray,
                      **sampling) -> DecoderResult:
        dec = self.config.decoder
        return DecoderResult(torch.zeros(len(rng_state), dec.in_channels, dec.sample_size, dec.sample_size),
                             rng_state)

    def super_res_stage(self, image_64, rng_state: np.ndarray, **sampling) -> np.ndarray:
        """-> (B, H, W, 3) uint8 noise, a row's drawn from its generator state (the same for the same row)."""
        size = self.config.image_size
        images = np.empty((len(rng_state), size, size, 3), np.uint8)
        for i, state in enumerate(np.asarray(rng_state, np.uint8)):
            images[i] = np.random.default_rng(zlib.crc32(state.tobytes())).integers(0, 256, (size, size, 3),
                                                                                    np.uint8)
        return images


class MeasurementVisionEncoder:
    """Stands in for a ``CLIPVisionModelWithProjection``: (B, 3, h, w) pixels -> (B, P) zero ``image_embeds``."""

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(image_embeds=torch.zeros(len(pixel_values), self.dim))
