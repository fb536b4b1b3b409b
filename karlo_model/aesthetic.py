"""LAION's aesthetic predictor: a score from a CLIP ViT-L/14 image embedding.

The network is ``MLP`` of christophschuhmann/improved-aesthetic-predictor (``simple_inference.py``): five linear
layers with dropout after the first three (inactive at inference) and no activations, the ReLUs being commented
out upstream as in the published weights (``sac+logos+ava1-l14-linearMSE.pth``). Its input is the projected CLIP
image embedding (``encode_image``) divided by its L2 norm, a zero vector left as it is (upstream's ``normalized``).
The checkpoint is a plain state dict, ``layers.{0,2,4,6,7}.{weight,bias}``; the published widths are
768 -> 1024 -> 128 -> 64 -> 16 -> 1, and the widths here are read from the weights, so that a tiny random predictor
in the same key layout serves tests on tiny CLIP towers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from . import fetch
from .weights import WeightsError, load_into, load_torch_file

# Positions of the Linear layers in ``layers`` (Dropout modules sit at 1, 3 and 5) and the dropout after each.
LINEAR_INDICES = (0, 2, 4, 6, 7)
DROPOUT = {0: 0.2, 2: 0.2, 4: 0.1}
PUBLISHED_WIDTHS = (768, 1024, 128, 64, 16, 1)
STATE_KEYS = tuple(f"layers.{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias"))


class AestheticPredictor(nn.Module):
    """(B, D) CLIP image embeddings -> (B,) aesthetic scores (about 1 to 10 for the published weights)."""

    def __init__(self, widths: tuple[int, ...] = PUBLISHED_WIDTHS):
        super().__init__()
        if len(widths) != len(LINEAR_INDICES) + 1:
            raise ValueError(f"an aesthetic predictor has {len(LINEAR_INDICES)} layers, got widths {widths}")
        layers: list[nn.Module] = []
        for n, i in enumerate(LINEAR_INDICES):
            layers.append(nn.Linear(widths[n], widths[n + 1]))
            if i in DROPOUT:
                layers.append(nn.Dropout(DROPOUT[i]))
        self.layers = nn.Sequential(*layers)

    @property
    def input_dim(self) -> int:
        return self.layers[0].in_features

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        norm = image_embeds.norm(dim=-1, keepdim=True)
        x = image_embeds / torch.where(norm == 0, torch.ones_like(norm), norm)  # (B, D), unit rows
        return self.layers(x).squeeze(-1)


def local_file(path_or_url: str | os.PathLike, storage_options: dict | None = None) -> Path:
    """The predictor's file on this machine (karlo_model.fetch.local_file)."""
    try:
        path = fetch.local_file(path_or_url, storage_options)
    except FileNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise WeightsError(f"aesthetic model {path_or_url}: no such file")
    return path


def read_state(path_or_url: str | os.PathLike, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or of a weights-only torch pickle (``.pth``, ``.pt``, ``.bin``) at a
    local path or fsspec URL; nothing but tensors is unpickled."""
    path = local_file(path_or_url, storage_options)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise WeightsError(f"{path_or_url}: not a valid safetensors file ({e})") from None
    state = load_torch_file(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path_or_url}: expected a state dict of tensors, found a {type(state).__name__}")
    return dict(state)


def load_aesthetic_predictor(path_or_url: str, storage_options: dict | None = None) -> AestheticPredictor:
    """The predictor in a file of the published key layout, loaded strictly: other keys, or widths that do not chain
    into a single output, are a WeightsError naming them."""
    state = read_state(path_or_url, storage_options)
    missing = [k for k in STATE_KEYS if k not in state]
    unexpected = sorted(set(state) - set(STATE_KEYS))
    if missing or unexpected:
        parts = [f"{label}: {', '.join(keys)}" for label, keys in (("missing keys", missing),
                                                                    ("unexpected keys", unexpected)) if keys]
        raise WeightsError(f"{path_or_url} is not an aesthetic predictor state dict (layers.0/2/4/6/7 weight and "
                           f"bias): {'; '.join(parts)}")
    weights = [state[f"layers.{i}.weight"] for i in LINEAR_INDICES]  # (out, in) each
    if any(w.ndim != 2 for w in weights):
        raise WeightsError(f"{path_or_url}: the layers' weights must be 2-D (out, in) matrices")
    widths = (weights[0].shape[1], *(w.shape[0] for w in weights))
    if widths[-1] != 1:
        raise WeightsError(f"{path_or_url}: the last layer has {widths[-1]} outputs, an aesthetic score has 1")
    model = AestheticPredictor(widths)
    load_into(model, {k: v.float() for k, v in state.items()}, str(path_or_url))  # names mis-chained widths
    return model.eval().requires_grad_(False)
